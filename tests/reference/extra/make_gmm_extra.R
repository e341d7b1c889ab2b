## make_gmm_extra.R -- lavaan values for the SEM side's inference options
## (tests/estimate/test_adf.py): on hs_cfa (complete) and hs_cfa_missing (10% cells
## missing), the three-factor CFA fitted by FIML (missing = "ml") with
##   se = "robust.huber.white" (observed-information bread; mlsem's vce="robust"),
##   cluster = "school" (mlsem's vce=("cluster", "school")), and the test
## against the saturated model (chisq, df; by EM on hs_cfa_missing).
## Usage: Rscript make_gmm_extra.R <csv_dir> <out_json>
suppressPackageStartupMessages({ library(lavaan); library(jsonlite) })
args <- commandArgs(trailingOnly = TRUE)
csv_dir <- args[1]; out_json <- args[2]
model <- "visual =~ x1 + x2 + x3\n textual =~ x4 + x5 + x6\n speed =~ x7 + x8 + x9"
block <- function(fit) {
  pe <- parameterEstimates(fit)
  free <- pe[pe$se > 0 | is.na(pe$se), ]
  key <- ifelse(pe$op == "~1", paste0(pe$lhs, "~1"), paste0(pe$lhs, pe$op, pe$rhs))
  fm <- fitMeasures(fit, c("chisq", "df", "logl", "npar"))
  list(estimates = as.list(setNames(pe$est, key)), std_errors = as.list(setNames(pe$se, key)),
       chisq = unname(fm["chisq"]), df = unname(fm["df"]), loglik = unname(fm["logl"]),
       npar = unname(fm["npar"]))
}
out <- list(program = sprintf("lavaan %s on R %s", packageDescription("lavaan")$Version,
                              as.character(getRversion())))
for (case in c("hs_cfa", "hs_cfa_missing")) {
  d <- read.csv(file.path(csv_dir, paste0(case, ".csv")))
  d$school <- ceiling(seq_len(nrow(d)) / 5)
  out[[case]] <- list(
    robust = block(sem(model, data = d, missing = "ml", se = "robust.huber.white",
                       information = "observed")),
    cluster_school = block(sem(model, data = d, missing = "ml", cluster = "school",
                               information = "observed")),
    note = "school = ceiling(row / 5): 61 clusters of 5 consecutive rows (301 rows: the last has 1)")
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), out_json)
