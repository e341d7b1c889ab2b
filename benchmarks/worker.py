"""One timed fit in a fresh process (so that its peak memory is its own).

    python benchmarks/worker.py mlsem <data.parquet> <formula> [threads]
        (formulas joined by " ;; ": several outcomes fitted jointly, mlsem.fit with a list)
    python benchmarks/worker.py statsmodels <data.parquet> <formula>
    python benchmarks/worker.py mixedlm <data.parquet> <formula>
    python benchmarks/worker.py mlsem-sem <wide.csv> <model.lav>

Prints one JSON object: seconds, loglik, program (and, for mlsem, the
optimiser's iterations and evaluations).  mlsem is timed end to end from the
Parquet file to the results object; statsmodels from an in-memory pandas frame
(reading excluded) to its results; mlsem-sem (the wide SEM in lavaan syntax)
from the frame read from the CSV file (reading excluded, as for OpenMx and
lavaan) to its results, standard errors included.
"""
import json
import os
import sys
import time


def run_mlsem(path, formula, threads=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mlsem
    if " ;; " in formula:
        formula = formula.split(" ;; ")
    t0 = time.perf_counter()
    r = mlsem.fit(path, formula, nthreads=threads)
    sec = time.perf_counter() - t0
    return {"seconds": sec, "loglik": r.loglik, "program": f"mlsem {mlsem.__version__}",
            "iterations": r.opt.iterations, "evaluations": r.opt.evaluations,
            "timings": r.timings}


def run_mlsem_sem(csv, lav):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import polars as pl
    import mlsem
    d = pl.read_csv(csv, null_values="NA")
    with open(lav) as f:
        syntax = f.read()
    t0, c0 = time.perf_counter(), time.process_time()
    r = mlsem.sem(syntax, d)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": sec, "cpu": cpu, "loglik": r.loglik, "program": f"mlsem {mlsem.__version__} sem()",
            "iterations": r.opt.iterations, "evaluations": r.opt.evaluations}


def run_statsmodels(path, formula):
    import polars as pl
    import statsmodels
    import statsmodels.formula.api as smf
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mlsem.spec.formula import nest_levels, parse_formula
    F = parse_formula(formula)
    levels = nest_levels(F)
    top, inner = levels[0][-1], levels[1][-1]
    df = pl.read_parquet(path).to_pandas()
    rhs = " + ".join(F.fixed) if F.fixed else "1"
    t0 = time.perf_counter()
    md = smf.mixedlm(f"{F.outcome} ~ {rhs}", df, groups=top, re_formula="1",
                     vc_formula={inner: f"0 + C({inner})"})
    res = md.fit(reml=False)
    sec = time.perf_counter() - t0
    return {"seconds": sec, "loglik": float(res.llf),
            "program": f"statsmodels {statsmodels.__version__} MixedLM (ML)"}


def run_mixedlm(path, formula):
    """mixedlm (pip install mixedlm: lme4's algorithm with a Rust core), ML,
    from an in-memory pandas frame (reading not timed, as statsmodels), standard
    errors of the fixed effects (vcov) included."""
    import polars as pl
    import mixedlm
    df = pl.read_parquet(path).to_pandas()
    t0 = time.perf_counter()
    res = mixedlm.lmer(formula, df, REML=False)
    se = res.vcov()
    sec = time.perf_counter() - t0
    ll = res.logLik()
    ll = float(getattr(ll, "value", ll))
    del se
    return {"seconds": sec, "loglik": ll,
            "program": f"mixedlm {getattr(mixedlm, '__version__', '?')} lmer (ML)",
            "evaluations": int(getattr(res, "function_evals", 0) or 0)}


if __name__ == "__main__":
    tool, path, formula = sys.argv[1:4]
    if tool == "mlsem":
        out = run_mlsem(path, formula, int(sys.argv[4]) if len(sys.argv) > 4 else None)
    elif tool == "statsmodels":
        out = run_statsmodels(path, formula)
    elif tool == "mixedlm":
        out = run_mixedlm(path, formula)
    elif tool == "mlsem-sem":
        out = run_mlsem_sem(path, formula)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    print(json.dumps(out))
