# lavaan on the seed's example (mlsem.example_data(), wide: seed_example_wide.csv) for the
# seed's constrained SEM and two hand-written relaxations (tests/api/test_bridge.py).
# Run: Rscript make_sem_relaxed.R   (writes sem_relaxed.json)
library(lavaan)
library(jsonlite)
d <- read.csv("seed_example_wide.csv")
base <- "
U  =~ 1*y1_1 + 1*y1_2 + 1*y2_1 + 1*y2_2
V1 =~ 1*y1_1 + 1*y1_2
V2 =~ 1*y2_1 + 1*y2_2
U ~~ su*U;  V1 ~~ sv*V1;  V2 ~~ sv*V2
U ~~ 0*V1 + 0*V2;  V1 ~~ 0*V2
y1_1 ~ c*1 + b*x1_1;  y1_2 ~ c*1 + b*x1_2
y2_1 ~ c*1 + b*x2_1;  y2_2 ~ c*1 + b*x2_2
y1_1 ~~ se*y1_1;  y1_2 ~~ se*y1_2;  y2_1 ~~ se*y2_1;  y2_2 ~~ se*y2_2
"
models <- list(
  seed = base,
  public_resid_cov = paste0(base, "y1_1 ~~ r*y1_2\nicc_public := (su + sv + r) / (su + sv + se)\n"),
  hetero_resid = sub("y2_1 ~~ se\\*y2_1;  y2_2 ~~ se\\*y2_2", "y2_1 ~~ se2*y2_1;  y2_2 ~~ se2*y2_2", base)
)
out <- list(program = paste0("lavaan ", packageVersion("lavaan"), " on ", R.version.string,
                             ": sem(model, data, missing = 'ml', fixed.x = TRUE, information = 'observed')"),
            models = list())
for (nm in names(models)) {
  fit <- sem(models[[nm]], data = d, missing = "ml", fixed.x = TRUE, information = "observed")
  pe <- parameterEstimates(fit)
  pe <- pe[pe$label != "" & !duplicated(pe$label), ]
  out$models[[nm]] <- list(model = models[[nm]], loglik = as.numeric(logLik(fit)),
                           estimates = as.list(setNames(pe$est, pe$label)),
                           std_errors = as.list(setNames(pe$se, pe$label)))
}
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA), "sem_relaxed.json")
