"""api layer: ``fit()``, argument validation, frozen fit options."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .data import collect_columns, prepare
from .errors import ConvergenceWarning, MlsemError
from .estimate import information, optimize, vcov_from_information
from .formula import nest_levels, parse_formula
from .model import Model
from .relax import coefficient_design, needs_warm_start, relax_table, warm_start
from .results import FitResult, identification
from .spec import multilevel_table

VCE = ("mixed", "oim")


@dataclass(frozen=True)
class FitOptions:
    formula: str
    index: str | None
    vce: str
    backend: str
    nthreads: int | None


def _check_options(formula, index, vce, backend, nthreads) -> FitOptions:
    if vce not in VCE:
        raise MlsemError(f"vce={vce!r} is not one of {', '.join(map(repr, VCE))}")
    if backend not in ("auto", "cython", "numpy"):
        raise MlsemError(f"backend={backend!r} is not one of 'auto', 'cython', 'numpy'")
    if nthreads is not None and (not isinstance(nthreads, int) or nthreads < 1):
        raise MlsemError(f"nthreads={nthreads!r} must be a positive integer")
    if index is not None and not isinstance(index, str):
        raise MlsemError(f"index={index!r} must be a column name")
    return FitOptions(formula, index, vce, backend, nthreads)


def _ols_loglik(y, X):
    n = len(y)
    if X.shape[1]:
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = y - X @ beta
    else:
        r = y
    s2 = float(r @ r) / n
    return -0.5 * n * (math.log(2 * math.pi) + math.log(s2) + 1.0)


def fit(data, formula: str, *, index: str | None = None, vce: str = "mixed",
        backend: str = "auto", nthreads: int | None = None, progress=None,
        effects: dict | None = None, residuals: dict | None = None,
        coefficients: dict | None = None) -> FitResult:
    """Fit a nested random-effects model by FIML on its wide SEM form.

    ``formula`` is lme4's: ``"y ~ x + (1 | k/j)"`` (= xtmixed y x || k: || j:, mle).
    ``data``: a Parquet file, directory or glob, a CSV file, a Polars
    DataFrame/LazyFrame, a pandas DataFrame or a pyarrow Table.
    ``index``: column ordering observations within the innermost group.
    ``vce``: "mixed" (lme4/xtmixed standard errors) or "oim" (full observed
    information, as Stata's sem and lavaan report).
    ``effects``, ``residuals``, ``coefficients``: relaxations of the mixed
    model's constraints (mlsem.relax), e.g. ``effects={"j": {"variance": "slot"}}``,
    ``residuals={"correlation": "ar1"}``, ``coefficients={"x": "j"}``.
    """
    opts = _check_options(formula, index, vce, backend, nthreads)
    relax_effects = effects
    t0 = time.perf_counter()
    F = parse_formula(formula)
    levels = nest_levels(F)
    level_cols = [lv[-1] for lv in levels]
    effects = {}
    for rt in F.random:
        d = len(rt.group) - 1
        if d in effects:
            raise MlsemError(f"formula: two random terms for the level {':'.join(rt.group)!r}")
        effects[d] = list(rt.effects)
    cols = F.columns + ([index] if index else [])
    numeric = [F.outcome] + list(F.fixed) + [e for v in effects.values() for e in v if e != "Intercept"]
    df = collect_columns(data, cols, numeric, level_cols)
    design = coefficient_design(coefficients, F, levels)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index,
                   design=design)
    t1 = time.perf_counter()
    base_table = multilevel_table(prep, F, levels)
    table = relax_table(base_table, prep, relax_effects, residuals, index)
    model = Model(prep, table, backend=opts.backend, nthreads=opts.nthreads)
    start = None
    if table is not base_table and needs_warm_start(table):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            base = optimize(Model(prep, base_table, backend=opts.backend, nthreads=opts.nthreads))
        start = warm_start(table, base_table, base.final)
    opt = optimize(model, start=start, progress=progress)
    t2 = time.perf_counter()
    return _finish(model, opt, opts, F, prep, {"prepare": t1 - t0, "optimize": t2 - t1}, t2)


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
        identified, confounded = identification(info, names)
        if opts.vce == "mixed":
            fixed = np.array([k == "fixed" for k in kinds])
            groups = [np.flatnonzero(fixed), np.flatnonzero(~fixed)]
        else:
            groups = None
        cov = vcov_from_information(info, groups)
        if not identified:  # no standard error for what the data cannot tell apart
            bad = [names.index(c) for c in confounded]
            cov[bad, :] = np.nan
            cov[:, bad] = np.nan
    lr = {}
    # parameters beyond linear regression's: variance components, residual
    # correlations, and residual variances beyond the first (relaxations)
    nvc = sum(1 for k in kinds if k in ("var", "cov", "corr")) + max(kinds.count("resid") - 1, 0)
    if nvc:
        ll0 = _ols_loglik(prep.y, prep.X)
        chi2 = max(0.0, 2.0 * (opt.loglik - ll0))
        from scipy import stats
        p = float(stats.chi2.sf(chi2, nvc))
        if nvc == 1 and kinds.count("var") == 1:
            p *= 0.5
        lr = {"chi2": chi2, "df": nvc, "p_value": p, "loglik_linear_regression": ll0}
    timings = dict(timings, inference=time.perf_counter() - t2)
    return FitResult(
        formula=opts.formula, names=names, kinds=kinds, estimate=psi.copy(), cov=cov,
        loglik=float(opt.loglik), converged=opt.converged, nobs=prep.nobs, vce=opts.vce,
        levels=prep.levels, opt=opt, outcome=F.outcome, identified=identified,
        confounded=confounded, lr_ols=lr, dropped_covariate=prep.dropped_covariate,
        missing_outcome=prep.missing_outcome, npatterns=prep.npatterns, nslots=prep.nslots,
        timings=timings, model=model, info=info, notes=notes)
