# Reference values for tests/api/test_multivariate_fixes.py (nlme lme, ML, stacked data).
# Input: the shipped data mlsem/datasets/multivariate.parquet written as CSV (R has no arrow here):
#   python3 -c "import polars as pl; pl.read_parquet('mlsem/datasets/multivariate.parquet').write_csv('/tmp/mv.csv')"
#   Rscript tests/reference/extra/multivariate_extra.R /tmp/mv.csv tests/reference/extra/multivariate_extra.json
# Cases:
#  two_level:  y1 ~ x + (1 | k), y2 ~ x + (1 | k)     (one grouping level: pupils in counties)
#  unit_missing: y1 ~ x + (1 | k/j), y2 ~ x + (1 | k/j) with y2 set missing for every pupil of
#    counties 1 and 2 and of school (k=3, j=1): their y2 random effects are defined only through
#    the cross-outcome covariance; ranef() of k and k/j stored for those units.
suppressMessages({library(nlme); library(jsonlite)})
args <- commandArgs(TRUE)
d <- read.csv(args[1])
stack <- function(d) {
  d$pupil <- seq_len(nrow(d))
  s <- rbind(data.frame(k = d$k, j = d$j, pupil = d$pupil, x = d$x, value = d$y1, outcome = "y1", oi = 1L),
             data.frame(k = d$k, j = d$j, pupil = d$pupil, x = d$x, value = d$y2, outcome = "y2", oi = 2L))
  s <- s[!is.na(s$value), ]
  s$outcome <- factor(s$outcome, levels = c("y1", "y2"))
  s <- s[order(s$k, s$j, s$pupil, s$oi), ]
  s
}
ctl <- lmeControl(maxIter = 500, msMaxIter = 500, niterEM = 100, msTol = 1e-12, tolerance = 1e-10,
                  returnObject = TRUE)
covs <- function(fit, s) {
  sig <- fit$sigma
  vf <- coef(fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
  sds <- sig * vf[c("y1", "y2")]
  cr <- corMatrix(fit$modelStruct$corStruct)[[1]]
  cr <- cr[1:2, 1:2]
  R <- diag(sds) %*% cr %*% diag(sds)
  R
}
out <- list(program = paste("nlme", as.character(packageVersion("nlme")), "lme ML on the stacked data;",
                            R.version.string))
# ---- two-level -----------------------------------------------------------------------------
s <- stack(d)
f2 <- lme(value ~ 0 + outcome + outcome:x, data = s, method = "ML", control = ctl,
          random = list(k = pdSymm(~ 0 + outcome)), weights = varIdent(form = ~ 1 | outcome),
          correlation = corSymm(form = ~ oi | k/pupil))
out$two_level <- list(
  formula = c("y1 ~ x + (1 | k)", "y2 ~ x + (1 | k)"),
  loglik = as.numeric(logLik(f2)), nobs_values = nrow(s),
  fixed = as.list(fixef(f2)), fixed_se = as.list(sqrt(diag(vcov(f2)))),
  cov_k = matrix(as.numeric(getVarCov(f2)), 2), cov_residual = unname(covs(f2, s)))
# ---- a county / a school without y2 ---------------------------------------------------------
dm <- d
dm$y2[dm$k %in% c(1, 2) | (dm$k == 3 & dm$j == 1)] <- NA
sm <- stack(dm)
f3 <- lme(value ~ 0 + outcome + outcome:x, data = sm, method = "ML", control = ctl,
          random = list(k = pdSymm(~ 0 + outcome), j = pdSymm(~ 0 + outcome)),
          weights = varIdent(form = ~ 1 | outcome),
          correlation = corSymm(form = ~ oi | k/j/pupil))
re <- ranef(f3)
rk <- re$k[c("1", "2", "3", "4"), ]
rj <- re$j[c("1/1", "1/2", "2/1", "3/1", "3/2"), , drop = FALSE]
rj <- rj[!is.na(rj[, 1]), ]
out$unit_missing <- list(
  formula = c("y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"),
  y2_missing = "k in (1, 2) or (k = 3 and j = 1)",
  loglik = as.numeric(logLik(f3)), nobs_values = nrow(sm),
  fixed = as.list(fixef(f3)),
  ranef_k = list(k = as.integer(rownames(rk)), y1 = rk[, "outcomey1"], y2 = rk[, "outcomey2"]),
  ranef_j = list(kj = rownames(rj), y1 = rj[, "outcomey1"], y2 = rj[, "outcomey2"]))
writeLines(toJSON(out, auto_unbox = TRUE, digits = 15, pretty = TRUE), args[2])
