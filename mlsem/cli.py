"""Command line (``mlsem`` and ``python -m mlsem``).

    mlsem fit DATA --formula F [--vce V] [--index COL] [--by COL] --out RES.parquet [--json FIT.json]
    mlsem simulate --counties N --schools A-B --pupils A-B [...] --out DATA.parquet
    mlsem predict DATA --formula F --out EFFECTS.parquet
    mlsem diagram [DATA] --formula F --out MODEL.dot|.svg|.png
    mlsem wide DATA --formula F --out WIDE.parquet
    mlsem example

Exit codes: 0 success; 1 the fit ran but did not converge or is not
identified, or a ``--by`` group failed (results written and flagged); 2 bad
input or usage (message on stderr, nothing written, earlier outputs intact);
3 an internal error (a bug: traceback on stderr, nothing written).
Outputs are written atomically (temporary file, then rename).  Progress goes
to stderr (``--quiet`` silences it); tables for humans go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings

from . import __version__
from .errors import ConvergenceWarning, MlsemError

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
STATUS_COLUMNS = ("name", "estimate", "std_err", "z", "p_value", "ci_low", "ci_high")


# ---- progress -----------------------------------------------------------------
class Progress:
    """Progress lines on stderr: stage messages always (unless quiet), the
    optimizer's iterations at most once a second."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.prefix = ""

    def say(self, msg: str) -> None:
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{el:7.1f}s] {self.prefix}{msg}", file=sys.stderr, flush=True)

    def prepared(self, prep) -> None:
        lv = ", ".join(f"{x.ngroups:,} {x.name}" for x in prep.levels)
        self.say(f"reshaped: {prep.nobs:,} observations, {lv}; {prep.nslots:,} slots, "
                 f"{prep.npatterns:,} missing patterns")
        self._last = time.perf_counter()

    def stage(self, what: str) -> None:
        self.say(what)

    def __call__(self, it: int, loglik: float) -> None:
        now = time.perf_counter()
        if now - self._last >= 1.0:
            self._last = now
            self.say(f"optimizer iteration {it}: loglik {loglik:.6f}")


# ---- helpers ------------------------------------------------------------------
def _check_out(path: str, option: str, suffixes=None) -> None:
    """Refuse an output path that cannot be written, before any work."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise MlsemError(f"{option} {path!r}: the file name must end with {' or '.join(suffixes)}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise MlsemError(f"{option} {path!r}: directory {d!r} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise MlsemError(f"{option} {path!r}: directory {d!r} is not writable")
    if os.path.isdir(path):
        raise MlsemError(f"{option} {path!r} is a directory")


def _write(path: str, option: str, write) -> None:
    from .results import atomic_write
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise MlsemError(f"{option} {path!r}: cannot write: {exc.strerror or exc}") from None


def _write_parquet(df, path, option):
    _write(path, option, lambda tmp: df.write_parquet(tmp))


def _write_text(text, path, option):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _write(path, option, w)


def _command_line(argv) -> str:
    return shlex.join(["mlsem"] + list(argv if argv is not None else sys.argv[1:]))


def _status(res) -> str:
    if not res.converged:
        return f"not converged: {res.opt.message}"
    if not res.identified:
        return f"not identified: confounded {', '.join(res.confounded)}"
    return "ok"


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fit_record(res) -> dict:
    d = res.to_dict()
    d["tests"] = {"lr_vs_linear_regression": d.get("lr_test_vs_linear_regression", {}),
                  "wald_fixed_effects": d.get("wald_fixed", {})}
    d["status"] = _status(res)
    return d


# ---- fit --------------------------------------------------------------------------
def _read(args, extra_cols, prog):
    """Read the formula's columns (and ``extra_cols``) once, checking names."""
    from .data import collect_columns
    from .formula import parse_formula
    F = parse_formula(args.formula)
    cols = list(F.columns)
    for c in extra_cols:
        if c and c not in cols:
            cols.append(c)
    numeric = [F.outcome, *F.fixed] + [e for rt in F.random for e in rt.effects if e != "Intercept"]
    ids = list(dict.fromkeys(c for rt in F.random for c in rt.group))
    prog.say(f"reading {args.data}")
    # types, null ids and infinite values are checked once on the whole data
    df = collect_columns(args.data, cols, numeric, ids)
    prog.say(f"read {df.height:,} rows, columns {', '.join(cols)}")
    return F, df


def _cmd_fit(args, argv) -> int:
    import polars as pl
    from .api import fit
    from .api import VCE
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq"))
    if args.json:
        _check_out(args.json, "--json", (".json",))
    if args.by in STATUS_COLUMNS + ("status",):
        raise MlsemError(f"--by {args.by!r} clashes with a column of the results table; rename it")
    if args.vce not in VCE:
        raise MlsemError(f"--vce {args.vce!r} is not one of {', '.join(VCE)}")
    t0 = time.perf_counter()
    F, df = _read(args, [args.index, args.by], prog)
    t_read = time.perf_counter() - t0
    if args.by and args.by in F.columns:
        raise MlsemError(f"--by {args.by!r} is a column of the formula; give another column")
    if args.by and args.by == args.index:
        raise MlsemError(f"--by {args.by!r} is also the --index column; give another column")
    schema = {"name": pl.String, "estimate": pl.Float64, "std_err": pl.Float64, "z": pl.Float64,
              "p_value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
    if args.by:
        groups = df.partition_by(args.by, as_dict=True, maintain_order=True)
        keys = sorted(groups, key=lambda k: (k[0] is None, k[0]))
    else:
        groups = {(None,): df}
        keys = [(None,)]
    tables, fits, any_bad, errors = [], [], False, []
    for gi, key in enumerate(keys):
        gdf = groups[key].drop(args.by) if args.by else groups[key]
        val = key[0]
        if args.by:
            prog.prefix = f"{args.by}={val}: "
            prog.say(f"group {gi + 1}/{len(keys)}, {gdf.height:,} rows")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fit(gdf, args.formula, index=args.index, vce=args.vce, progress=prog)
        except Exception as exc:  # noqa: BLE001 - one failing group must not lose the others
            if not args.by:
                raise
            any_bad = True
            if isinstance(exc, MlsemError):
                errors.append(exc)
            msg = f"error: {exc}" if isinstance(exc, MlsemError) else f"error: internal: {type(exc).__name__}: {exc}"
            prog.say(msg)
            # one row saying why, in the columns of a parameter table
            tables.append(pl.DataFrame({**{c: [None] for c in schema}, "status": [msg]},
                                       schema={**schema, "status": pl.String}))
            fits.append({args.by: val, "status": msg})
            continue
        st = _status(res)
        any_bad |= st != "ok"
        prog.say(f"loglik {res.loglik:.6f}, {res.opt.iterations} iterations, {st} "
                 f"({sum(res.timings.values()):.2f}s)")
        tab = res.params.with_columns(pl.lit(st).alias("status"))
        tables.append(tab)
        rec = _fit_record(res)
        if args.by:
            rec = {args.by: val, **rec}
        fits.append(rec)
        if not args.quiet and not args.by:
            print(res.summary())
        if not args.quiet and args.by:
            print(f"\n== {args.by} = {val} ==")
            print(res.summary())
    prog.prefix = ""
    if args.by and errors and len(errors) == len(keys):
        # every group refused the same way: bad input, not a partial result
        raise errors[0]
    out = pl.concat(tables, how="vertical")
    if args.by:
        byvals = [k[0] for k in keys]
        lens = [t.height for t in tables]
        bycol = pl.Series(args.by, [v for v, n in zip(byvals, lens) for _ in range(n)],
                          dtype=df.schema[args.by])
        out = out.with_columns(bycol).select([args.by, *out.columns])
    code = EXIT_FLAGGED if any_bad else EXIT_OK
    timings = {"read": t_read, "total": time.perf_counter() - t0}
    record = {"mlsem_version": __version__, "command": _command_line(argv),
              "data": args.data, "formula": args.formula, "vce": args.vce, "index": args.index,
              "exit_code": code}
    if args.by:
        record.update({"by": args.by, "ngroups": len(keys),
                       "failed": [f[args.by] for f in fits if f["status"] != "ok"], "fits": fits})
    else:
        fr = dict(fits[0])
        fr["timings"] = dict(fr.get("timings", {}), **timings)
        record.update({k: v for k, v in fr.items() if k not in record})
    record["timings_total"] = timings
    text = json.dumps(record, indent=2, default=_json_default)
    _write_parquet(out, args.out, "--out")
    prog.say(f"wrote {args.out} ({out.height} rows)")
    if args.json:
        _write_text(text, args.json, "--json")
        prog.say(f"wrote {args.json}")
    if code:
        bad = [f for f in fits if f["status"] != "ok"]
        for f in bad:
            who = f"{args.by}={f[args.by]}: " if args.by else ""
            print(f"mlsem fit: {who}{f['status']}", file=sys.stderr)
    return code


# ---- simulate -------------------------------------------------------------------
def _int_range(text: str, option: str):
    parts = text.strip().split("-")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2):
        raise MlsemError(f"{option} {text!r}: expected a count such as 2 or a range such as 1-10")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _matrix(text: str, option: str):
    try:
        rows = [[float(v) for v in r.split(",")] for r in text.split(";")]
    except ValueError:
        raise MlsemError(f"{option} {text!r}: expected rows of numbers such as \"1.5,0.6;0.6,1.0\"") from None
    if any(len(r) != len(rows) for r in rows):
        raise MlsemError(f"{option} {text!r}: the matrix is not square ({len(rows)} rows)")
    return rows


def _cmd_simulate(args, argv) -> int:
    from .simulate import simulate
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq", ".csv"))
    cov = _matrix(args.school_cov, "--school-cov") if args.school_cov else None
    df = simulate(args.counties, _int_range(args.schools, "--schools"), _int_range(args.pupils, "--pupils"),
                  intercept=args.intercept, slope=args.slope, sd_county=args.sd_county,
                  sd_school=args.sd_school, sd_resid=args.sd_resid, school_cov=cov, x=args.x,
                  seed=args.seed, regions=args.regions)
    prog.say(f"simulated {df.height:,} pupils in {df.select('k', 'j').n_unique():,} schools "
             f"in {args.counties:,} counties")
    if args.out.lower().endswith(".csv"):
        _write(args.out, "--out", lambda tmp: df.write_csv(tmp))
    else:
        _write_parquet(df, args.out, "--out")
    prog.say(f"wrote {args.out}")
    return EXIT_OK


# ---- predict ----------------------------------------------------------------------
def _cmd_predict(args, argv) -> int:
    from .api import fit
    from .predict import predict
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq"))
    F, df = _read(args, [args.index], prog)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit(df, args.formula, index=args.index, progress=prog)
    st = _status(res)
    prog.say(f"loglik {res.loglik:.6f}, {st}; predicting the random effects")
    eff = predict(res)
    _write_parquet(eff, args.out, "--out")
    prog.say(f"wrote {args.out} ({eff.height:,} rows)")
    if not args.quiet:
        print(eff)
    if st != "ok":
        print(f"mlsem predict: the fit is {st}; predictions written but flagged", file=sys.stderr)
        return EXIT_FLAGGED
    return EXIT_OK


# ---- diagram ----------------------------------------------------------------------
def _cmd_diagram(args, argv) -> int:
    import importlib
    dg = importlib.import_module(".diagram", __package__)  # the module (mlsem.diagram is also a function)
    prog = Progress(args.quiet)
    fmt = dg.format_of(args.out)
    _check_out(args.out, "--out")
    if fmt != "dot" and not dg.have_graphviz():
        raise MlsemError(dg.NO_GRAPHVIZ.format(out=args.out))
    code = EXIT_OK
    if args.data:
        from .api import fit
        F, df = _read(args, [args.index], prog)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = fit(df, args.formula, index=args.index, progress=prog)
        if _status(res) != "ok":
            code = EXIT_FLAGGED
        src = dg.to_dot(dg.from_result(res), max_slots=args.max_slots)
    else:
        design = _design(args.design)
        src = dg.to_dot(dg.from_formula(args.formula, design), max_slots=args.max_slots)
    dg.write(src, args.out)
    prog.say(f"wrote {args.out}")
    return code


def _design(text: str):
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise MlsemError(f"--design {text!r}: expected group sizes such as 2x2 (schools x pupils)")
    return sizes


# ---- wide -----------------------------------------------------------------------------
def _cmd_wide(args, argv) -> int:
    from .wide import to_wide
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq", ".csv"))
    prog.say(f"reading {args.data}")
    w = to_wide(args.data, args.formula, index=args.index, progress=prog)
    if args.out.lower().endswith(".csv"):
        _write(args.out, "--out", lambda tmp: w.write_csv(tmp))
    else:
        _write_parquet(w, args.out, "--out")
    prog.say(f"wrote {args.out}: {w.height:,} rows x {w.width:,} columns")
    return EXIT_OK


# ---- example ---------------------------------------------------------------------------
def _cmd_example(args, argv) -> int:
    from .api import fit
    from .simulate import example_data
    data = example_data()
    print("mlsem example: the seed's design, 100 counties x 2 schools x 2 pupils,")
    print("y = 2 x + U_k + V_jk + E_ijk (all sd 1); model y ~ x + (1 | k/j)\n")
    res = fit(data, "y ~ x + (1 | k/j)")
    print(res.summary())
    return 0 if res.converged else 1


# ---- parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlsem", description="Multilevel models as SEMs, fitted by FIML.",
                                epilog="exit codes: 0 success; 1 fitted but not converged / not "
                                       "identified / a --by group failed (results flagged); 2 bad input")
    p.add_argument("--version", action="version", version=f"mlsem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True, formula=True):
        if data:
            sp.add_argument("data", metavar="DATA", help="Parquet file, directory or glob of Parquet files, or CSV")
        if formula:
            sp.add_argument("--formula", "-f", required=True, help='lme4 formula, e.g. "y ~ x + (1 | k/j)"')
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr, no tables on stdout")

    f = sub.add_parser("fit", help="fit a model; write the parameter table (Parquet) and the fit record (JSON)")
    common(f)
    f.add_argument("--vce", default="mixed",
                   help="standard errors: mixed (lme4/xtmixed convention, default) or oim")
    f.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    f.add_argument("--by", metavar="COL", help="fit one model per value of COL and stack the tables")
    f.add_argument("--out", "-o", required=True, metavar="RESULTS.parquet")
    f.add_argument("--json", metavar="FIT.json", help="fit record: loglik, convergence, groups, tests, timings")
    f.set_defaults(func=_cmd_fit)

    s = sub.add_parser("simulate", help="simulate the seed's design (pupils in schools in counties)")
    s.add_argument("--counties", type=int, default=100)
    s.add_argument("--schools", default="2", help="schools per county: a count or a range such as 1-10")
    s.add_argument("--pupils", default="2", help="pupils per school: a count or a range such as 1-20")
    s.add_argument("--sd-county", type=float, default=1.0)
    s.add_argument("--sd-school", type=float, default=1.0)
    s.add_argument("--sd-resid", type=float, default=1.0)
    s.add_argument("--school-cov", metavar='"1.5,0.6;0.6,1.0"',
                   help="covariance of the school effects by slot (replaces --sd-school)")
    s.add_argument("--intercept", type=float, default=0.0)
    s.add_argument("--slope", type=float, default=2.0, help="coefficient of x")
    s.add_argument("--x", choices=("uniform", "normal"), default="uniform")
    s.add_argument("--regions", type=int, help="add a column 'region' splitting the counties into N blocks")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", "-o", required=True, metavar="DATA.parquet")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=_cmd_simulate)

    pr = sub.add_parser("predict", help="empirical Bayes predictions (posterior mean, sd) of every random effect")
    common(pr)
    pr.add_argument("--index", metavar="COL")
    pr.add_argument("--out", "-o", required=True, metavar="EFFECTS.parquet")
    pr.set_defaults(func=_cmd_predict)

    d = sub.add_parser("diagram", help="path diagram of the model (DOT; SVG/PNG through Graphviz)")
    d.add_argument("data", metavar="DATA", nargs="?",
                   help="optional: fit the model on DATA and put the estimates on the paths")
    d.add_argument("--formula", "-f", required=True)
    d.add_argument("--design", default="2x2",
                   help="without DATA: group sizes below the top level, e.g. 2x2 = 2 schools x 2 pupils")
    d.add_argument("--max-slots", type=int, default=8,
                   help="draw at most this many slots; more collapse into boxes with a count")
    d.add_argument("--index", metavar="COL")
    d.add_argument("--out", "-o", required=True, metavar="MODEL.dot|.svg|.png")
    d.add_argument("--quiet", "-q", action="store_true")
    d.set_defaults(func=_cmd_diagram)

    w = sub.add_parser("wide", help="the wide form: one row per top-level unit, one column per slot")
    common(w)
    w.add_argument("--index", metavar="COL")
    w.add_argument("--out", "-o", required=True, metavar="WIDE.parquet")
    w.set_defaults(func=_cmd_wide)

    ex = sub.add_parser("example", help="fit the embedded example data and print the tables")
    ex.set_defaults(func=_cmd_example)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, argv)
    except MlsemError as exc:
        print(f"mlsem {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mlsem {args.command}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so, exit 3
        import traceback
        traceback.print_exc()
        print(f"mlsem {args.command}: internal error ({type(exc).__name__}: {exc}); nothing written. "
              "Please report it.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
