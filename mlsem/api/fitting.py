"""api layer: ``fit()``, argument validation, frozen fit options."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.prepare import prepare
from ..data.encode import load
from ..errors import ConvergenceWarning, MlsemError
from ..estimate.optimize import identification, information, optimize, vcov_from_information
from ..results.boundary import boundary_note, singular_blocks
from ..estimate.grouped import optimize_auto
from ..spec.formula import effects_of, nest_levels, parse_formula
from ..model.multilevel import Model
from ..spec.relax import coefficient_design, needs_warm_start, relax_table, warm_start
from ..results.fitresult import FitResult
from ..spec.table import multilevel_table
from ..inference.vce import apply_vce, check_inference_options, unit_columns

VCE = ("mixed", "oim", "robust", "('cluster', column)")


@dataclass(frozen=True)
class FitOptions:
    formula: str
    index: str | None
    vce: str
    backend: str
    nthreads: int | None
    cluster: str | None = None
    weights: str | None = None
    method: str = "ml"


def _check_options(formula, index, vce, backend, nthreads, weights=None, method="ml") -> FitOptions:
    vce, cluster, weights, method = check_inference_options(vce, weights, method)
    if backend not in ("auto", "cython", "numpy", "dask"):
        raise MlsemError(f"backend={backend!r} is not one of 'auto', 'cython', 'numpy', 'dask'")
    if nthreads is not None and (not isinstance(nthreads, int) or nthreads < 1):
        raise MlsemError(f"nthreads={nthreads!r} must be a positive integer")
    if index is not None and not isinstance(index, str):
        raise MlsemError(f"index={index!r} must be a column name")
    return FitOptions(formula, index, vce, backend, nthreads, cluster, weights, method)


def _ols_loglik(y, X, ols=None):
    """Log-likelihood of the linear regression of y on X; ``ols``: the model's
    (beta, mean squared residual) by the normal equations, when it has them
    (lstsq again took 0.09 s on 1.15M rows)."""
    n = len(y)
    if ols is not None and ols[0] is not None and X.shape[1] and ols[1] > 0:
        return -0.5 * n * (math.log(2 * math.pi) + math.log(ols[1]) + 1.0)
    if X.shape[1]:
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = y - X @ beta
    else:
        r = y
    s2 = float(r @ r) / n
    return -0.5 * n * (math.log(2 * math.pi) + math.log(s2) + 1.0)


def fit(data, formula, *, index: str | None = None, vce="mixed",
        weights: str | None = None, method: str = "ml", outcomes: dict | None = None,
        effects: dict | None = None, residuals: dict | None = None,
        coefficients: dict | None = None, df: str | None = None,
        backend: str = "auto", nthreads: int | None = None, progress=None,
        client=None, npartitions: int | None = None, survey=None) -> FitResult:
    """Fit a nested random-effects model by FIML on its wide SEM form.

    ``formula`` is lme4's: ``"y ~ x + (1 | k/j)"`` (= xtmixed y x || k: || j:, mle).
    ``data``: a Parquet file, directory or glob, a CSV file, a Polars
    DataFrame/LazyFrame, a pandas DataFrame or a pyarrow Table.
    ``index``: column ordering observations within the innermost group.
    ``vce``: "mixed" (lme4/xtmixed standard errors), "oim" (full observed
    information, as Stata's sem and lavaan report), "robust" (Huber-White
    sandwich, scores per top-level unit) or ("cluster", column) (clusters of
    top-level units).  ``weights``: a column of sampling weights of the
    top-level units (pseudo-ML, rescaled to sum to the number of units;
    sandwich standard errors).  ``method``: "ml", "reml" (lme4's default) or
    "adf" (= "gmm": distribution-free weighted least squares on the moments of
    the wide form, complete data only; mlsem.estimate.adf).
    See mlsem.inference.vce.
    ``backend="dask"`` with ``client=`` (a dask.distributed.Client or a
    scheduler address): the data are read, split by the top-level id into
    ``npartitions`` (default: one per worker) and held by the workers; see
    mlsem.backends.dask.
    ``effects``, ``residuals``, ``coefficients``: relaxations of the mixed
    model's constraints (mlsem.spec.relax), e.g. ``effects={"j": {"variance": "slot"}}``,
    ``residuals={"correlation": "ar1"}``, ``coefficients={"x": "j"}``.
    ``df``: None (normal-theory z tests), "satterthwaite" (lmerTest's; ML or
    REML) or "kenward-roger" (pbkrtest's; REML only): t tests of the fixed
    effects on small-sample df (mlsem.inference.smallsample).
    ``progress``: None (silent), or a callable ``progress(iteration, loglik)``
    called after each optimiser iteration; if the object also has methods
    ``prepared(prep)`` (called once the data are reshaped, with the prepared
    layout: ``prep.nobs``, ``prep.nrows``, ``prep.nslots``, ``prep.npatterns``)
    and ``stage(text)`` (called when a stage such as the standard errors
    starts), they are called too.  The command line's progress lines on
    stderr are such an object (mlsem.cli.main.Progress).
    ``backend``: "auto" (the compiled kernel; the NumPy oracle with a
    PerformanceWarning if it cannot be imported), "cython", "numpy" (the
    readable oracle, ~100x slower) or "dask".  ``nthreads``: the kernel's
    OpenMP threads (default: the CPUs this process may use, or
    MLSEM_NUM_THREADS).
    ``survey``: an mlsem.SurveyDesign (weights at every level, strata, PSUs,
    FPC, subpopulation): pseudo-maximum likelihood with design-based
    (linearised) standard errors; see mlsem.api.survey_fit and docs/survey.md.
    ``formula`` a list of formulas, one per outcome (``["y1 ~ x + (1 | k/j)",
    "y2 ~ x + (1 | k/j)"]``): several outcomes measured on the same units, fitted
    jointly (mlsem.api.multivariate); ``outcomes`` then restricts the covariances
    across outcomes: ``{"k": "independent", "residual": "independent"}`` (default
    "unstructured" at every level and for the residuals).
    """
    if survey is not None:
        if isinstance(formula, (list, tuple)):
            raise MlsemError("survey= with several outcomes (a list of formulas) is not supported: "
                             "fit one outcome at a time under the design")
        if outcomes is not None:
            raise MlsemError("outcomes= needs several outcomes (a list of formulas), which survey= "
                             "does not support")
        from .survey_fit import check_survey_options, fit_survey
        check_survey_options(survey, vce=vce, weights=weights, method=method, effects=effects,
                             residuals=residuals, coefficients=coefficients, df=df,
                             backend=backend, client=client, npartitions=npartitions)
        if backend not in ("auto", "cython", "numpy"):
            raise MlsemError(f"backend={backend!r} is not one of 'auto', 'cython', 'numpy'")
        return fit_survey(data, formula, survey, index=index, backend=backend,
                          nthreads=nthreads, progress=progress)
    if isinstance(formula, (list, tuple)):
        from .multivariate import fit_multi
        opts = _check_options("; ".join(map(str, formula)), index, vce, backend, nthreads,
                              weights, method)
        return fit_multi(data, formula, outcomes=outcomes, index=index, opts=opts, df=df,
                         effects=effects, residuals=residuals, coefficients=coefficients,
                         client=client, npartitions=npartitions, progress=progress,
                         finish=_finish)
    if outcomes is not None:
        raise MlsemError("outcomes= needs several outcomes: give a list of formulas, one per outcome")
    opts = _check_options(formula, index, vce, backend, nthreads, weights, method)
    df_method = None
    if df is not None:   # (the module is imported only when asked for: 13 ms of a cold fit)
        from ..inference.smallsample import check_df_option
        df_method = check_df_option(df, opts.method)
    if df_method is not None:
        if backend == "dask":
            raise MlsemError("df= is not available with backend='dask'")
        if opts.vce != "mixed" or opts.weights:
            raise MlsemError(f"df={df!r} needs vce='mixed' and no weights (small-sample df "
                             "refer to the model-based covariance of the fixed effects)")
    relax_effects = effects
    relaxed = bool(effects or residuals or coefficients)
    t0 = time.perf_counter()
    F = parse_formula(formula)
    levels = nest_levels(F)
    level_cols = [lv[-1] for lv in levels]
    effects = effects_of(F)
    if backend == "dask":
        if opts.vce not in ("mixed", "oim") or opts.weights or opts.method != "ml":
            raise MlsemError("backend='dask' supports vce='mixed' or 'oim', ML and no weights")
        from ..backends.dask import build
        model = build(data, client, F, levels, effects, index, npartitions=npartitions,
                      nthreads=nthreads, relax=(relax_effects, residuals, coefficients))
        try:
            t1 = time.perf_counter()
            start = None
            if model.base_table is not None and needs_warm_start(model.table):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    base = optimize(model.base())
                start = warm_start(model.table, model.base_table, base.final)
            opt = optimize(model, start=start, progress=progress)
            t2 = time.perf_counter()
            res = _finish(model, opt, opts, model.formula, model.prep,
                          {"prepare": t1 - t0, "optimize": t2 - t1}, t2)
            res.encoding = model.encoding
            res.notes += model.notes()
            return res
        finally:
            model.close()
    if client is not None or npartitions is not None:
        raise MlsemError("client= and npartitions= need backend='dask'")
    extra = ([index] if index else []) + [c for c in (opts.weights, opts.cluster) if c]
    df, F, encoding = load(data, F, extra)
    effects = effects_of(F)
    design = coefficient_design(coefficients, F, levels)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index,
                   design=design)
    unit = unit_columns(df, level_cols[0], prep, opts)
    t1 = time.perf_counter()
    if progress is not None and hasattr(progress, "prepared"):
        progress.prepared(prep)  # the command line reports the reshaped data
    base_table = multilevel_table(prep, F, levels)
    table = relax_table(base_table, prep, relax_effects, residuals, index)
    if prep.nobs <= table.nparams:
        raise MlsemError(
            f"data: {prep.nobs} observation(s) for {table.nparams} parameters "
            f"({', '.join(table.names)}): too few to estimate the model")
    model = Model(prep, table, backend=opts.backend, nthreads=opts.nthreads)
    if opts.method == "adf":
        from .semfit import multilevel_adf
        res = multilevel_adf(model, opts, F, prep, t0, t1)
        res.attach_encoding(encoding)
        return res
    if opts.method == "reml":
        if relaxed:
            raise MlsemError("method='reml' is not supported with effects=, residuals= or "
                             "coefficients= yet: fit the relaxed model by ML")
        res = fit_reml(model, opts, F, prep, t0, t1)
        res.attach_encoding(encoding)
        if df_method is not None:
            from ..inference.smallsample import apply_df
            t3 = time.perf_counter()
            res = apply_df(res, df_method, res.reml_info, res.reml_info_params)
            res.timings["df"] = time.perf_counter() - t3
        return res
    start = None
    if table is not base_table and needs_warm_start(table):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            base = optimize(Model(prep, base_table, backend=opts.backend, nthreads=opts.nthreads))
        start = warm_start(table, base_table, base.final)
    opt = optimize_auto(model, start=start, progress=progress)
    if progress is not None and hasattr(progress, "stage"):
        progress.stage("standard errors: observed information")
    t2 = time.perf_counter()
    res = _finish(model, opt, opts, F, prep, {"prepare": t1 - t0, "optimize": t2 - t1}, t2)
    res.attach_encoding(encoding)
    res = apply_vce(res, opts, unit)
    if df_method is not None:
        from ..inference.smallsample import apply_df
        t3 = time.perf_counter()
        res = apply_df(res, df_method)
        res.timings["df"] = time.perf_counter() - t3
    return res


def _finish(model, opt, opts, F, prep, timings, t2) -> FitResult:
    table = model.table
    psi = opt.final
    info = information(model, psi, opt)
    names = table.names
    kinds = [p.kind for p in table.params]
    n = len(names)
    notes = []
    if info is None or not np.all(np.isfinite(info)):
        cov = np.full((n, n), np.nan)
        identified, confounded = False, list(names)
        notes.append("the observed information could not be computed at the estimate (a "
                     "difference step left the admissible set on both sides, e.g. a singular "
                     "covariance block): identification is unchecked, every parameter is "
                     "listed as possibly confounded, and there are no standard errors")
    else:
        if opts.vce == "mixed":
            fixed = np.array([k == "fixed" for k in kinds])
            groups = [np.flatnonzero(fixed), np.flatnonzero(~fixed)]
            # judged block by block, as the covariance is computed: at a boundary fit
            # the variance block is singular while (X'V^-1X) is not, and the fixed
            # effects keep their standard errors (as in lme4); the cross terms of the
            # whole information made them look confounded too
            identified, confounded = True, []
            for idx in groups:
                if len(idx):
                    ok, conf = identification(info[np.ix_(idx, idx)], [names[i] for i in idx])
                    identified, confounded = identified and ok, confounded + conf
            confounded = [n for n in names if n in set(confounded)]
        else:
            identified, confounded = identification(info, names)
            groups = None
        cov = vcov_from_information(info, groups)
        if not identified:  # no standard error for what the data cannot tell apart
            bad = [names.index(c) for c in confounded]
            cov[bad, :] = np.nan
            cov[:, bad] = np.nan
    boundary = singular_blocks(names, kinds, psi)
    if boundary:
        notes.append(boundary_note(boundary))
    lr = {}
    # parameters beyond linear regression's: variance components, residual
    # correlations, and residual variances beyond the first (relaxations)
    nvc = sum(1 for k in kinds if k in ("var", "cov", "corr")) + max(kinds.count("resid") - 1, 0)
    if nvc and opts.weights is None:
        ll0 = model.ols_loglik() if hasattr(model, "ols_loglik") else _ols_loglik(
            prep.y, prep.X, getattr(model, "ols", None))
        chi2 = max(0.0, 2.0 * (opt.loglik - ll0))
        from scipy.special import chdtrc    # = stats.chi2.sf, without its ~3 ms of overhead
        p = float(chdtrc(nvc, chi2))
        if nvc == 1 and kinds.count("var") == 1:
            p *= 0.5
        lr = {"chi2": chi2, "df": nvc, "p_value": p, "loglik_linear_regression": ll0}
    timings = dict(timings, inference=time.perf_counter() - t2)
    return FitResult(
        formula=opts.formula, names=names, kinds=kinds, estimate=psi.copy(), cov=cov,
        loglik=float(opt.loglik), converged=opt.converged, nobs=prep.nobs, vce=opts.vce,
        levels=prep.levels, opt=opt, outcome=F.outcome, identified=identified,
        confounded=confounded, boundary=boundary, lr_ols=lr, dropped_covariate=prep.dropped_covariate,
        missing_outcome=prep.missing_outcome, npatterns=prep.npatterns, nslots=prep.nslots,
        timings=timings, model=model, info=info, notes=notes,
        backend=getattr(model, "backend", ""))


def fit_reml(model, opts, F, prep, t0, t1):
    from ..estimate.reml import optimize_reml, reml_vcov
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, obj = optimize_reml(model)
        if not opt.converged:
            # a second start from the ML estimates (near the REML ones): a random-slope
            # block on the boundary (correlation -1) can trap the default start at a
            # corner where L-BFGS-B stalls; kept only if it converges, no worse
            ml = optimize(model)
            opt2, obj2 = optimize_reml(model, start=ml.final)
            if opt2.converged and opt2.loglik >= opt.loglik - 1e-9 * abs(opt.loglik):
                opt, obj = opt2, obj2
    for w in caught:   # the first attempt's non-convergence is moot if the second converged
        if not (opt.converged and issubclass(w.category, ConvergenceWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    t2 = time.perf_counter()
    psi = opt.final
    cov, info = reml_vcov(obj, psi)
    names = model.table.names
    kinds = [p.kind for p in model.table.params]
    fixed = np.array([k == "fixed" for k in kinds])
    cov[np.ix_(fixed, ~fixed)] = 0.0     # the mixed-model convention: no cross terms
    cov[np.ix_(~fixed, fixed)] = 0.0
    identified, confounded = (True, [])
    if info is not None:
        var_names = [n for n, k in zip(names, kinds) if k != "fixed"]
        identified, confounded = identification(info, var_names)
    res = FitResult(
        formula=opts.formula, names=names, kinds=kinds, estimate=psi.copy(), cov=cov,
        loglik=float(opt.loglik), converged=opt.converged, nobs=prep.nobs, vce="mixed",
        levels=prep.levels, opt=opt, outcome=F.outcome, identified=identified,
        confounded=confounded, boundary=singular_blocks(names, kinds, psi),
        dropped_covariate=prep.dropped_covariate,
        missing_outcome=prep.missing_outcome, npatterns=prep.npatterns, nslots=prep.nslots,
        timings={"prepare": t1 - t0, "optimize": t2 - t1,
                 "inference": time.perf_counter() - t2},
        model=model, info=None, method="REML", backend=model.backend, reml_info=info,
        reml_info_params=np.flatnonzero(~obj.fixed))
    res.notes.append(f"REML criterion = {-2.0 * opt.loglik:.6f} (lme4's; the log-likelihood "
                     "shown is the restricted one)")
    if res.boundary:
        res.notes.append(boundary_note(res.boundary))
    return res
