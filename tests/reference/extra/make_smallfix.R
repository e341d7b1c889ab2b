# Regenerate tests/reference/extra/smallfix.json (lmerTest Satterthwaite df in
# other units of y and on a singular random-slope fit).
# Usage: Rscript make_smallfix.R <dir with unbalanced.csv and smallfix_sing.csv> <out.json>
suppressMessages({library(lmerTest); library(jsonlite)})
a <- commandArgs(TRUE); d <- a[1]
ctl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
tab <- function(m, ddf = "Satterthwaite") { s <- summary(m, ddf = ddf)$coefficients
  lapply(setNames(seq_len(nrow(s)), rownames(s)), function(i) unname(c(s[i, "Estimate"], s[i, "Std. Error"], s[i, "df"]))) }
out <- list(program = paste0("R ", getRversion(), ", lme4 ", packageVersion("lme4"), ", lmerTest ",
                             packageVersion("lmerTest"), "; columns: estimate, std_err, df"))
unb <- read.csv(file.path(d, "unbalanced.csv"))
for (s in c(0.01, 1e-4)) { u <- unb; u$y <- u$y * s
  for (reml in c(TRUE, FALSE)) { m <- lmer(y ~ x1 + z + (1 | k/j), u, REML = reml, control = ctl)
    out[[sprintf("unb_%g_%s", s, if (reml) "reml" else "ml")]] <- list(tab = tab(m), singular = isSingular(m)) } }
sg <- read.csv(file.path(d, "smallfix_sing.csv"))
for (reml in c(TRUE, FALSE)) { m <- lmer(y ~ day + (day | s), sg, REML = reml, control = ctl)
  out[[sprintf("sing_%s", if (reml) "reml" else "ml")]] <- list(tab = tab(m), singular = isSingular(m),
     theta = unname(getME(m, "theta")), sigma = sigma(m)) }
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), a[2])
