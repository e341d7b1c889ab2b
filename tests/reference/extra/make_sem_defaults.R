# lavaan's parameter tables (defaults of sem(missing = "ml", fixed.x = TRUE)) for a few
# model shapes: what mlsem.sem's defaults must reproduce (tests/spec/test_sem_syntax.py).
# Run: Rscript make_sem_defaults.R   (writes sem_defaults.json)
library(lavaan)
library(jsonlite)
models <- list(
  cfa = "visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\nspeed =~ x7 + x8 + x9",
  structural = "f =~ a + b + c\ng =~ d + e + h\nf ~ x\ny1 ~ x\ny2 ~ x\ng ~ x",
  iv = "y ~ x\nx ~ z\ny ~~ x",
  path = "y1 ~ x1 + x2\ny2 ~ y1 + x1\ny3 ~ x2",
  mediation = "m ~ a*x\ny ~ b*m + x\nab := a*b",
  higher = "f1 =~ a + b + c\nf2 =~ d + e + h\ng =~ f1 + f2\ng ~ x",
  free_first = "f =~ NA*a + b + c\nf ~~ 1*f\na ~~ b"
)
out <- list(program = paste0("lavaan ", packageVersion("lavaan"), " on ", R.version.string,
                             ": lavaanify(model, meanstructure = TRUE, int.ov.free = TRUE, int.lv.free = FALSE, ",
                             "auto.fix.first = TRUE, auto.fix.single = TRUE, auto.var = TRUE, auto.cov.lv.x = TRUE, ",
                             "auto.cov.y = TRUE, fixed.x = TRUE) (the defaults of sem(missing = 'ml'))"),
            models = list())
for (nm in names(models)) {
  pt <- lavaanify(models[[nm]], meanstructure = TRUE, int.ov.free = TRUE, int.lv.free = FALSE,
                  auto.fix.first = TRUE, auto.fix.single = TRUE, auto.var = TRUE, auto.cov.lv.x = TRUE,
                  auto.cov.y = TRUE, fixed.x = TRUE)
  pt <- pt[pt$op %in% c("=~", "~", "~~", "~1"), ]
  out$models[[nm]] <- list(model = models[[nm]],
                           rows = data.frame(lhs = pt$lhs, op = pt$op, rhs = pt$rhs,
                                             free = pt$free > 0, exo = pt$exo == 1,
                                             ustart = ifelse(is.na(pt$ustart), NA, pt$ustart)))
}
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, na = "null"), "sem_defaults.json")
