## make_survey_design.R -- R's survey package: svyrecvar() on mlsem's weighted
## per-county scores (tests/test_survey_design.py): the meat M of the
## linearised covariance H^-1 M H^-1, with the same strata, PSUs, FPC and
## singleton rule.  Usage: Rscript make_survey_design.R <csv_dir> <out_json>
## (make_survey_design.sh writes the CSV files with make_survey_design.py).
## mlsem's singleton rules and survey's lonely.psu: certainty = "certainty",
## scaled = "average", centered = "adjust" (at the optimum the score totals
## sum to 0, so survey's centring at 0 is the grand mean).
suppressPackageStartupMessages({ library(survey); library(jsonlite) })
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]; out <- args[2]
cases <- c("fpc_count", "fpc_fraction", "no_fpc", "singleton_certainty",
           "singleton_scaled", "singleton_centered", "subpop")
lonely <- c(singleton_certainty = "certainty", singleton_scaled = "average",
            singleton_centered = "adjust")
res <- list(program = paste0("R ", R.version$major, ".", R.version$minor, ", survey ",
                             as.character(packageVersion("survey")), ": svyrecvar"),
            note = "meat M = svyrecvar(weighted scores, PSUs, strata, fpc); scores rows by k")
for (cs in cases) {
  d <- read.csv(file.path(dir, paste0(cs, ".csv")))
  sc <- as.matrix(d[, grep("^s[0-9]+$", names(d))])
  options(survey.lonely.psu = if (cs %in% names(lonely)) lonely[[cs]] else "fail")
  des <- if (all(is.na(d$fpc))) svydesign(ids = ~psu, strata = ~stratum, data = d, weights = ~1)
         else svydesign(ids = ~psu, strata = ~stratum, fpc = ~fpc, data = d, weights = ~1)
  M <- svyrecvar(sc, des$cluster, des$strata, des$fpc)
  res[[cs]] <- list(k = d$k, psu = d$psu, stratum = d$stratum, fpc = d$fpc,
                    scores = unname(sc), meat = unname(M))
}
writeLines(toJSON(res, digits = NA, auto_unbox = TRUE, na = "null"), out)
