# lme4 references for rank-deficient fixed-effect designs (tests/data/test_rank.py):
# lme4 drops the columns that are linear combinations of earlier ones and fits the rest.
# Usage: Rscript make_rank.R exam_factors.csv lme4_rank.json   (see make_rank.sh)
suppressMessages({library(lme4); library(jsonlite)})
Sys.setlocale("LC_COLLATE", "C")
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], stringsAsFactors = FALSE)
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
cases <- list(
  # boys' schools have no girls and girls' schools no boys: two empty cells
  empty_cells = list(formula_r = "normexam ~ standLRT + sex * schgend + (1 | school)",
                     formula = "normexam ~ standLRT + sex * schgend + (1 | school)"),
  # a column twice the other
  multiple = list(formula_r = "normexam ~ standLRT + I(2 * standLRT) + vr + (1 | school)",
                  formula = "normexam ~ standLRT + I(2 * standLRT) + vr + (1 | school)"))
res <- list(program = paste("lme4", packageVersion("lme4"), "on", R.version.string),
            data = "exam_factors.parquet", cases = list())
for (nm in names(cases)) {
  for (reml in c(FALSE, TRUE)) {
    m <- lmer(as.formula(cases[[nm]]$formula_r), data = d, REML = reml, control = ctrl)
    X <- model.matrix(lme4::nobars(as.formula(cases[[nm]]$formula_r)), d)
    vc <- as.data.frame(VarCorr(m))
    blk <- list(loglik = as.numeric(logLik(m)), nobs = nobs(m),
                fixef = as.list(fixef(m)), se = as.list(sqrt(diag(as.matrix(vcov(m))))),
                dropped = setdiff(colnames(X), names(fixef(m))),
                vcov = as.list(setNames(vc$vcov, vc$grp)))
    cases[[nm]][[if (reml) "reml" else "ml"]] <- blk
  }
  res$cases[[nm]] <- cases[[nm]]
}
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
