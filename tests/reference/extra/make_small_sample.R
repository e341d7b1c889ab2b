# Small-sample references beyond /work/shared/reference's `small_sample` key:
# lmerTest's Satterthwaite df on ML fits (as lmerTest allows) and F tests of
# several restrictions (contestMD) by Satterthwaite and Kenward-Roger.
# Usage: Rscript make_small_sample.R CSVDIR OUT.json  (see make_small_sample.sh)
suppressMessages({library(lmerTest); library(pbkrtest); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
d <- args[1]
rd <- function(f) read.csv(file.path(d, f))
out <- list(program = sprintf("lmerTest %s pbkrtest %s lme4 %s", packageVersion("lmerTest"),
                              packageVersion("pbkrtest"), packageVersion("lme4")))
tab <- function(m, ddf) {
  s <- summary(m, ddf = ddf)$coefficients
  col <- function(k) setNames(as.list(s[, k]), rownames(s))
  list(estimate = col("Estimate"), std_err = col("Std. Error"), df = col("df"),
       p_value = col("Pr(>|t|)"))
}
ctl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
sb <- rd("seed_balanced.csv"); ub <- rd("unbalanced.csv"); ss <- rd("sleepstudy.csv")
ps <- rd("pastes.csv")
m <- list(
  seed_balanced = lmer(y ~ x + (1 | k/j), sb, REML = FALSE, control = ctl),
  unbalanced = lmer(y ~ x1 + z + (1 | k/j), ub, REML = FALSE, control = ctl),
  sleepstudy = lmer(Reaction ~ Days + (Days | Subject), ss, REML = FALSE, control = ctl),
  pastes = lmer(strength ~ 1 + (1 | batch/cask), ps, REML = FALSE, control = ctl))
out$ml_satterthwaite <- lapply(m, tab, ddf = "Satterthwaite")
# F tests on unbalanced (REML): x1 = 0 and z = 0 jointly; x1 - z = 0.5 and (Intercept) = 1
mr <- lmer(y ~ x1 + z + (1 | k/j), ub, REML = TRUE, control = ctl)
L1 <- rbind(c(0, 1, 0), c(0, 0, 1))
L2 <- rbind(c(0, 1, -1), c(1, 0, 0))
ft <- function(mod, L, rhs, ddf) {
  a <- contestMD(mod, L, rhs = rhs, ddf = ddf)
  list(F = a[["F value"]], df_num = a[["NumDF"]], df_den = a[["DenDF"]], p_value = a[["Pr(>F)"]])
}
kr <- function(L, rhs) {
  betaH <- if (all(rhs == 0)) 0 else drop(MASS::ginv(L) %*% rhs)
  x <- KRmodcomp(mr, L, betaH = betaH)$test
  list(F = x["Ftest", "stat"], df_num = x["Ftest", "ndf"], df_den = x["Ftest", "ddf"],
       F_scaling = x["Ftest", "F.scaling"], p_value = x["Ftest", "p.value"])
}
out$ftests_unbalanced_reml <- list(
  joint = list(restrictions = c("x1 = 0", "z = 0"),
               satterthwaite = ft(mr, L1, c(0, 0), "Satterthwaite"), kenward_roger = kr(L1, c(0, 0))),
  shifted = list(restrictions = c("x1 - z = 0.5", "Intercept = 1"),
                 satterthwaite = ft(mr, L2, c(0.5, 1), "Satterthwaite"), kenward_roger = kr(L2, c(0.5, 1))))
mlm <- m$unbalanced
out$ftests_unbalanced_ml <- list(joint = list(restrictions = c("x1 = 0", "z = 0"),
                                              satterthwaite = ft(mlm, L1, c(0, 0), "Satterthwaite")))
# var(j) estimated at 0 (singular fit): lmerTest's theta = 0 drops out of the df
bd <- rd("boundary.csv")
out$boundary <- list(
  data = "mlsem.simulate(30, 2, 3, sd_school=0.0, seed=1)",
  reml_satterthwaite = tab(lmer(y ~ x + (1 | k/j), bd, REML = TRUE, control = ctl), "Satterthwaite"),
  ml_satterthwaite = tab(lmer(y ~ x + (1 | k/j), bd, REML = FALSE, control = ctl), "Satterthwaite"))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
