"""mlsem benchmark suite: mlsem against lme4, statsmodels MixedLM, mixedlm, OpenMx and lavaan.

    python benchmarks/run.py                     # 10k, 100k, 1M rows + the wide case
    python benchmarks/run.py --size 250000       # add a size of your own
    python benchmarks/run.py --parquet my.parquet --formula "score ~ ses + (1 | district/school)"
    python benchmarks/run.py --quick --no-peers  # a few seconds: the harness itself
    python benchmarks/run.py --issue14           # + medium, 1.15M and 10M rows, the load test

Every fit runs in a fresh process, so its peak resident memory (from wait4) is
its own; the runs of one case are interleaved across tools (mlsem, lme4, ...,
mlsem, lme4, ...) so that a busy machine slows all of them alike.  A tool's
time is the median over the repeats.  What is timed: mlsem end to end from
the Parquet file to its results object (reading, preparation, optimisation,
standard errors); lme4 the ``lmer()`` call; statsmodels model construction and
``fit()``; mixedlm (``pip install mixedlm``, lme4's algorithm with a Rust core;
skipped with a line where not installed) ``lmer(REML=False)`` and ``vcov()``;
OpenMx ``mxRun``; lavaan ``sem()``.  Interpreter start, package
loading and (for the peers) reading the data are not timed.

Data: ``mlsem.simulate`` with fixed seeds, the design of the reference case
``medium`` (counties with 1-10 schools of 1-20 pupils, y = 1 + 0.8 x + U + V + E,
sd 1, 0.7, 1); a size in rows becomes round(rows / 57.75) counties.  The
``unbalanced`` reference case (300 counties, 24 slots) is also fitted on its
wide SEM form, written in lavaan syntax, by mlsem (``mlsem-sem``: ``mlsem.sem``),
OpenMx and lavaan (missing covariates of empty slots filled with 0, as the
shipped lavaan reference does), besides the long-form fits of mlsem, lme4 and
statsmodels.

Outputs (in --out, default benchmarks/results): results.json (every run, the
summary, the skipped peers, the machine), times.png (time against rows per
tool, log-log; needs matplotlib), and the Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import polars as pl  # noqa: E402

import mlsem  # noqa: E402
from mlsem.spec.formula import nest_levels, parse_formula  # noqa: E402

DEFAULT_FORMULA = "y ~ x + (1 | k/j)"
ROWS_PER_COUNTY = 57.75          # E[schools] * E[pupils] = 5.5 * 10.5
SEED = 20240104
WIDE_CASE = os.path.join(ROOT, "tests", "reference", "unbalanced.parquet")
WIDE_FORMULA = "y ~ x1 + z + (1 | k/j)"
MEDIUM_CASE = os.path.join(ROOT, "tests", "reference", "medium.parquet")
ISSUE14_COUNTIES = (20_000, 174_000)      # 1.15M and 10M rows of the medium design


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------
def simulated(rows: int, outdir: str, counties: int | None = None) -> str:
    counties = counties or max(1, round(rows / ROWS_PER_COUNTY))
    path = os.path.join(outdir, f"sim_{rows}.parquet" if rows else f"sim_{counties}_counties.parquet")
    if not os.path.exists(path):
        df = mlsem.simulate(counties, (1, 10), (1, 20), intercept=1.0, slope=0.8, sd_county=1.0,
                            sd_school=0.7, sd_resid=1.0, x="normal", seed=SEED)
        df.write_parquet(path)
    return path


def size_label(rows: int) -> str:
    if rows >= 1_000_000 and rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows >= 1000 and rows % 1000 == 0:
        return f"{rows // 1000}k"
    return str(rows)


def wide_form(path: str, formula: str, tmp: str):
    """The wide SEM form of a two-level nested case: one row per top unit, slot
    columns <var>_<j>_<i>; lavaan model syntax and the OpenMx spec."""
    F = parse_formula(formula)
    levels = nest_levels(F)
    top, inner = levels[0][-1], levels[1][-1]
    df = pl.read_parquet(path).select([top, inner, F.outcome] + list(F.fixed))
    df = df.with_columns(pl.int_range(pl.len()).over([top, inner]).add(1).alias("__i"))
    slots = df.select(inner, "__i").unique().sort(inner, "__i")
    names = [f"{a}_{b}" for a, b in slots.iter_rows()]
    groups = {g: n + 1 for n, g in enumerate(sorted(slots[inner].unique().to_list()))}
    df = df.with_columns(pl.format("{}_{}", inner, "__i").alias("__slot"))
    wide = df.pivot(on="__slot", index=top, values=[F.outcome] + list(F.fixed))
    cols = {}
    for v in [F.outcome] + list(F.fixed):
        src = [f"{v}_{s}" if len(F.fixed) else s for s in names]
        cols[v] = [f"{v}_{s}" for s in names]
        for a, b in zip(src, cols[v]):
            if a not in wide.columns:
                wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(b))
            elif a != b:
                wide = wide.rename({a: b})
    wide = wide.with_columns([pl.col(c).fill_null(0.0) for x in F.fixed for c in cols[x]])
    wide = wide.select([top] + [c for v in cols.values() for c in v])
    csv = os.path.join(tmp, "wide.csv")
    wide.write_csv(csv, null_value="NA")
    ys = cols[F.outcome]
    grp = [groups[a] for a, _ in slots.iter_rows()]
    lines = ["U =~ " + " + ".join(f"1*{y}" for y in ys)]
    for g in sorted(set(grp)):
        lines.append(f"V{g} =~ " + " + ".join(f"1*{y}" for y, gg in zip(ys, grp) if gg == g))
        lines.append(f"V{g} ~~ sv*V{g}")
        lines.append(f"U ~~ 0*V{g}")
        for g2 in sorted(set(grp)):
            if g2 > g:
                lines.append(f"V{g} ~~ 0*V{g2}")
    lines.append("U ~~ su*U")
    for s, y in enumerate(ys):
        rhs = " + ".join(f"b_{x}*{cols[x][s]}" for x in F.fixed)
        lines.append(f"{y} ~ c*1" + (f" + {rhs}" if rhs else ""))
        lines.append(f"{y} ~~ se*{y}")
    lav = os.path.join(tmp, "model.lav")
    with open(lav, "w") as f:
        f.write("\n".join(lines) + "\n")
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
        json.dump({"slots": ys, "group": grp, "covariates": {x: cols[x] for x in F.fixed}}, f)
    return csv, lav, spec, wide.height, len(ys)


def to_csv(path: str, tmp: str) -> str:
    out = os.path.join(tmp, os.path.basename(path) + ".csv")
    if not os.path.exists(out):
        pl.read_parquet(path).write_csv(out)
    return out


# ---- peers ------------------------------------------------------------------
def r_has(pkg: str) -> bool:
    if shutil.which("Rscript") is None:
        return False
    r = subprocess.run(["Rscript", "-e", f"quit(status = !requireNamespace('{pkg}', quietly = TRUE))"],
                       capture_output=True)
    return r.returncode == 0


def available_peers(wanted):
    have, skipped = [], []
    for tool in wanted:
        if tool in ("lme4", "lavaan", "OpenMx"):
            if shutil.which("Rscript") is None:
                skipped.append(f"skipped {tool}: Rscript is not installed")
            elif not r_has(tool):
                skipped.append(f"skipped {tool}: the R package {tool} is not installed")
            else:
                have.append(tool)
        elif tool == "statsmodels":
            try:
                import statsmodels  # noqa: F401
                have.append(tool)
            except ImportError:
                skipped.append("skipped statsmodels: the Python package statsmodels is not installed")
        elif tool == "mixedlm":
            try:
                import mixedlm  # noqa: F401
                have.append(tool)
            except ImportError:
                skipped.append("skipped mixedlm: the Python package mixedlm is not installed "
                               "(pip install mixedlm)")
    return have, skipped


TIME = shutil.which("time", path="/usr/bin:/bin") if os.name == "posix" else None
RSS_TAG = "MLSEM_BENCH_MAXRSS_KB="


def run_once(cmd, timeout):
    """Run one fit in a child process; (result dict, peak RSS in MB) or an error.

    The peak RSS comes from GNU time (%M) where installed: a child forked from
    this (large) Python process would inherit its high-water mark across exec,
    so wait4's ru_maxrss is only an upper bound (used, marked, as the fallback)."""
    t0 = time.perf_counter()
    if TIME:
        cmd = [TIME, "-f", RSS_TAG + "%M"] + list(cmd)
    proc = _Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}, None
    peak = getattr(proc, "_mlsem_rss", None)   # upper bound (see above)
    if TIME:
        tagged = [ln for ln in err.splitlines() if ln.startswith(RSS_TAG)]
        peak = int(tagged[-1][len(RSS_TAG):]) / 1024.0 if tagged else None
        err = "\n".join(ln for ln in err.splitlines() if not ln.startswith(RSS_TAG)
                        and not ln.startswith("Command exited with non-zero status"))
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:300]}, peak
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no result in the output: {out[-200:]!r} {err[-200:]!r}"}, peak
    res["wall"] = time.perf_counter() - t0
    return res, peak


class _Popen(subprocess.Popen):
    """Popen that records the child's own peak RSS (wait4)."""

    def _try_wait(self, wait_flags):
        try:
            pid, sts, ru = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return (self.pid, 0)
        if pid == self.pid:
            self._mlsem_rss = ru.ru_maxrss / 1024.0   # kB -> MB (Linux)
        return (pid, sts)


def command(tool, case, threads):
    py = sys.executable
    w = os.path.join(HERE, "worker.py")
    if tool == "mlsem":
        return [py, w, "mlsem", case["path"], case["formula"]] + ([str(threads)] if threads else [])
    if tool == "statsmodels":
        return [py, w, "statsmodels", case["path"], case["formula"]]
    if tool == "mixedlm":
        return [py, w, "mixedlm", case["path"], case["formula"]]
    if tool == "mlsem-sem":
        return [py, w, "mlsem-sem", case["wide_csv"], case["lav"]]
    if tool == "lme4":
        return ["Rscript", os.path.join(HERE, "lme4.R"), case["csv"], case["formula"], case["ids"]]
    if tool == "OpenMx":
        return ["Rscript", os.path.join(HERE, "openmx_wide.R"), case["wide_csv"], case["spec"],
                str(threads or 2)]
    if tool == "lavaan":
        return ["Rscript", os.path.join(HERE, "lavaan_wide.R"), case["wide_csv"], case["lav"]]
    raise ValueError(tool)


# ---- the run ------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="simulated sizes in rows (default 10000 100000 1000000)")
    ap.add_argument("--size", type=int, action="append", default=[],
                    help="an extra simulated size in rows (repeatable)")
    ap.add_argument("--counties", type=int, action="append", default=[],
                    help="an extra simulated case with this many counties (repeatable)")
    ap.add_argument("--parquet", action="append", default=[], help="a Parquet file to fit too (repeatable)")
    ap.add_argument("--formula", default=DEFAULT_FORMULA, help="formula for --parquet files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=200.0,
                    help="a tool whose first run of a case takes longer is not repeated there")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="a peer is skipped on a case where its time, predicted linearly in rows "
                         "from its last case, exceeds this")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--threads", type=int, default=None, help="mlsem/OpenMx threads (default: all)")
    ap.add_argument("--no-peers", action="store_true", help="time mlsem alone")
    ap.add_argument("--no-wide", action="store_true", help="skip the wide SEM case (unbalanced)")
    ap.add_argument("--no-relaxed", action="store_true",
                    help="skip the relaxed-against-standard fits on the largest case")
    ap.add_argument("--quick", action="store_true", help="2,000 rows, one repeat, no wide case")
    ap.add_argument("--issue14", action="store_true",
                    help="add issue 14's cases: the reference case medium, the medium design "
                         "simulated with 20,000 counties (1.15M rows) and 174,000 counties (10M "
                         "rows, generated here, not committed), and the load benchmark "
                         "(benchmarks/load.py on medium); print the issue's ratios")
    ap.add_argument("--multivariate", action="store_true",
                    help="several outcomes (issue 15): at each size, the bivariate fit against the "
                         "univariate fit of the same rows (benchmarks/multivariate.py), instead of "
                         "the peers' table")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.multivariate:
        sys.path.insert(0, HERE)
        import multivariate
        sizes = a.sizes if a.sizes is not None else [1_150_000]
        if a.quick:
            sizes, a.repeats = [2_000], 1
        return multivariate.run(sorted(set(sizes + a.size)), a.repeats, a.out, a.threads)

    sizes = a.sizes if a.sizes is not None else [10_000, 100_000, 1_000_000]
    if a.quick:
        sizes, a.repeats, a.no_wide = [2_000], 1, True
    sizes = sorted(set(sizes + a.size))
    if a.issue14 and not a.quick:
        a.counties = sorted(set(a.counties + list(ISSUE14_COUNTIES)))
        if os.path.exists(MEDIUM_CASE) and MEDIUM_CASE not in a.parquet:
            a.parquet.append(MEDIUM_CASE)
    os.makedirs(a.out, exist_ok=True)
    datadir = os.path.join(a.out, "data")
    os.makedirs(datadir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="mlsem_bench_")

    peers_long = [] if a.no_peers else ["lme4", "statsmodels", "mixedlm"]
    peers_wide = [] if a.no_peers else ["lme4", "statsmodels", "mixedlm", "OpenMx", "lavaan"]
    have, skipped = available_peers(sorted(set(peers_long + peers_wide)))
    for s in skipped:
        print(s)
    if a.no_peers:
        print("skipped all peers: --no-peers")

    cases = []
    for n in sizes:
        path = simulated(n, datadir)
        cases.append({"case": f"simulated {size_label(n)}", "path": path, "formula": DEFAULT_FORMULA,
                      "tools": ["mlsem"] + [t for t in peers_long if t in have]})
    for n in a.counties:
        cases.append({"case": f"simulated {n:,} counties", "path": simulated(0, datadir, n),
                      "formula": DEFAULT_FORMULA,
                      "tools": ["mlsem"] + [t for t in peers_long if t in have]})
    for p in a.parquet:
        if not os.path.exists(p):
            raise SystemExit(f"--parquet {p!r}: no such file")
        cases.append({"case": os.path.basename(p), "path": os.path.abspath(p), "formula": a.formula,
                      "tools": ["mlsem"] + [t for t in peers_long if t in have]})
    if not a.no_wide and os.path.exists(WIDE_CASE):
        c = {"case": "unbalanced (wide SEM: 24 slots)", "path": WIDE_CASE, "formula": WIDE_FORMULA,
             "tools": ["mlsem", "mlsem-sem"] + [t for t in peers_wide if t in have]}
        c["wide_csv"], c["lav"], c["spec"], _, _ = wide_form(WIDE_CASE, WIDE_FORMULA, tmp)
        cases.append(c)

    for c in cases:
        c["rows"] = pl.scan_parquet(c["path"]).select(pl.len()).collect().item()
        levels = nest_levels(parse_formula(c["formula"]))
        c["ids"] = ",".join(lv[-1] for lv in levels)
        if any(t in ("lme4",) for t in c["tools"]):
            c["csv"] = to_csv(c["path"], tmp)
    cases.sort(key=lambda c: c["rows"])

    runs, last = [], {}     # last: tool -> (rows, median seconds) of its last case
    for c in cases:
        tools = []
        for t in c["tools"]:
            pred = last[t][1] * c["rows"] / last[t][0] if t in last else 0.0
            if t != "mlsem" and pred > a.max_seconds:
                print(f"skipped {t} on {c['case']}: {pred:.0f} s predicted (linear in rows from "
                      f"{last[t][1]:.1f} s at {last[t][0]:,} rows), over --max-seconds {a.max_seconds:.0f}")
            else:
                tools.append(t)
        again = {t: True for t in tools}
        for rep in range(a.repeats):
            for t in tools:
                if not again[t]:
                    continue   # failed, or over the budget on its first run
                log(f"  {c['case']} ({c['rows']:,} rows): {t}, run {rep + 1}")
                res, peak = run_once(command(t, c, a.threads), a.timeout)
                res.update(case=c["case"], rows=c["rows"], tool=t, run=rep + 1, peak_mb=peak)
                runs.append(res)
                if "error" in res:
                    print(f"{t} failed on {c['case']}: {res['error']}")
                    again[t] = False
                    continue
                if rep == 0 and res["seconds"] > a.budget:
                    again[t] = False
        for t in tools:
            secs = [r["seconds"] for r in runs if r["case"] == c["case"] and r["tool"] == t
                    and "error" not in r]
            if secs and c.get("wide_csv") is None:
                last[t] = (c["rows"], statistics.median(secs))

    summary = summarise(runs, cases)
    table = markdown(summary)
    print(table)
    med = {(s["case"], s["tool"]): s["median_seconds"] for s in summary}
    for c in cases:
        if (c["case"], "mlsem-sem") in med:
            sem_s = med[(c["case"], "mlsem-sem")]
            peers = [f"/ {t} {sem_s / med[(c['case'], t)]:.4f}" for t in ("OpenMx", "lavaan")
                     if (c["case"], t) in med]
            if peers:
                print(f"\n{c['case']}, the wide SEM in lavaan syntax: mlsem sem() {sem_s:.3f} s; "
                      f"ratio {', '.join(peers)}")
    scaling = None
    if not a.quick:
        big = max((c for c in cases if c["case"].startswith("simulated")), key=lambda c: c["rows"],
                  default=None)
        if big is not None:
            log(f"  thread scaling of one evaluation on {big['case']}")
            r = subprocess.run([sys.executable, os.path.join(HERE, "threads.py"), big["path"]],
                               capture_output=True, text=True)
            if r.returncode == 0:
                scaling = dict(json.loads(r.stdout.strip().splitlines()[-1]), case=big["case"])
                print(f"\nlog-likelihood + gradient evaluation on {big['case']} ({scaling['rows']:,} rows): "
                      f"{1000 * scaling['seconds_1_thread']:.1f} ms with 1 thread, "
                      f"{1000 * scaling['seconds_2_threads']:.1f} ms with 2 threads, "
                      f"ratio {scaling['ratio_2_to_1']:.2f}")
            else:
                print(f"thread scaling failed: {r.stderr.strip()[-300:]}")
    relaxed = None
    if not a.quick and not a.no_relaxed:
        big = max((c for c in cases if c["case"].startswith("simulated")), key=lambda c: c["rows"],
                  default=None)
        if big is not None:
            log(f"  relaxed against standard fits on {big['case']}")
            r = subprocess.run([sys.executable, os.path.join(HERE, "relaxed_vs_standard.py"),
                                "--data", big["path"], "--issue", "--json",
                                "--repeat", str(a.repeats)], capture_output=True, text=True)
            if r.returncode == 0:
                lines = r.stdout.strip().splitlines()
                relaxed = dict(json.loads(lines[-1]), case=big["case"])
                print(f"\nrelaxed / standard mlsem fits on {big['case']}:\n")
                print("\n".join(lines[2:-1]))
            else:
                print(f"relaxed fits failed: {r.stderr.strip()[-300:]}")
    issue = issue14_report(summary, a) if a.issue14 and not a.quick else None
    payload = {"machine": machine(), "command": sys.argv, "repeats": a.repeats,
               "skipped": skipped, "summary": summary, "thread_scaling": scaling,
               "relaxed": relaxed, "issue14": issue, "runs": runs}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(summary, os.path.join(a.out, "times.png"))
    shutil.rmtree(tmp, ignore_errors=True)
    return payload


def issue14_report(summary, a):
    """Issue 14's numbers from this run: per case mlsem's median seconds, its
    ratios to mixedlm and lme4 and its peak memory; the 1.15M -> 10M time ratio;
    the load benchmark on medium."""
    med = {(s["case"], s["tool"]): s for s in summary}
    out = {"cases": {}}
    names = {"medium": os.path.basename(MEDIUM_CASE)}
    names.update({f"{n:,} counties": f"simulated {n:,} counties" for n in ISSUE14_COUNTIES})
    print("\nissue 14:")
    for label, case in names.items():
        m = med.get((case, "mlsem"))
        if m is None:
            continue
        row = {"rows": m["rows"], "mlsem_s": m["median_seconds"], "peak_mb": m.get("peak_mb")}
        for t in ("mixedlm", "lme4", "statsmodels"):
            p = med.get((case, t))
            if p is not None:
                row[f"ratio_to_{t}"] = m["median_seconds"] / p["median_seconds"]
        out["cases"][label] = row
        ratios = ", ".join(f"{k[9:]} {v:.3f}" for k, v in row.items() if k.startswith("ratio_to_"))
        peak = f", peak {row['peak_mb']:.0f} MB" if row.get("peak_mb") else ""
        print(f"  {label} ({row['rows']:,} rows): mlsem {row['mlsem_s']:.3f} s{peak}"
              + (f"; mlsem / {ratios}" if ratios else ""))
    small, big = (out["cases"].get(f"{n:,} counties") for n in ISSUE14_COUNTIES)
    if small and big:
        out["scaling_1M_to_10M"] = big["mlsem_s"] / small["mlsem_s"]
        print(f"  1.15M -> 10M rows: time ratio {out['scaling_1M_to_10M']:.2f} "
              f"(rows ratio {big['rows'] / small['rows']:.2f})")
    if os.path.exists(MEDIUM_CASE):
        log("  load benchmark on medium")
        r = subprocess.run([sys.executable, os.path.join(HERE, "load.py"), MEDIUM_CASE,
                            "--repeats", str(max(a.repeats, 3)),
                            "--json", os.path.join(a.out, "load.json")],
                           capture_output=True, text=True)
        if r.returncode == 0:
            with open(os.path.join(a.out, "load.json")) as f:
                out["load"] = json.load(f)
            print("  " + r.stdout.strip().splitlines()[0])
        else:
            print(f"  load benchmark failed: {r.stderr.strip()[-300:]}")
    return out


def summarise(runs, cases):
    out = []
    for c in cases:
        ok = [r for r in runs if r["case"] == c["case"] and "error" not in r]
        base = [r["seconds"] for r in ok if r["tool"] == "mlsem"]
        base_med = statistics.median(base) if base else None
        for t in c["tools"]:
            rs = [r for r in ok if r["tool"] == t]
            if not rs:
                continue
            med = statistics.median(r["seconds"] for r in rs)
            peaks = [r["peak_mb"] for r in rs if r.get("peak_mb") is not None]
            out.append({"case": c["case"], "rows": c["rows"], "tool": t, "runs": len(rs),
                        "median_seconds": med,
                        "ratio_to_mlsem": med / base_med if base_med else None,
                        "peak_mb": max(peaks) if peaks else None,
                        "loglik": statistics.median(r["loglik"] for r in rs),
                        "program": rs[0].get("program", t)})
    return out


def markdown(summary):
    lines = ["| case | rows | tool | median seconds | ratio to mlsem | peak memory (MB) | runs | log-likelihood |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        ratio = f"{s['ratio_to_mlsem']:.2f}" if s["ratio_to_mlsem"] is not None else "-"
        peak = f"{s['peak_mb']:.0f}" if s["peak_mb"] is not None else "-"
        lines.append(f"| {s['case']} | {s['rows']:,} | {s['tool']} | {s['median_seconds']:.3f} | "
                     f"{ratio} | {peak} | {s['runs']} | {s['loglik']:.4f} |")
    return "\n".join(lines)


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "mlsem": mlsem.__version__}
    try:
        info["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    return info


def plot(summary, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("skipped the plot: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for t in sorted({s["tool"] for s in summary}):
        pts = sorted((s["rows"], s["median_seconds"]) for s in summary if s["tool"] == t)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows")
    ax.set_ylabel("median seconds")
    ax.set_title("mlsem benchmark: time against rows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")  # outside the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
