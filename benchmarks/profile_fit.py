"""Where the time of one fit goes (the steps of mlsem.fit, timed one by one).

    python benchmarks/profile_fit.py <data.parquet> [formula] [threads]

Prints, per step, wall and CPU seconds (CPU = this process, all threads), the
number of log-likelihood evaluations and the time per evaluation.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mlsem.estimate import optimize as estimate  # noqa: E402
from mlsem.data.prepare import collect_columns, prepare  # noqa: E402
from mlsem.spec.formula import nest_levels, parse_formula  # noqa: E402
from mlsem.model.multilevel import Model  # noqa: E402
from mlsem.spec.table import multilevel_table  # noqa: E402


def main(path, formula="y ~ x + (1 | k/j)", threads=None):
    rows = []
    clock = [time.perf_counter(), time.process_time()]

    def step(name, evals=None):
        w, c = time.perf_counter(), time.process_time()
        rows.append((name, w - clock[0], c - clock[1], evals))
        clock[:] = [time.perf_counter(), time.process_time()]

    F = parse_formula(formula)
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    df = collect_columns(path, F.columns, [F.outcome] + list(F.fixed), [lv[-1] for lv in levels])
    step("read Parquet (Polars scan, one collect)")
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects)
    step("prepare (ids -> slots, patterns, CSR arrays)")
    table = multilevel_table(prep, F, levels)
    model = Model(prep, table, nthreads=threads)
    step("parameter table, model")
    psi0 = estimate.start_values(model)
    step("start values (OLS)")
    n0 = model.nevals
    opt = estimate.optimize(model, start=psi0)
    step("optimize: L-BFGS-B + Newton polish (exact Hessian block of the (co)variances, differences for beta and Theta)",
         model.nevals - n0)
    n0 = model.nevals
    info = estimate.information(model, opt.final, opt)
    step("information (the polish's Hessian reused when the last step is negligible)",
         model.nevals - n0)
    print(f"{path}: {prep.nobs:,} observations, {prep.nrows:,} top-level units, "
          f"{prep.npatterns:,} patterns, {prep.nslots} slots, {model.nthreads} thread(s)")
    print(f"L-BFGS-B iterations {opt.iterations}, Newton steps {opt.newton_steps}, "
          f"evaluations {model.nevals}")
    print("| step | wall s | CPU s | evaluations | ms per evaluation (wall) |")
    print("|---|---:|---:|---:|---:|")
    for name, w, c, e in rows:
        per = f"{1000 * w / e:.1f}" if e else ""
        print(f"| {name} | {w:.3f} | {c:.3f} | {e if e is not None else ''} | {per} |")
    print(f"| total | {sum(r[1] for r in rows):.3f} | {sum(r[2] for r in rows):.3f} | | |")
    return rows, info


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1] if len(a) > 1 else "y ~ x + (1 | k/j)", int(a[2]) if len(a) > 2 else None)
