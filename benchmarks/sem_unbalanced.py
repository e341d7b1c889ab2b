"""The `unbalanced` reference case as a wide SEM (24 slots, 300 rows), fitted by
mlsem.sem and, side by side where R is installed, by OpenMx and lavaan.

    python benchmarks/sem_unbalanced.py            # mlsem, and OpenMx via Rscript
    python benchmarks/sem_unbalanced.py --lavaan   # also lavaan (about 90 s)

Every program fits the same model: the constrained SEM of ``y ~ x1 + z + (1 | k/j)``
(mlsem.multilevel(...).to_syntax()), conditional on the per-slot covariates,
by FIML.  OpenMx takes the covariates as definition variables (an empty slot's
are set to 0: its y is missing, so they do not enter the likelihood); lavaan
takes them as fixed.x covariates, zero-filled the same way (its log-likelihood
then differs by 0.011, see tests/reference/README_shared.md).  Timings are wall
clock of the fit alone (data already in memory), best of ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mlsem  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "tests", "reference", "unbalanced.parquet")
FORMULA = "y ~ x1 + z + (1 | k/j)"

R_OPENMX = r"""
suppressMessages(library(OpenMx))
mxOption(NULL, "Number of Threads", 1)
args <- commandArgs(TRUE)
d <- read.csv(args[1])
st <- jsonlite::fromJSON(args[2])
ycols <- st$y; P <- length(ycols); M <- st$M
Lv <- matrix(as.numeric(as.matrix(st$load)), nrow = P)  # fromJSON gives the P x M matrix
lat_lab <- unlist(st$latent_label)
X1 <- mxMatrix("Full", 1, P, free = FALSE, labels = paste0("data.", st$x1), name = "X1")
Z <- mxMatrix("Full", 1, P, free = FALSE, labels = paste0("data.", st$z), name = "Z")
L <- mxMatrix("Full", P, M, free = FALSE, values = Lv, name = "L")
Ph <- mxMatrix("Diag", M, M, free = TRUE, values = 1, labels = lat_lab, lbound = 0, name = "Ph")
Th <- mxMatrix("Diag", P, P, free = TRUE, values = 1, labels = "se", lbound = 1e-6, name = "Th")
B <- mxMatrix("Full", 1, 3, free = TRUE, values = 0, labels = c("c", "b_x1", "b_z"), name = "B")
S <- mxAlgebra(L %*% Ph %*% t(L) + Th, name = "S", dimnames = list(ycols, ycols))
Mu <- mxAlgebra(B[1, 1] + B[1, 2] * X1 + B[1, 3] * Z, name = "Mu", dimnames = list(NULL, ycols))
for (v in c(st$x1, st$z)) d[[v]][is.na(d[[v]])] <- 0
m <- mxModel("wide", X1, Z, L, Ph, Th, B, S, Mu,
             mxExpectationNormal(covariance = "S", means = "Mu", dimnames = ycols),
             mxFitFunctionML(), mxData(d, type = "raw"))
best <- Inf
for (r in seq_len(as.integer(args[3]))) {
  t <- system.time(fit <- mxRun(m, silent = TRUE, suppressWarnings = TRUE))[["elapsed"]]
  best <- min(best, t)
}
est <- omxGetParameters(fit)
cat(jsonlite::toJSON(list(program = paste("OpenMx", packageVersion("OpenMx")), seconds = best,
                          loglik = -0.5 * fit$output$fit, estimates = as.list(est)),
                     auto_unbox = TRUE, digits = NA), "\n")
"""

R_LAVAAN = r"""
suppressMessages(library(lavaan))
args <- commandArgs(TRUE)
d <- read.csv(args[1])
st <- jsonlite::fromJSON(args[2])
for (v in c(st$x1, st$z)) d[[v]][is.na(d[[v]])] <- 0
model <- paste(readLines(args[3]), collapse = "\n")
t <- system.time(fit <- sem(model, data = d, missing = "ml", fixed.x = TRUE))[["elapsed"]]
cat(jsonlite::toJSON(list(program = paste("lavaan", packageVersion("lavaan")), seconds = t,
                          loglik = as.numeric(logLik(fit)), estimates = as.list(coef(fit)[!duplicated(names(coef(fit)))])),
                     auto_unbox = TRUE, digits = NA), "\n")
"""


def run_r(code, args, tmp):
    path = os.path.join(tmp, "bench.R")
    with open(path, "w") as f:
        f.write(code)
    out = subprocess.run(["Rscript", path, *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lavaan", action="store_true", help="also run lavaan (slow: about 90 s)")
    ap.add_argument("--no-r", action="store_true", help="mlsem only")
    a = ap.parse_args()
    d = pl.read_parquet(DATA)
    spec = mlsem.multilevel(FORMULA, d)
    wide, syntax = spec.to_wide(d), spec.to_syntax()
    res = mlsem.sem(syntax, wide)          # warm-up (imports, first-call costs)
    best = np.inf
    for _ in range(a.repeat):
        t = time.perf_counter()
        res = mlsem.sem(syntax, wide)
        best = min(best, time.perf_counter() - t)
    ref = mlsem.fit(d, FORMULA)
    print(f"unbalanced as a wide SEM: {spec.prep.nslots} slots, {wide.height} rows, "
          f"{len(wide.columns) - 1} columns; {res.nparams} free parameters")
    print(f"  mlsem {mlsem.__version__} sem(): {best:8.3f} s (best of {a.repeat}; fit + observed-information SEs), "
          f"loglik {res.loglik:.6f}, kernel {res.kernel}, {res.opt.evaluations} evaluations")
    print(f"  mlsem fit() on the long data:              loglik {ref.loglik:.6f} "
          f"(difference {res.loglik - ref.loglik:.2e})")
    out = {"mlsem": {"seconds": best, "loglik": res.loglik, "estimates": res.coef}}
    if not a.no_r and shutil.which("Rscript"):
        with tempfile.TemporaryDirectory() as tmp:
            csv = os.path.join(tmp, "wide.csv")
            wide.write_csv(csv)
            P, M = spec.prep.nslots, spec.prep.nlatent
            load = [[1.0 if (spec.prep.slot_lat[s] == g).any() else 0.0 for g in range(M)] for s in range(P)]
            lat_label = ["su" if g == 0 else "sv" for g in range(M)]
            st = {"y": spec.y_cols, "x1": spec.x_cols["x1"], "z": spec.x_cols["z"], "M": M,
                  "load": load, "latent_label": lat_label}
            sj = os.path.join(tmp, "structure.json")
            with open(sj, "w") as f:
                json.dump(st, f)
            om = run_r(R_OPENMX, [csv, sj, str(a.repeat)], tmp)
            out["openmx"] = om
            if "error" in om:
                print("  OpenMx failed:", om["error"])
            else:
                print(f"  {om['program']}:{'':<27}{om['seconds']:8.3f} s (best of {a.repeat}), "
                      f"loglik {om['loglik']:.6f}")
                print(f"  mlsem / OpenMx time: {best / om['seconds']:.1%}")
            if a.lavaan:
                syn = os.path.join(tmp, "model.lav")
                with open(syn, "w") as f:
                    f.write(syntax)
                lv = run_r(R_LAVAAN, [csv, sj, syn], tmp)
                out["lavaan"] = lv
                if "error" in lv:
                    print("  lavaan failed:", lv["error"])
                else:
                    print(f"  {lv['program']}:{'':<26}{lv['seconds']:8.3f} s (one run), loglik {lv['loglik']:.6f}")
    else:
        print("  (Rscript not found: OpenMx/lavaan not run)")
    return out


if __name__ == "__main__":
    main()
