## make_fit_test.R -- lavaan's test of the model against the saturated model
## (chisq, df) and the h0/h1 log-likelihoods for the wide form of
## y ~ x + (1 | k/j), on seed_balanced and on seed_balanced with cells deleted
## (missing data: lavaan's h1 by EM); and, on both, lavTestScore (score tests of
## the equality constraints) and the top 20 modindices (default: expected information).
##
## Usage: Rscript make_fit_test.R <csv_dir> <out_json>
##   csv_dir holds seed_balanced.csv (converted from the Parquet with polars)
## Deleted cells (the rule is repeated in tests/inference/test_inference.py):
##   (k %% 5 == 0 & j == 2 & i == 2) | (k %% 7 == 0 & j == 1 & i == 1)
## Wide form as in tests/reference: one row per k, y{j}_{i}, x{j}_{i}; the x of
## a deleted cell is 0 (lavaan needs complete fixed covariates; it does not
## enter the likelihood because the cell's y is missing).
suppressPackageStartupMessages({ library(lavaan); library(jsonlite) })
args <- commandArgs(trailingOnly = TRUE)
csv_dir <- args[1]; out_json <- args[2]

wide_fit <- function(d) {
  d$slot <- paste0(d$j, "_", d$i)
  slots <- sort(unique(d$slot))
  K <- sort(unique(d$k))
  W <- data.frame(k = K)
  for (s in slots) {
    sub <- d[d$slot == s, ]
    W[[paste0("y", s)]] <- sub$y[match(K, sub$k)]
    xs <- sub$x[match(K, sub$k)]
    xs[is.na(xs)] <- 0
    W[[paste0("x", s)]] <- xs
  }
  js <- sort(unique(d$j))
  lines <- c(paste0("U =~ ", paste0("1*y", slots, collapse = " + ")))
  for (j in js) {
    sj <- slots[startsWith(slots, paste0(j, "_"))]
    lines <- c(lines, paste0("V", j, " =~ ", paste0("1*y", sj, collapse = " + ")))
  }
  for (s in slots) {
    lines <- c(lines, paste0("y", s, " ~ b_x*x", s), paste0("y", s, " ~ c*1"),
               paste0("y", s, " ~~ se*y", s))
  }
  lats <- c("U", paste0("V", js))
  lines <- c(lines, "U ~~ su*U", paste0("V", js, " ~~ sv*V", js))
  for (a in 1:(length(lats) - 1)) for (b in (a + 1):length(lats))
    lines <- c(lines, paste0(lats[a], " ~~ 0*", lats[b]))
  fit <- sem(paste(lines, collapse = "\n"), data = W, missing = "ml", fixed.x = TRUE)
  fm <- fitMeasures(fit, c("chisq", "df", "pvalue", "logl", "unrestricted.logl", "npar"))
  st <- lavTestScore(fit)
  pt <- parTable(fit)
  uni <- st$uni
  uni$lhs_entry <- with(pt[match(uni$lhs, pt$plabel), ], paste(lhs, op, rhs))
  uni$rhs_entry <- with(pt[match(uni$rhs, pt$plabel), ], paste(lhs, op, rhs))
  mi <- modindices(fit, sort. = TRUE)
  mi <- mi[, c("lhs", "op", "rhs", "mi", "epc")]
  list(score_total = list(X2 = unname(st$test$X2), df = unname(st$test$df)),
       score_uni = uni[, c("lhs_entry", "rhs_entry", "X2", "df")],
       modindices_top20 = head(mi, 20),
       chisq = unname(fm["chisq"]), df = unname(fm["df"]), pvalue = unname(fm["pvalue"]),
       loglik = unname(fm["logl"]), unrestricted_loglik = unname(fm["unrestricted.logl"]),
       npar = unname(fm["npar"]), rows = nrow(W), slots = length(slots),
       program = sprintf("lavaan %s on R %s: sem(missing = 'ml', fixed.x = TRUE), wide form; fitMeasures",
                         packageDescription("lavaan")$Version, as.character(getRversion())))
}

d <- read.csv(file.path(csv_dir, "seed_balanced.csv"))
out <- list(seed_balanced = wide_fit(d))
drop <- (d$k %% 5 == 0 & d$j == 2 & d$i == 2) | (d$k %% 7 == 0 & d$j == 1 & d$i == 1)
out$seed_balanced_missing <- wide_fit(d[!drop, ])
out$seed_balanced_missing$deleted <- "(k %% 5 == 0 & j == 2 & i == 2) | (k %% 7 == 0 & j == 1 & i == 1)"
print(str(out))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), out_json)
