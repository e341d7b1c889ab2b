"""The wide SEM of ``unbalanced`` (issue 14, target 4): mlsem.sem against OpenMx.

    python benchmarks/wide_ratio.py [--repeats 5] [--threads 2]

Each fit runs in a fresh process (benchmarks/worker.py mlsem-sem and
benchmarks/openmx_wide.R through run.py's ``command`` / ``run_once``), the two
tools interleaved (mlsem, OpenMx, mlsem, OpenMx, ...), so that a busy machine
slows both alike.  Prints per tool the median wall time of the timed region
(mlsem: the ``mlsem.sem`` call, standard errors included; OpenMx: ``mxRun``),
mlsem's median CPU time (time.process_time) of the same region, and the ratio
of the medians (target: <= 0.07).  ``--base DIR``: also runs the worker of
another checkout of mlsem (e.g. the commit before a change, built in place)
as the tool ``base``, interleaved with the others: a before/after comparison
on the same (busy) machine."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="OpenMx threads (as run.py)")
    ap.add_argument("--tools", nargs="*", default=["mlsem-sem", "OpenMx"])
    ap.add_argument("--base", default=None, help="another mlsem checkout to time as the tool 'base'")
    a = ap.parse_args(argv)
    if a.base:
        a.tools = ["base"] + a.tools
    with tempfile.TemporaryDirectory() as tmp:
        csv, lav, spec, rows, slots = run.wide_form(run.WIDE_CASE, run.WIDE_FORMULA, tmp)
        case = {"wide_csv": csv, "lav": lav, "spec": spec}
        got = {t: [] for t in a.tools}
        for r in range(a.repeats):
            for t in a.tools:
                cmd = ([sys.executable, os.path.join(os.path.abspath(a.base), "benchmarks", "worker.py"),
                        "mlsem-sem", csv, lav] if t == "base" else run.command(t, case, a.threads))
                res, _ = run.run_once(cmd, 600)
                if "error" in res:
                    raise SystemExit(f"{t}: {res['error']}")
                got[t].append(res)
                extra = f" cpu {res['cpu']:.4f}" if "cpu" in res else ""
                print(f"run {r + 1} {t:10s} {res['seconds']:.4f} s{extra}  loglik {res['loglik']:.6f}"
                      + (f"  evals {res['evaluations']}" if "evaluations" in res else ""), flush=True)
    med = {t: statistics.median(x["seconds"] for x in v) for t, v in got.items()}
    print(f"\n{rows} rows, {slots} slots, {a.repeats} interleaved runs each (medians)")
    for t, v in got.items():
        cpu = [x["cpu"] for x in v if "cpu" in x]
        print(f"  {t:10s} wall {med[t]:.4f} s" + (f"  cpu {statistics.median(cpu):.4f} s" if cpu else ""))
    for t in ("base", "mlsem-sem"):
        if t in med and "OpenMx" in med:
            print(f"  ratio {t} / OpenMx = {med[t] / med['OpenMx']:.4f} (target <= 0.07)")


if __name__ == "__main__":
    main()
