"""What Satterthwaite degrees of freedom add to a REML fit (issue 18: <= 50% on
medium).  Interleaved runs, medians; a benchmark, not a unit test.

    python benchmarks/satterthwaite_cost.py [--parquet tests/reference/medium.parquet] [--repeats 5]
"""
import argparse
import os
import statistics
import time

import mlsem

HERE = os.path.dirname(os.path.abspath(__file__))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--parquet", default=os.path.join(HERE, "..", "tests", "reference", "medium.parquet"))
ap.add_argument("--formula", default="y ~ x + (1 | k/j)")
ap.add_argument("--repeats", type=int, default=5)
a = ap.parse_args()
plain, df_time, total = [], [], []
for _ in range(a.repeats):
    t0 = time.perf_counter()
    mlsem.fit(a.parquet, a.formula, method="reml")
    plain.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = mlsem.fit(a.parquet, a.formula, method="reml", df="satterthwaite")
    total.append(time.perf_counter() - t0)
    df_time.append(res.timings["df"])
mp, md = statistics.median(plain), statistics.median(df_time)
print(f"REML fit {mp:.3f} s; Satterthwaite df {md:.3f} s ({md / mp:.1%} of the fit; target <= 50%); "
      f"fit with df {statistics.median(total):.3f} s  (medians of {a.repeats})")
