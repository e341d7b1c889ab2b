## make_robust_unbalanced.R -- lavaan's robust (Huber-White) and cluster-robust
## standard errors of the wide form of y ~ x1 + z + (1 | k/j) on `unbalanced`
## (tests/inference/test_inference.py::test_robust_and_cluster_on_unbalanced).
##
## Usage: Rscript make_robust_unbalanced.R <csv_dir> <out_json>
##   (make_robust_unbalanced.sh converts the Parquet files to CSV; R here has no arrow)
## Wide form as in tests/reference/unbalanced.json's `lavaan` block: one row per k,
## slots y{j}_{i}, covariates x1{j}_{i} and z{j}_{i} (0 where the slot is empty:
## lavaan needs complete fixed covariates; a cell whose y is missing does not use
## them); labels b_x1, b_z, c, se, su, sv. Clusters: region = (k - 1) %/% 10 (30
## clusters of 10 counties), the rule of the test.
## As a check of the options, the same calls on seed_balanced (region =
## ceiling(k / 10)) must reproduce seed_balanced.json's inference$robust and
## inference$cluster_region; the script stops if they do not (1e-6 relative).
## test = "none", h1 = FALSE: the standard errors need no unrestricted (h1) model;
## fitting it by EM on 72 variables is what takes lavaan minutes here.
suppressPackageStartupMessages({ library(lavaan); library(jsonlite) })
args <- commandArgs(trailingOnly = TRUE)
csv_dir <- args[1]; out_json <- args[2]

wide <- function(d, covs) {
  d$slot <- paste0(d$j, "_", d$i)
  slots <- unique(d$slot[order(d$j, d$i)])
  K <- sort(unique(d$k))
  W <- data.frame(k = K)
  for (s in slots) {
    sub <- d[d$slot == s, ]
    W[[paste0("y", s)]] <- sub$y[match(K, sub$k)]
    for (cv in covs) {
      xs <- sub[[cv]][match(K, sub$k)]
      xs[is.na(xs)] <- 0
      W[[paste0(cv, s)]] <- xs
    }
  }
  js <- sort(unique(d$j))
  lines <- c(paste0("U =~ ", paste0("1*y", slots, collapse = " + ")))
  for (j in js) {
    sj <- slots[startsWith(slots, paste0(j, "_"))]
    lines <- c(lines, paste0("V", j, " =~ ", paste0("1*y", sj, collapse = " + ")))
  }
  for (s in slots) {
    rhs <- paste0("b_", covs, "*", covs, s, collapse = " + ")
    lines <- c(lines, paste0("y", s, " ~ ", rhs), paste0("y", s, " ~ c*1"), paste0("y", s, " ~~ se*y", s))
  }
  lats <- c("U", paste0("V", js))
  lines <- c(lines, "U ~~ su*U", paste0("V", js, " ~~ sv*V", js))
  for (a in 1:(length(lats) - 1)) for (b in (a + 1):length(lats))
    lines <- c(lines, paste0(lats[a], " ~~ 0*", lats[b]))
  list(W = W, model = paste(lines, collapse = "\n"), slots = length(slots))
}

fits <- function(w, region) {
  w$W$region <- region
  out <- list()
  for (v in c("robust", "cluster_region")) {
    t0 <- proc.time()[["elapsed"]]
    if (v == "robust") {
      fit <- sem(w$model, data = w$W, missing = "ml", fixed.x = TRUE, se = "robust.huber.white",
                 test = "none", h1 = FALSE)
    } else {
      fit <- sem(w$model, data = w$W, missing = "ml", fixed.x = TRUE, se = "robust.cluster", test = "none", h1 = FALSE,
                 cluster = "region")
    }
    pe <- parameterEstimates(fit)
    pe <- pe[pe$label != "" & !duplicated(pe$label), ]
    out[[v]] <- list(loglik = as.numeric(logLik(fit)),
                     converged = lavInspect(fit, "converged"),
                     estimates = as.list(setNames(pe$est, pe$label)),
                     std_errors = as.list(setNames(pe$se, pe$label)),
                     seconds = proc.time()[["elapsed"]] - t0)
  }
  out
}

## check the options on seed_balanced against the shipped reference
seed <- read.csv(file.path(csv_dir, "seed_balanced.csv"))
ws <- wide(seed, "x")
chk <- fits(ws, ceiling(ws$W$k / 10))
ref <- fromJSON(file.path(csv_dir, "seed_balanced.json"))$inference
for (v in c("robust", "cluster_region")) {
  for (p in names(ref[[v]]$std_errors)) {
    a <- chk[[v]]$std_errors[[p]]; b <- ref[[v]]$std_errors[[p]]
    if (abs(a - b) > 1e-6 * abs(b)) stop(sprintf("seed_balanced %s %s: %.10g vs reference %.10g", v, p, a, b))
  }
}
cat("seed_balanced: robust and cluster_region standard errors reproduced\n")

d <- read.csv(file.path(csv_dir, "unbalanced.csv"))
w <- wide(d, c("x1", "z"))
res <- fits(w, (w$W$k - 1) %/% 10)
res$program <- sprintf(paste0("lavaan %s on R %s: sem(missing = 'ml', fixed.x = TRUE, se = 'robust.huber.white' | 'robust.cluster'",
                              "[, cluster = 'region']), wide form (%d slots, %d rows); region = (k - 1) %%/%% 10"),
                       packageDescription("lavaan")$Version, as.character(getRversion()), w$slots, nrow(w$W))
res$labels <- list(b_x1 = "x1", b_z = "z", c = "Intercept", se = "var(Residual)", su = "var(k)", sv = "var(j)")
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out_json)
cat("wrote", out_json, "\n")
