"""Honest under load (issue 14, item 6): a fit beside CPU-bound processes.

    python benchmarks/load.py                          # tests/reference/medium.parquet
    python benchmarks/load.py data.parquet --formula "y ~ x + (1 | k/j)" --repeats 7 --burners 2

Every fit runs in a fresh process (``worker.py mlsem``: Parquet file to
results, standard errors included).  Quiet and loaded fits alternate, so that
whatever else the machine does slows both alike; a loaded fit runs while
``--burners`` plain Python busy loops (one core each) run beside it; they are
started just before it and stopped (by their own process ids) just after.
Prints the median seconds of each, their ratio (issue 14: <= 3 with two
burners), the thread settings the fit sees (OpenMP wait policy, OpenMP and
BLAS threads as threadpoolctl reports them), and with ``--json`` writes all of it.

Why it can go wrong: a thread pool that spin-waits between parallel regions
(OpenMP's default ACTIVE policy, OpenBLAS's busy threads) keeps a core while it
waits for one that the burners hold, and a fit on 2 busy cores then takes
many times its quiet time.  mlsem sets OMP_WAIT_POLICY=PASSIVE before its
kernel loads the OpenMP runtime and pins BLAS to one thread around the
optimiser and inside evaluations (threadpoolctl).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT = os.path.join(ROOT, "tests", "reference", "medium.parquet")

SETTINGS = r"""
import json, os
import mlsem.model.multilevel as m
info = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "kernel_openmp": bool(m._core is not None and m._core.HAVE_OPENMP),
        "default_threads": m.default_threads()}
try:
    from threadpoolctl import threadpool_info
    info["pools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads")}
                     for p in threadpool_info()]
except Exception as exc:
    info["pools"] = f"threadpoolctl unavailable: {exc}"
print(json.dumps(info))
"""


def fit_once(path, formula, threads):
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "mlsem", path, formula]
    if threads:
        cmd.append(str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def burners(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", default=DEFAULT)
    ap.add_argument("--formula", default="y ~ x + (1 | k/j)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="mlsem threads (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    settings = json.loads(subprocess.run([sys.executable, "-c", SETTINGS], capture_output=True,
                                         text=True, check=True, cwd=ROOT).stdout)
    fit_once(a.data, a.formula, a.threads)          # warm the file cache
    quiet, loaded = [], []
    for _ in range(a.repeats):
        quiet.append(fit_once(a.data, a.formula, a.threads)["seconds"])
        procs = burners(a.burners)
        try:
            time.sleep(0.2)                           # the burners are running
            loaded.append(fit_once(a.data, a.formula, a.threads)["seconds"])
        finally:
            stop(procs)
    q, l = statistics.median(quiet), statistics.median(loaded)
    out = {"data": os.path.basename(a.data), "formula": a.formula, "repeats": a.repeats,
           "burners": a.burners, "quiet_s": q, "loaded_s": l, "ratio": l / q,
           "quiet_runs": quiet, "loaded_runs": loaded, "settings": settings,
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    print(f"{out['data']}: quiet {q:.3f} s, beside {a.burners} busy processes {l:.3f} s, "
          f"ratio {l / q:.2f} (medians of {a.repeats} alternating runs; {out['cpus']} CPUs)")
    print(f"settings: {json.dumps(settings)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
