# Reference values for tests/api/test_multivariate_scale.py (nlme lme, ML, stacked data):
# two outcomes on very different scales (a time in milliseconds, variance ~1e7, and a
# proportion, variance ~1e-3), a three-level factor in the first outcome's formula only,
# string ids, both outcomes partly missing.
# The data: 60 counties, 157 schools, 705 pupils, simulated once (numpy default_rng(7)).
#   Rscript tests/reference/extra/multivariate_scale.R tests/reference/extra/multivariate_scale.csv \
#       tests/reference/extra/multivariate_scale.json
suppressMessages({library(nlme); library(jsonlite)})
args <- commandArgs(TRUE)
d <- read.csv(args[1], na.strings = c("", "NA"))
d$pupil <- seq_len(nrow(d))
one <- function(v, name, oi) {
  data.frame(county = d$county, school = paste(d$county, d$school, sep = "/"), pupil = d$pupil,
             value = v, oi = oi, outcome = name,
             d1 = as.numeric(oi == 1), x1 = d$x * (oi == 1),
             A1 = as.numeric(d$grp == "trtA") * (oi == 1), B1 = as.numeric(d$grp == "trtB") * (oi == 1),
             d2 = as.numeric(oi == 2), x2 = d$x * (oi == 2))
}
# nlme itself is not scale-free: on the raw scales it stops at a lower log-likelihood
# (-4304.188, var(school:rt_ms) = 0.5). It is fitted on rescaled outcomes (seconds and per
# mille: a1 = 1/1000, a2 = 1000) and every value is transformed back below: fixed effects
# / a, covariances / (a a'), log-likelihood + n1 log(a1) + n2 log(a2) (the Jacobian).
a <- c(1 / 1000, 1000)
s <- rbind(one(d$rt_ms * a[1], "rt_ms", 1L), one(d$prop * a[2], "prop", 2L))
s <- s[!is.na(s$value), ]
s$outcome <- factor(s$outcome, levels = c("rt_ms", "prop"))
s <- s[order(s$county, s$school, s$pupil, s$oi), ]
ctl <- lmeControl(maxIter = 1000, msMaxIter = 1000, niterEM = 200, msTol = 1e-14, tolerance = 1e-12,
                  returnObject = TRUE)
fit <- lme(value ~ 0 + d1 + x1 + A1 + B1 + d2 + x2, data = s, method = "ML", control = ctl,
           random = list(county = pdSymm(~ 0 + outcome), school = pdSymm(~ 0 + outcome)),
           weights = varIdent(form = ~ 1 | outcome),
           correlation = corSymm(form = ~ oi | county/school/pupil))
sig <- fit$sigma
vf <- coef(fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
sds <- sig * vf[c("rt_ms", "prop")]
cr <- corMatrix(fit$modelStruct$corStruct)[[1]][1:2, 1:2]
vc <- lapply(pdMatrix(fit$modelStruct$reStruct), function(m) m * sig^2)
n1 <- sum(s$oi == 1); n2 <- sum(s$oi == 2)
aa <- outer(a, a)
fe <- fixef(fit); fa <- c(d1 = a[1], x1 = a[1], A1 = a[1], B1 = a[1], d2 = a[2], x2 = a[2])
out <- list(
  program = paste("nlme", as.character(packageVersion("nlme")), "lme ML on the stacked data;",
                  R.version.string),
  formula = c("rt_ms ~ x + grp + (1 | county/school)", "prop ~ x + (1 | county/school)"),
  rescaled = "outcomes fitted as rt_ms / 1000 and prop * 1000; values transformed back",
  loglik = as.numeric(logLik(fit)) + n1 * log(a[1]) + n2 * log(a[2]), nobs_values = nrow(s),
  fixed = as.list(fe / fa[names(fe)]), fixed_se = as.list(sqrt(diag(vcov(fit))) / fa[names(fe)]),
  cov_county = unname(vc$county / aa), cov_school = unname(vc$school / aa),
  cov_residual = unname(diag(sds) %*% cr %*% diag(sds) / aa))
writeLines(toJSON(out, auto_unbox = TRUE, digits = 15, pretty = TRUE), args[2])
