# lme4 references for the formula grammar and predictions (tests/data/test_formula.py).
# Usage: Rscript make_formula.R exam_factors.csv lme4_formula.json
# Factors are character columns, so the reference level is the first in sorted
# (C-locale) order, as mlsem's (formulaic's) default.
suppressMessages({library(lme4); library(jsonlite)})
Sys.setlocale("LC_COLLATE", "C")
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], stringsAsFactors = FALSE)
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
# new data: the first 12 rows; rows 4-6 moved to a school the fit has not seen
nd <- d[1:12, ]
nd$school[4:6] <- 9999L
nd$sex[7] <- "M"
block <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  list(loglik = as.numeric(logLik(m)), nobs = nobs(m),
       fixef = as.list(fixef(m)), se = as.list(sqrt(diag(as.matrix(vcov(m))))),
       vc = lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
               var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i], vcov = vc$vcov[i])),
       fitted = as.numeric(fitted(m)),
       predict_newdata = as.numeric(predict(m, newdata = nd, allow.new.levels = TRUE)),
       predict_newdata_population = as.numeric(predict(m, newdata = nd, re.form = NA)),
       # standard errors of x'beta on the first 12 estimation rows: sqrt(x' vcov(beta) x)
       se_fixed_first12 = {X <- getME(m, "X")[1:12, , drop = FALSE]
                           as.numeric(sqrt(rowSums((X %*% as.matrix(vcov(m))) * X)))})
}
res <- list(program = paste("lme4", packageVersion("lme4"), "on", R.version.string),
            data = "exam_factors.parquet",
            newdata = list(rows = 1:12, school_9999 = 4:6, sex_M = 7),
            cases = list())
cases <- list(
  interaction_poly = list(
    formula_r = "normexam ~ poly(standLRT, 2) + sex * vr + (1 | school)",
    formula = "normexam ~ poly(standLRT, 2) + sex*vr + (1 | school)"),
  slope_transform = list(
    formula_r = "normexam ~ standLRT + sex + (1 + log(standLRT + 4) | school)",
    formula = "normexam ~ standLRT + sex + (1 + log(standLRT + 4) | school)"))
for (nm in names(cases)) {
  m <- lmer(as.formula(cases[[nm]]$formula_r), data = d, REML = FALSE, control = ctrl)
  res$cases[[nm]] <- c(cases[[nm]], list(ml = block(m)))
}
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
cat("done\n")
