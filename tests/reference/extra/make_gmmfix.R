## make_gmmfix.R -- lavaan values for tests/estimate/test_adf.py's review fixes.
## * multilevel ADF: each case's wide form (mlsem.multilevel(...).to_wide()) and
##   syntax (.to_syntax()) fitted by estimator = "WLS" (ADF) and "MLM"
##   (Satorra-Bentler), fixed.x = TRUE (WLS defaults to FALSE); a county-level covariate repeated in every slot
##   (z1_1 ... z2_2, identical) enters once as z, which is the same model;
## * a mediation model with a defined parameter ab := a*b on the seed's wide
##   form: Huber-White ("robust"), cluster-robust by region ("cluster") and
##   sampling weights w ("weighted"), FIML, observed information;
## * hs_cfa's last 50 rows by estimator = "MLM" (N = 50 < 54 moments);
## * hs_cfa's first 50 rows by FIML (a variance estimate at its bound).
## Usage: python make_gmmfix.py <tmp>; Rscript make_gmmfix.R <tmp> <out_json>
suppressPackageStartupMessages({ library(lavaan); library(jsonlite) })
args <- commandArgs(trailingOnly = TRUE)
tmp <- args[1]; out_json <- args[2]
block <- function(fit) {
  pe <- parameterEstimates(fit)
  lab <- if (is.null(pe$label)) rep("", nrow(pe)) else pe$label
  key <- ifelse(lab != "", lab,
                ifelse(pe$op == "~1", paste0(pe$lhs, "~1"), paste0(pe$lhs, pe$op, pe$rhs)))
  first <- !duplicated(key)
  fm <- fitMeasures(fit)
  pick <- function(n) if (n %in% names(fm)) unname(fm[n]) else NA
  list(estimates = as.list(setNames(pe$est[first], key[first])),
       std_errors = as.list(setNames(pe$se[first], key[first])),
       chisq = pick("chisq"), df = pick("df"), pvalue = pick("pvalue"),
       chisq_scaled = pick("chisq.scaled"), scaling_factor = pick("chisq.scaling.factor"),
       loglik = pick("logl"), converged = lavInspect(fit, "converged"))
}
out <- list(program = sprintf("lavaan %s on R %s", packageDescription("lavaan")$Version,
                              as.character(getRversion())))
for (case in c("normal_x", "two_covariates", "county_covariate", "six_slots")) {
  d <- read.csv(file.path(tmp, paste0(case, ".csv")))
  model <- paste(readLines(file.path(tmp, paste0(case, ".lav"))), collapse = "\n")
  if (case == "county_covariate") {
    d$z <- d$z1_1
    model <- gsub("z[0-9]+_[0-9]+", "z", model)
  }
  out$multilevel[[case]] <- list(
    wls = block(sem(model, data = d, estimator = "WLS", fixed.x = TRUE)),
    mlm = block(sem(model, data = d, estimator = "MLM", fixed.x = TRUE)),
    model = model)
}
d <- read.csv(file.path(tmp, "seed_wide.csv"))
med <- "y1_2 ~ a*x1_1 + x1_2\n y2_1 ~ b*y1_2 + x2_1\n y2_2 ~ c*y2_1 + x2_2\n ab := a*b\n abc := a*b*c"
out$mediation <- list(
  model = med,
  robust = block(sem(med, data = d, missing = "ml", fixed.x = TRUE, se = "robust.huber.white",
                     information = "observed")),
  cluster = block(sem(med, data = d, missing = "ml", fixed.x = TRUE, cluster = "region",
                      information = "observed")),
  weighted = block(sem(med, data = d, missing = "ml", fixed.x = TRUE, sampling.weights = "w",
                       se = "robust.huber.white", information = "observed")))
h <- read.csv(file.path(tmp, "hs_tail50.csv"))
hs <- "visual =~ x1 + x2 + x3\n textual =~ x4 + x5 + x6\n speed =~ x7 + x8 + x9"
out$hs_tail50 <- list(mlm = block(sem(hs, data = h, estimator = "MLM", fixed.x = TRUE)))
h <- read.csv(file.path(tmp, "hs_head50.csv"))
out$hs_head50 <- list(ml = block(sem(hs, data = h, missing = "ml", fixed.x = TRUE,
                                     information = "observed")))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"), out_json)
