"""Thread scaling of one log-likelihood + gradient evaluation (Model.evaluate).

    python benchmarks/threads.py <data.parquet> [formula] [repeats]

Builds the model once, then times evaluate(psi) at the starting values with
1 and with 2 threads, alternating (so a busy machine slows both alike), and
prints JSON: median seconds per thread count and the ratio 2 threads / 1 thread.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlsem.data.prepare import collect_columns, prepare  # noqa: E402
from mlsem.estimate.optimize import start_values  # noqa: E402
from mlsem.spec.formula import nest_levels, parse_formula  # noqa: E402
from mlsem.model.multilevel import Model  # noqa: E402
from mlsem.spec.table import multilevel_table  # noqa: E402


def main(path, formula="y ~ x + (1 | k/j)", repeats=21):
    F = parse_formula(formula)
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    df = collect_columns(path, F.columns, [F.outcome] + list(F.fixed), [lv[-1] for lv in levels])
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects)
    table = multilevel_table(prep, F, levels)
    models = {nt: Model(prep, table, nthreads=nt) for nt in (1, 2)}
    psi = start_values(models[1])
    times = {1: [], 2: []}
    for nt in (1, 2):
        models[nt].evaluate(psi)    # warm up
    for _ in range(repeats):
        for nt in (1, 2):
            t0 = time.perf_counter()
            models[nt].evaluate(psi)
            times[nt].append(time.perf_counter() - t0)
    med = {nt: statistics.median(v) for nt, v in times.items()}
    return {"rows": prep.nobs, "patterns": prep.npatterns, "repeats": repeats,
            "seconds_1_thread": med[1], "seconds_2_threads": med[2],
            "ratio_2_to_1": med[2] / med[1],
            "threads_used": models[2]._nt}


if __name__ == "__main__":
    args = sys.argv[1:]
    out = main(args[0], *(args[1:2] or []), *([int(args[2])] if len(args) > 2 else []))
    print(json.dumps(out))
