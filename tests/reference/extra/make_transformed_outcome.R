# lme4 reference for a transformed outcome written in the formula (tests/spec/test_formula_r.py).
# Usage: Rscript make_transformed_outcome.R lme4_transformed_outcome.json   (sleepstudy ships with lme4)
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
m <- lmer(log(Reaction) ~ Days + (Days | Subject), sleepstudy, REML = FALSE, control = ctrl)
r <- lmer(log(Reaction) ~ Days + I(Days^2) + (1 | Subject) + (0 + Days | Subject), sleepstudy,
          REML = TRUE, control = ctrl)
blk <- function(m) list(loglik = as.numeric(logLik(m)), fixef = as.list(fixef(m)),
                        se = as.list(sqrt(diag(as.matrix(vcov(m))))))
res <- list(program = paste("lme4", packageVersion("lme4"), "on", R.version.string), data = "sleepstudy",
            ml = c(list(formula = "log(Reaction) ~ Days + (Days | Subject)"), blk(m)),
            reml = c(list(formula = "log(Reaction) ~ Days + I(Days^2) + (1 | Subject) + (0 + Days | Subject)"),
                     blk(r), list(reml_criterion = as.numeric(REMLcrit(r)))))
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[1])
