## make_extra.R -- extra lme4 reference values for the multilevel cases.
##
## Usage: Rscript make_extra.R <csv_dir> <reference_dir> <out_json>
##   csv_dir:        directory holding <case>.csv (converted from <case>.parquet
##                   by make_extra.sh; R here has no arrow package)
##   reference_dir:  tests/reference (only read, for the printed comparison of
##                   ml_tight against the shipped `lme4` block)
##   out_json:       output file (tests/reference/extra/lme4_extra.json)
##
## Per case:
##   reml      lmer(REML = TRUE), tight optimum
##   ml_tight  lmer(REML = FALSE), same control (check of the shipped ML values)
##   ranef     (seed_balanced, unbalanced, pastes) conditional modes and
##             conditional SDs of the ML fit, ranef(fit, condVar = TRUE)
##   random_slope_uncorrelated (unbalanced, hetero_corr)
##             lmer(y ~ <fixed> + (1 + <x> || k) + (1 | k:j), REML = FALSE)
## Variances are given twice: `variances` keyed by our level names (the id
## columns: top level, inner level, "Residual") and `variances_lme4` keyed by
## lme4's grouping-factor names ("k", "j:k", "Residual").

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 3) stop("usage: Rscript make_extra.R <csv_dir> <reference_dir> <out_json>")
csv_dir <- args[1]; ref_dir <- args[2]; out_json <- args[3]

## ---- tight optimiser control ------------------------------------------------
## NLopt's BOBYQA through lme4's nloptwrap; lme4's defaults (xtol_abs = 1e-8,
## ftol_abs = 1e-8) would stop early, so the absolute tolerances are
## tightened/disabled as well.
opt_ctrl <- list(algorithm = "NLOPT_LN_BOBYQA", xtol_rel = 1e-12, ftol_rel = 1e-14,
                 xtol_abs = 1e-12, ftol_abs = 0, maxeval = 1e5)
ctrl <- lmerControl(optimizer = "nloptwrap", optCtrl = opt_ctrl)
opt_desc <- "optimizer = nloptwrap (NLOPT_LN_BOBYQA, xtol_rel = 1e-12, ftol_rel = 1e-14, xtol_abs = 1e-12, ftol_abs = 0, maxeval = 1e5)"
## independent cross-check (printed only): minqa's bobyqa with a tiny rhoend
ctrl_check <- lmerControl(optimizer = "bobyqa",
                          optCtrl = list(rhobeg = 0.2, rhoend = 1e-12, maxfun = 1e5))

versions <- sprintf("lme4 %s on R %s", packageDescription("lme4")$Version,
                    as.character(getRversion()))
program <- function(reml) sprintf("%s: lmer(REML = %s), %s", versions,
                                  if (reml) "TRUE" else "FALSE", opt_desc)

## ---- cases -----------------------------------------------------------------
cases <- list(
  seed_balanced = list(top = "k", inner = "j", y = "y", x = "x", ranef = TRUE),
  unbalanced    = list(top = "k", inner = "j", y = "y", x = c("x1", "z"), ranef = TRUE, slope = "x1"),
  hetero_corr   = list(top = "k", inner = "j", y = "y", x = "x", ranef = FALSE, slope = "x"),
  pastes        = list(top = "batch", inner = "cask", y = "strength", x = character(0), ranef = TRUE),
  egsingle      = list(top = "schoolid", inner = "childid", y = "math", x = "year", ranef = FALSE),
  medium        = list(top = "k", inner = "j", y = "y", x = "x", ranef = FALSE)
)

rhs_fixed <- function(x) if (length(x)) paste(x, collapse = " + ") else "1"

## ---- helpers ---------------------------------------------------------------
fix_names <- function(v) { names(v) <- sub("^\\(Intercept\\)$", "Intercept", names(v)); v }
fixed_of <- function(fit) as.list(fix_names(fixef(fit)))
fixed_se_of <- function(fit) {
  se <- sqrt(diag(as.matrix(vcov(fit))))
  names(se) <- names(fixef(fit))
  as.list(fix_names(se))
}
## variance components: lme4 names and our names
variances_of <- function(fit, top, inner) {
  vc <- as.data.frame(VarCorr(fit))
  stopifnot(all(is.na(vc$var2)), all(vc$var1[vc$grp != "Residual"] == "(Intercept)"))
  lme4_names <- as.list(setNames(vc$vcov, vc$grp))
  nested <- paste0(inner, ":", top)
  ours_map <- setNames(c(top, inner, "Residual"), c(top, nested, "Residual"))
  stopifnot(setequal(vc$grp, names(ours_map)))
  ours <- as.list(setNames(vc$vcov, ours_map[vc$grp]))
  list(ours = ours[c(inner, top, "Residual")],
       lme4 = lme4_names[c(nested, top, "Residual")])
}
## optimiser finished cleanly and lme4 raised no convergence warning (the
## "boundary (singular) fit" message is not a convergence failure: see `singular`)
converged <- function(fit) {
  msgs <- c(fit@optinfo$conv$lme4$messages, unlist(fit@optinfo$warnings))
  msgs <- msgs[!grepl("singular", msgs)]
  fit@optinfo$conv$opt == 0 && length(msgs) == 0
}
max_grad <- function(fit) {
  g <- fit@optinfo$derivs$gradient
  if (is.null(g)) NA_real_ else max(abs(g))
}
check_opt <- function(fit, label) {
  alt <- update(fit, control = ctrl_check)
  if (isREML(fit)) { d <- REMLcrit(fit); da <- REMLcrit(alt) } else { d <- deviance(fit); da <- deviance(alt) }
  cat(sprintf("  %-28s crit = %.10f  (minqa bobyqa: %+.3e, |grad| = %.2e, converged = %s, singular = %s)\n",
              label, d, da - d, max_grad(fit), converged(fit), isSingular(fit)))
  if (da < d - 1e-7) warning(label, ": minqa bobyqa found a lower criterion by ", d - da)
}

ranef_rows <- function(fit, dat, top, inner) {
  re <- ranef(fit, condVar = TRUE)
  nested <- paste0(inner, ":", top)
  ## label -> original id values, from the data
  top_vals <- unique(dat[[top]])
  top_lookup <- setNames(top_vals, as.character(top_vals))
  pairs <- unique(dat[, c(top, inner)])
  pair_lab <- paste(pairs[[inner]], pairs[[top]], sep = ":")
  stopifnot(!anyDuplicated(pair_lab))
  out <- list()
  for (g in c(top, nested)) {
    m <- re[[g]]
    pv <- attr(m, "postVar")
    stopifnot(ncol(m) == 1, dim(pv)[1] == 1, dim(pv)[2] == 1, dim(pv)[3] == nrow(m))
    labs <- rownames(m)
    rows <- vector("list", length(labs))
    for (r in seq_along(labs)) {
      if (g == top) {
        stopifnot(labs[r] %in% names(top_lookup))
        rows[[r]] <- list(group = labs[r], top_id = top_lookup[[labs[r]]],
                          mode = m[r, 1], cond_sd = sqrt(pv[1, 1, r]))
      } else {
        p <- match(labs[r], pair_lab); stopifnot(!is.na(p))
        rows[[r]] <- list(group = labs[r], top_id = pairs[[top]][p], inner_id = pairs[[inner]][p],
                          mode = m[r, 1], cond_sd = sqrt(pv[1, 1, r]))
      }
    }
    out[[g]] <- rows
  }
  out
}

## ---- fit -------------------------------------------------------------------
result <- list()
for (nm in names(cases)) {
  cs <- cases[[nm]]
  dat <- read.csv(file.path(csv_dir, paste0(nm, ".csv")), stringsAsFactors = FALSE)
  form_txt <- sprintf("%s ~ %s + (1 | %s/%s)", cs$y, rhs_fixed(cs$x), cs$top, cs$inner)
  form <- as.formula(form_txt)
  cat(sprintf("%s: %d rows, %s\n", nm, nrow(dat), form_txt))

  fit_reml <- lmer(form, data = dat, REML = TRUE, control = ctrl)
  fit_ml   <- lmer(form, data = dat, REML = FALSE, control = ctrl)
  check_opt(fit_reml, "reml")
  check_opt(fit_ml, "ml_tight")

  v_reml <- variances_of(fit_reml, cs$top, cs$inner)
  v_ml   <- variances_of(fit_ml, cs$top, cs$inner)

  entry <- list(
    formula = form_txt,
    levels = c(cs$top, cs$inner),
    reml = list(
      program = program(TRUE),
      reml_criterion = unname(REMLcrit(fit_reml)),
      loglik_reml = as.numeric(logLik(fit_reml)),
      nobs = nobs(fit_reml),
      fixed = fixed_of(fit_reml),
      fixed_se = fixed_se_of(fit_reml),
      variances = v_reml$ours,
      variances_lme4 = v_reml$lme4,
      converged = converged(fit_reml),
      singular = isSingular(fit_reml)
    ),
    ml_tight = list(
      program = program(FALSE),
      loglik = as.numeric(logLik(fit_ml)),
      nobs = nobs(fit_ml),
      fixed = fixed_of(fit_ml),
      fixed_se = fixed_se_of(fit_ml),
      variances = v_ml$ours,
      variances_lme4 = v_ml$lme4,
      converged = converged(fit_ml),
      singular = isSingular(fit_ml)
    )
  )

  if (isTRUE(cs$ranef)) {
    entry$ranef <- list(
      program = paste0(program(FALSE), "; ranef(fit, condVar = TRUE), cond_sd = sqrt(postVar)"),
      factors = ranef_rows(fit_ml, dat, cs$top, cs$inner)
    )
  }

  if (!is.null(cs$slope)) {
    sform_txt <- sprintf("%s ~ %s + (1 + %s || %s) + (1 | %s:%s)", cs$y, rhs_fixed(cs$x),
                         cs$slope, cs$top, cs$top, cs$inner)
    fit_s <- lmer(as.formula(sform_txt), data = dat, REML = FALSE, control = ctrl)
    check_opt(fit_s, "random_slope_uncorrelated")
    vc <- as.data.frame(VarCorr(fit_s))
    ## `grp` is lme4's (make.names-mangled) term name: with `||` the two k terms
    ## become "k" and "k.1" and k:j becomes "k.j"; `factor` is the grouping
    ## factor each row belongs to (NA -> null for Residual).
    term_factor <- setNames(names(fit_s@flist)[attr(fit_s@flist, "assign")], names(VarCorr(fit_s)))
    cov_rows <- lapply(seq_len(nrow(vc)), function(r)
      list(grp = vc$grp[r], factor = unname(term_factor[vc$grp[r]]),
           var1 = vc$var1[r], var2 = vc$var2[r], vcov = vc$vcov[r]))
    entry$random_slope_uncorrelated <- list(
      program = program(FALSE),
      formula = sform_txt,
      loglik = as.numeric(logLik(fit_s)),
      nobs = nobs(fit_s),
      fixed = fixed_of(fit_s),
      fixed_se = fixed_se_of(fit_s),
      covariance = cov_rows,
      converged = converged(fit_s),
      singular = isSingular(fit_s)
    )
  }

  ## printed comparison with the shipped ML reference
  shipped_file <- file.path(ref_dir, paste0(nm, ".json"))
  if (file.exists(shipped_file)) {
    sh <- fromJSON(shipped_file)$lme4
    dl <- entry$ml_tight$loglik - sh$loglik
    df <- max(abs(unlist(entry$ml_tight$fixed)[names(sh$fixed)] - unlist(sh$fixed)))
    dv <- max(abs(unlist(entry$ml_tight$variances)[names(sh$variances)] - unlist(sh$variances)))
    cat(sprintf("  vs shipped lme4: dloglik = %+.3e, max|dfixed| = %.2e, max|dvar| = %.2e\n", dl, df, dv))
  }
  result[[nm]] <- entry
}

write_json(result, out_json, digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null")
cat("wrote", out_json, "\n")
