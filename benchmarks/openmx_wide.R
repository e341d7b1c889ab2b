## openmx_wide.R -- one timed OpenMx FIML fit of the wide SEM form (mlsem benchmark suite).
## Usage: Rscript openmx_wide.R <wide.csv> <spec.json> <threads>
## spec.json (written by benchmarks/run.py): slots (the y column of each slot),
## group (the inner-level slot group of each slot, 1-based), covariates
## (per covariate, the column of each slot: definition variables).
## Matrix specification: Sigma = Lambda Phi Lambda' + se I, mu = c + sum_b b x_slot.
suppressPackageStartupMessages({
  library(OpenMx)
  library(jsonlite)
})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
spec <- fromJSON(args[2])
mxOption(NULL, "Number of Threads", as.integer(args[3]))
ys <- spec$slots
P <- length(ys)
G <- max(spec$group)
lam <- matrix(0, P, 1 + G)
lam[, 1] <- 1
lam[cbind(seq_len(P), 1 + spec$group)] <- 1
mats <- list(
  mxMatrix("Full", P, 1 + G, free = FALSE, values = lam, name = "Lambda"),
  mxMatrix("Diag", 1 + G, 1 + G, free = TRUE, values = 1, lbound = 0,
           labels = c("su", rep("sv", G)), name = "Phi"),
  mxMatrix("Diag", P, P, free = TRUE, values = 1, lbound = 1e-6, labels = "se", name = "Theta"),
  mxAlgebra(Lambda %*% Phi %*% t(Lambda) + Theta, name = "Sigma"),
  mxMatrix("Full", 1, P, free = TRUE, values = 0, labels = "c", name = "cvec"))
mu <- "cvec"
for (nm in names(spec$covariates)) {
  cols <- spec$covariates[[nm]]
  mats[[length(mats) + 1]] <- mxMatrix("Full", 1, 1, free = TRUE, values = 0,
                                       labels = paste0("b_", nm), name = paste0("B_", nm))
  mats[[length(mats) + 1]] <- mxMatrix("Full", 1, P, free = FALSE,
                                       labels = paste0("data.", cols), name = paste0("X_", nm))
  mu <- paste0(mu, " + B_", nm, " %x% X_", nm)
}
mats[[length(mats) + 1]] <- eval(parse(text = paste0("mxAlgebra(", mu, ", name = 'mu')")))
model <- do.call(mxModel, c(list("wide"), mats, list(
  mxExpectationNormal(covariance = "Sigma", means = "mu", dimnames = ys),
  mxFitFunctionML(), mxData(d, type = "raw"))))
t0 <- proc.time()[["elapsed"]]
fit <- mxRun(model, silent = TRUE, suppressWarnings = TRUE)
t1 <- proc.time()[["elapsed"]]
cat(toJSON(list(seconds = t1 - t0, loglik = -0.5 * fit$output$Minus2LogLikelihood,
                program = paste0("OpenMx ", packageVersion("OpenMx"), " on ", R.version.string,
                                 ": FIML, matrix specification, ", args[3], " threads")),
           auto_unbox = TRUE, digits = NA), "\n")
