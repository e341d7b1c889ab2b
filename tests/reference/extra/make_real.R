# lme4 references on public data sets with factors, interactions, transforms,
# random slopes and missing outcomes (tests/data/test_real_data.py).  Run from the
# repository root: Rscript tests/reference/extra/make_real.R
# Factors are exported as character columns, so the reference level is the
# first in sorted (C-locale) order, as formulaic's default.
suppressMessages({library(lme4); library(mlmRev); library(nlme, exclude = c("lmList", "Oxboys", "bdf")); library(jsonlite)})
Sys.setlocale("LC_COLLATE", "C")
out_dir <- "tests/reference/real"
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))

as_chr <- function(d) { for (v in names(d)) if (is.factor(d[[v]])) d[[v]] <- as.character(d[[v]]); d }

fit_case <- function(name, data, formula_r, formula, levels, notes = "") {
  data <- as_chr(as.data.frame(data))
  write.csv(data, file.path(out_dir, paste0(name, ".csv")), row.names = FALSE, na = "")  # converted to Parquet by convert.py
  res <- list(program = paste("lme4", packageVersion("lme4"), "on", R.version.string),
              formula_r = formula_r, formula = formula, levels = levels, notes = notes)
  for (reml in c(FALSE, TRUE)) {
    m <- lmer(as.formula(formula_r), data = data, REML = reml, control = ctrl)
    vc <- as.data.frame(VarCorr(m))
    blk <- list(loglik = as.numeric(logLik(m)), nobs = nobs(m),
                fixef = as.list(fixef(m)), se = as.list(sqrt(diag(as.matrix(vcov(m))))),
                vc = lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
                        var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i], vcov = vc$vcov[i])))
    if (reml) blk$reml_criterion <- as.numeric(REMLcrit(m))
    res[[if (reml) "reml" else "ml"]] <- blk
  }
  writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path(out_dir, paste0(name, ".json")))
  cat(name, "done\n")
}

data(Chem97)
fit_case("chem97", Chem97[, c("lea", "school", "score", "gender", "age", "gcsecnt")],
         "score ~ gcsecnt + I(gcsecnt^2) + gender * age + (1 | lea/school)",
         "score ~ gcsecnt + I(gcsecnt**2) + gender*age + (1 | lea/school)", c("lea", "school"),
         "mlmRev's Chem97: A-level chemistry scores of 31,022 students in 2,410 schools in 131 LEAs")

data(Hsb82)
h <- Hsb82[, c("school", "mAch", "meanses", "cses", "sector", "sx", "minrty")]
fit_case("hsb82", h, "mAch ~ meanses * cses + sector + sx + minrty + (1 + cses | school)",
         "mAch ~ meanses*cses + sector + sx + minrty + (1 + cses | school)", c("school"),
         "mlmRev's Hsb82 (High School and Beyond): correlated random intercept and slope")
set.seed(20261130)
hm <- h
hm$mAch[sample(nrow(hm), round(0.1 * nrow(hm)))] <- NA
fit_case("hsb82_missing", hm, "mAch ~ meanses * cses + sector + sx + minrty + (1 + cses | school)",
         "mAch ~ meanses*cses + sector + sx + minrty + (1 + cses | school)", c("school"),
         "Hsb82 with 10% of the outcome missing completely at random (lme4 drops those rows)")

o <- as.data.frame(Oats)
fit_case("oats", o[, c("Block", "Variety", "nitro", "yield")],
         "yield ~ nitro + I(nitro^2) + Variety + (1 | Block/Variety)",
         "yield ~ nitro + I(nitro**2) + Variety + (1 | Block/Variety)", c("Block", "Variety"),
         "nlme's Oats: split plot; Variety is a fixed factor and the inner grouping level")

ox <- as.data.frame(mlmRev::Oxboys)
fit_case("oxboys", ox[, c("Subject", "age", "height")],
         "height ~ poly(age, 2) + (1 + age | Subject)",
         "height ~ poly(age, 2) + (1 + age | Subject)", c("Subject"),
         "mlmRev's Oxboys: heights of 26 boys on 9 occasions; orthogonal polynomial in age")

# a random slope on an uncentred covariate with no slope variance in the data-generating
# model: lme4 reports a singular fit (correlation -1); y in the 1000s (simulated by
# mlsem's tests, tests/reference/real/singular_slope.csv, kept as CSV)
s <- read.csv(file.path(out_dir, "singular_slope.csv"), stringsAsFactors = FALSE)
fit_case("singular_slope", s, "y ~ sex * age + stype + flag + (1 + age | school)",
         "y ~ sex*age + stype + flag + (1 + age | school)", c("school"),
         "simulated pupils in classes in schools; boundary (singular) random-slope fit")
