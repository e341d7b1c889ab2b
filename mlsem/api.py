"""api layer: ``fit()``, argument validation, frozen fit options."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .data import collect_columns, prepare
from .errors import MlsemError
from .estimate import information, optimize, vcov_from_information
from .formula import nest_levels, parse_formula
from .model import Model
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
        backend: str = "auto", nthreads: int | None = None, progress=None) -> FitResult:
    """Fit a nested random-effects model by FIML on its wide SEM form.

    ``formula`` is lme4's: ``"y ~ x + (1 | k/j)"`` (= xtmixed y x || k: || j:, mle).
    ``data``: a Parquet file, directory or glob, a CSV file, a Polars
    DataFrame/LazyFrame, a pandas DataFrame or a pyarrow Table.
    ``index``: column ordering observations within the innermost group.
    ``vce``: "mixed" (lme4/xtmixed standard errors) or "oim" (full observed
    information, as Stata's sem and lavaan report).
    """
    opts = _check_options(formula, index, vce, backend, nthreads)
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
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index)
    t1 = time.perf_counter()
    table = multilevel_table(prep, F, levels)
    model = Model(prep, table, backend=opts.backend, nthreads=opts.nthreads)
    opt = optimize(model, progress=progress)
    t2 = time.perf_counter()
    return _finish(model, opt, opts, F, prep, {"prepare": t1 - t0, "optimize": t2 - t1}, t2)


def _finish(model, opt, opts, F, prep, timings, t2) -> FitResult:
    table = model.table
    psi = opt.final
    info = information(model, psi, opt)
    names = table.names
    kinds = [p.kind for p in table.params]
    n = len(names)
    if info is None or not np.all(np.isfinite(info)):
        cov = np.full((n, n), np.nan)
        identified, confounded = False, list(names)
    else:
        identified, confounded = identification(info, names)
        if opts.vce == "mixed":
            fixed = np.array([k == "fixed" for k in kinds])
            groups = [np.flatnonzero(fixed), np.flatnonzero(~fixed)]
        else:
            groups = None
        cov = vcov_from_information(info, groups)
    lr = {}
    nvc = sum(1 for k in kinds if k in ("var", "cov"))
    if nvc:
        ll0 = _ols_loglik(prep.y, prep.X)
        chi2 = max(0.0, 2.0 * (opt.loglik - ll0))
        from scipy import stats
        p = float(stats.chi2.sf(chi2, nvc))
        if nvc == 1:
            p *= 0.5
        lr = {"chi2": chi2, "df": nvc, "p_value": p, "loglik_linear_regression": ll0}
    timings = dict(timings, inference=time.perf_counter() - t2)
    return FitResult(
        formula=opts.formula, names=names, kinds=kinds, estimate=psi.copy(), cov=cov,
        loglik=float(opt.loglik), converged=opt.converged, nobs=prep.nobs, vce=opts.vce,
        levels=prep.levels, opt=opt, outcome=F.outcome, identified=identified,
        confounded=confounded, lr_ols=lr, dropped_covariate=prep.dropped_covariate,
        missing_outcome=prep.missing_outcome, npatterns=prep.npatterns, nslots=prep.nslots,
        timings=timings, model=model, info=info)
