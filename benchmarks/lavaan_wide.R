## lavaan_wide.R -- one timed lavaan fit of the wide SEM form (mlsem benchmark suite).
## Usage: Rscript lavaan_wide.R <wide.csv> <model.lav>
## The model file is lavaan syntax written by benchmarks/run.py (the nested
## random-intercept model as a constrained SEM). Prints one JSON object.
suppressPackageStartupMessages({
  library(lavaan)
  library(jsonlite)
})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
model <- paste(readLines(args[2]), collapse = "\n")
t0 <- proc.time()[["elapsed"]]
fit <- sem(model, data = d, missing = "ml", fixed.x = TRUE)
t1 <- proc.time()[["elapsed"]]
cat(toJSON(list(seconds = t1 - t0, loglik = as.numeric(fitMeasures(fit, "logl")),
                program = paste0("lavaan ", packageVersion("lavaan"), " on ", R.version.string,
                                 ": sem(missing = 'ml', fixed.x = TRUE), wide form")),
           auto_unbox = TRUE, digits = NA), "\n")
