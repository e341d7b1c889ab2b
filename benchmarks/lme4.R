## lme4.R -- one timed lme4 fit for the mlsem benchmark suite.
## Usage: Rscript lme4.R <data.csv> <formula> <id columns, comma separated>
## Prints one JSON object: seconds (the lmer() call alone), loglik, program.
suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
for (id in strsplit(args[3], ",")[[1]]) d[[id]] <- factor(d[[id]])
f <- as.formula(args[2])
t0 <- proc.time()[["elapsed"]]
m <- lmer(f, data = d, REML = FALSE)
t1 <- proc.time()[["elapsed"]]
cat(toJSON(list(seconds = t1 - t0, loglik = as.numeric(logLik(m)),
                program = paste0("lme4 ", packageVersion("lme4"), " on ", R.version.string,
                                 ": lmer(REML = FALSE)")),
           auto_unbox = TRUE, digits = NA), "\n")
