"""Several outcomes against one (issue 15): the medium design with two correlated outcomes
per pupil, the bivariate fit timed against the univariate fit of the same rows.

    python benchmarks/run.py --multivariate --sizes 1150000     # via the suite
    python benchmarks/multivariate.py 1150000 [more sizes]      # alone

Data: ``mlsem.simulate`` with run.py's design and seed gives y1 (= y) and x; y2 = -0.5 +
0.3 x + 0.5 y1 + U2_k + V2_jk + E2 (sd 0.6, 0.5, 0.8), so the county effects, school effects
and residuals of y1 and y2 are correlated.  Each fit runs in a fresh process
(worker.py), the univariate (``y1 ~ x + (1 | k/j)``) and bivariate fits interleaved (the
machine may be shared), ``repeats`` times; the ratio is of the medians.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

UNI = "y1 ~ x + (1 | k/j)"
BI = "y1 ~ x + (1 | k/j) ;; y2 ~ x + (1 | k/j)"


def simulated_bivariate(rows: int, outdir: str) -> str:
    import numpy as np
    import polars as pl
    import mlsem
    from run import ROWS_PER_COUNTY, SEED
    counties = max(1, round(rows / ROWS_PER_COUNTY))
    path = os.path.join(outdir, f"bivariate_{rows}.parquet")
    if os.path.exists(path):
        return path
    df = mlsem.simulate(counties, (1, 10), (1, 20), intercept=1.0, slope=0.8, sd_county=1.0,
                        sd_school=0.7, sd_resid=1.0, x="normal", seed=SEED)
    rng = np.random.default_rng(SEED + 1)
    k, j = df["k"].to_numpy(), df["j"].to_numpy()
    school = np.cumsum(np.r_[True, (k[1:] != k[:-1]) | (j[1:] != j[:-1])]) - 1
    u2 = rng.normal(0.0, 0.6, k.max() + 1)[k]
    v2 = rng.normal(0.0, 0.5, school.max() + 1)[school]
    y2 = (-0.5 + 0.3 * df["x"].to_numpy() + 0.5 * df["y"].to_numpy() + u2 + v2
          + rng.normal(0.0, 0.8, len(k)))
    df.rename({"y": "y1"}).with_columns(pl.Series("y2", y2)).write_parquet(path)
    return path


def run(sizes, repeats=3, outdir=os.path.join(HERE, "results"), threads=None, log=print):
    """{size: {"univariate": [...], "bivariate": [...], "ratio": median ratio}}."""
    from run import command, run_once
    os.makedirs(os.path.join(outdir, "data"), exist_ok=True)
    out = {}
    for n in sizes:
        path = simulated_bivariate(n, os.path.join(outdir, "data"))
        runs = {"univariate": [], "bivariate": []}
        for r in range(repeats):
            for name, formula in (("univariate", UNI), ("bivariate", BI)):
                res, peak = run_once(command("mlsem", {"path": path, "formula": formula}, threads),
                                     timeout=3600)
                if "error" in res:
                    raise SystemExit(f"{name} fit on {n} rows failed: {res['error']}")
                res["peak_mb"] = peak
                runs[name].append(res)
                log(f"  {n:,} rows, {name} run {r + 1}: {res['seconds']:.2f} s, "
                    f"{res['evaluations']} evaluations")
        med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
        out[n] = {**runs, "median_seconds": med, "ratio": med["bivariate"] / med["univariate"]}
    lines = ["| rows (pupils) | cells | univariate s | bivariate s | ratio |", "|---|---|---|---|---|"]
    for n, v in out.items():
        lines.append(f"| {n:,} | ~{2 * n:,} | {v['median_seconds']['univariate']:.2f} | "
                     f"{v['median_seconds']['bivariate']:.2f} | {v['ratio']:.2f} |")
    log("\n".join(lines))
    with open(os.path.join(outdir, "multivariate.json"), "w") as f:
        json.dump({str(k): v for k, v in out.items()}, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    run([int(a) for a in sys.argv[1:]] or [1_150_000])
