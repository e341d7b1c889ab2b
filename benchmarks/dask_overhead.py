"""What the Dask backend costs against an in-process fit.

For each size: simulated data (counties with 1-10 schools of 1-20 pupils,
``mlsem.simulate``), rows shuffled and written as 8 Parquet files that are NOT
partitioned by the county id; then

  in-process   mlsem.fit(glob, formula)                     (OpenMP threads: all cores)
  dask         mlsem.fit(glob, formula, backend="dask", client=...) on a
               LocalCluster of N worker processes, 1 thread each

and, at the estimates, the time of one evaluation (loglik + gradient) in
process and on the cluster (medians), and the round trip alone (psi sent to
every partition, a gradient-sized answer back, no likelihood work): the
per-evaluation communication cost.

    python benchmarks/dask_overhead.py                     # 100k and 1M rows
    python benchmarks/dask_overhead.py --counties 20000    # the 1.15M-row design
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlsem  # noqa: E402
from mlsem.backends import dask as D  # noqa: E402
from mlsem.spec.formula import nest_levels, parse_formula  # noqa: E402

FORMULA = "y ~ x + (1 | k/j)"


def write_files(df, d, nfiles=8, seed=1):
    perm = np.random.default_rng(seed).permutation(df.height)
    sh = df[perm]
    b = np.linspace(0, df.height, nfiles + 1).astype(int)
    for f in range(nfiles):
        sh[b[f]:b[f + 1]].write_parquet(os.path.join(d, f"part-{f}.parquet"))
    return os.path.join(d, "*.parquet")


def per_eval(model, psi, reps):
    """Median seconds of one evaluation (loglik + gradient)."""
    model.evaluate(psi)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        model.evaluate(psi)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def run(counties, client, reps, nworkers):
    df = mlsem.simulate(counties, (1, 10), (1, 20), seed=counties)
    with tempfile.TemporaryDirectory() as d:
        glob = write_files(df, d)
        t = time.perf_counter()
        r0 = mlsem.fit(glob, FORMULA)
        t_in = time.perf_counter() - t
        t = time.perf_counter()
        r1 = mlsem.fit(glob, FORMULA, backend="dask", client=client)
        t_dk = time.perf_counter() - t
        F = parse_formula(FORMULA)
        t = time.perf_counter()
        dm = D.build(glob, client, F, nest_levels(F), {0: ["Intercept"], 1: ["Intercept"]}, None)
        t_build = time.perf_counter() - t
        e_in = per_eval(r0.model, r0.estimate, reps)
        e_dk = per_eval(dm, r0.estimate, reps)
        rt = float(np.median([dm.round_trip(r0.estimate) for _ in range(reps)]))
        dm.close()
    return {
        "rows": df.height, "counties": counties, "in_fit": t_in, "dask_fit": t_dk,
        "in_prepare": r0.timings["prepare"], "dask_prepare": r1.timings["prepare"],
        "dask_build": t_build, "evals_in": r0.opt.evaluations, "evals_dask": r1.opt.evaluations,
        "eval_in": e_in, "eval_dask": e_dk, "round_trip": rt,
        "dll": abs(r0.loglik - r1.loglik),
        "dest": float(np.max(np.abs(r0.estimate / r1.estimate - 1))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counties", type=int, nargs="*", default=[1730, 17300],
                    help="sizes (about 58 rows per county); default 100k and 1M rows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20, help="evaluations timed per size")
    a = ap.parse_args()
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    print(f"mlsem {mlsem.__version__}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; LocalCluster: {a.workers} worker processes x 1 thread; "
          f"formula {FORMULA}; 8 Parquet files not partitioned by k")
    hdr = ("rows", "fit in-proc s", "fit dask s", "prepare in/dask s", "evals in/dask",
           "eval in-proc ms", "eval dask ms", "dask - in-proc ms", "round trip ms", "|dloglik|", "max rel dest")
    print(" | ".join(hdr))
    try:
        for c in a.counties:
            r = run(c, client, a.reps, a.workers)
            print(f"{r['rows']:,} | {r['in_fit']:.2f} | {r['dask_fit']:.2f} | "
                  f"{r['in_prepare']:.2f}/{r['dask_prepare']:.2f} | "
                  f"{r['evals_in']}/{r['evals_dask']} | {1e3 * r['eval_in']:.2f} | "
                  f"{1e3 * r['eval_dask']:.2f} | {1e3 * (r['eval_dask'] - r['eval_in']):.2f} | "
                  f"{1e3 * r['round_trip']:.2f} | "
                  f"{r['dll']:.1e} | {r['dest']:.1e}", flush=True)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
