"""The optimiser of issue 14 against the one before it, in one process
(docs/benchmarks.md, round three).

    python benchmarks/optimizer_ab.py <data.parquet> [repeats] [threads]

Fits ``y ~ x + (1 | k/j)`` once, then alternates, on a fresh ``Model`` each
time: the L-BFGS-B driver on the full data (``estimate.optimize.optimize``, the
old path) and ``estimate.grouped.optimize_auto`` (grouped data, Newton), each
followed by the observed information.  Prints medians of CPU seconds (this
process, all threads), evaluations, the grouping's CPU time and the CPU time of
one evaluation on the full and on the grouped data.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import mlsem  # noqa: E402
from mlsem.estimate.grouped import optimize_auto  # noqa: E402
from mlsem.estimate.optimize import information, optimize  # noqa: E402
from mlsem.model.multilevel import Model  # noqa: E402
from mlsem.model.reduced import reduce_model  # noqa: E402


def main(path, reps=5, nt=1):
    r = mlsem.fit(path, "y ~ x + (1 | k/j)", nthreads=nt)
    m0 = r.model
    out = {k: [] for k in ("old s", "new s", "old evaluations", "new evaluations",
                           "grouping s", "full evaluation s", "grouped evaluation s")}
    for _ in range(reps):
        for which in ("old", "new"):
            m = Model(m0.prep, m0.table, nthreads=nt)
            c0 = time.process_time()
            o = optimize(m) if which == "old" else optimize_auto(m)
            information(m, o.final, o)
            out[f"{which} s"].append(time.process_time() - c0)
            out[f"{which} evaluations"].append(o.evaluations)
        c0 = time.process_time()
        red, _ = reduce_model(m)
        out["grouping s"].append(time.process_time() - c0)
        for key, mod in (("full evaluation s", m), ("grouped evaluation s", red)):
            c0 = time.process_time()
            for _ in range(5):
                mod.evaluate(r.estimate)
            out[key].append((time.process_time() - c0) / 5)
    print(f"{path}: {m0.prep.nobs:,} observations, {nt} thread(s), {reps} repeats (medians)")
    for k, v in out.items():
        print(f"  {k:22s} {np.median(v):.4f}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]) if len(a) > 1 else 5, int(a[2]) if len(a) > 2 else 1)
