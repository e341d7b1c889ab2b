"""Time relaxed fits against the standard fit on the 115,699-row `medium` case.

    python benchmarks/relaxed_vs_standard.py [--repeat 3]

Prints the median wall time of each fit (of ``--repeat`` runs) and its ratio
to the standard fit (target: at most 3).  A script, not a timed unit test.
"""
import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mlsem  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1] / "tests" / "reference" / "medium.parquet"

FITS = [
    ("standard", "y ~ x + (1 | k/j)", {}),
    ("hetero variance by j slot", "y ~ x + (1 | k/j)", {"effects": {"j": {"variance": "slot"}}}),
    ("unstructured, no U", "y ~ x + (1 | k:j)", {"effects": {"j": {"variance": "slot", "covariance": "unstructured"}}}),
    ("residual variance by j slot", "y ~ x + (1 | k/j)", {"residuals": {"variance": "j"}}),
    ("slope by j slot", "y ~ x + (1 | k/j)", {"coefficients": {"x": "j"}}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="names of the fits to run (default: all)")
    a = ap.parse_args()
    base = None
    print(f"{'fit':<30} {'median s':>9} {'ratio':>6} {'params':>6} {'loglik':>16} {'iters':>6}")
    for name, formula, kw in FITS:
        if a.only and name != "standard" and name not in a.only:
            continue
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            res = mlsem.fit(DATA, formula, **kw)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        if base is None:
            base = med
        print(f"{name:<30} {med:>9.2f} {med / base:>6.2f} {res.nparams:>6} {res.loglik:>16.4f} "
              f"{res.opt.iterations:>6}  converged={res.converged}", flush=True)


if __name__ == "__main__":
    main()
