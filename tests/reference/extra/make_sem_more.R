# lavaan fits of more model shapes on the shipped SEM data (tests/api/test_sem_reference.py):
# path models with observed predictors, regressions among latents, an observed outcome of
# latents, mixed latent/observed dependents (auto.cov.y), labels and constraints.
# R has no arrow here: first write the CSVs from the parquet files, then run, from this folder:
#   python -c "import polars as pl; [pl.read_parquet(f'../{c}.parquet').write_csv(f'{c}.csv') for c in ['hs_cfa_missing', 'iv_endogenous']]"
#   Rscript make_sem_more.R      (writes sem_more.json; the CSVs can then be deleted)
library(lavaan)
library(jsonlite)
hs <- read.csv("hs_cfa_missing.csv")
iv <- read.csv("iv_endogenous.csv")
cases <- list(
  list(name = "regression_two_x", data = "iv_endogenous", model = "y ~ x + z"),
  list(name = "path_chain", data = "iv_endogenous", model = "y ~ x; x ~ z"),
  list(name = "latent_structural", data = "hs_cfa_missing",
       model = "visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\ntextual ~ visual\nx7 ~ visual + textual\nx8 ~ x7"),
  list(name = "mixed_dependents", data = "hs_cfa_missing", model = "visual =~ x1 + x2 + x3\nvisual ~ x4\nx5 ~ x4"),
  list(name = "constrained_cfa", data = "hs_cfa_missing",
       model = "visual =~ x1 + a*x2 + b*x3\ntextual =~ x4 + c*x5 + d*x6\na == b\nc == 2*d - 1\nx1 ~~ x4\nratio := a / c")
)
out <- list(program = paste0("lavaan ", packageVersion("lavaan"), " on ", R.version.string,
                             ": sem(model, data, missing = 'ml', information = 'observed')"), cases = list())
for (cs in cases) {
  d <- if (cs$data == "hs_cfa_missing") hs else iv
  fit <- sem(cs$model, data = d, missing = "ml", information = "observed")
  pe <- parameterEstimates(fit)
  out$cases[[cs$name]] <- list(data = cs$data, model = cs$model, loglik = as.numeric(logLik(fit)),
                               npar = as.integer(fitMeasures(fit, "npar")),
                               params = data.frame(lhs = pe$lhs, op = pe$op, rhs = pe$rhs, label = if (is.null(pe$label)) rep("", nrow(pe)) else pe$label,
                                                   est = pe$est, se = pe$se))
}
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA), "sem_more.json")
