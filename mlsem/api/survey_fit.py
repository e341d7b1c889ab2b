"""api layer: ``fit(data, formula, survey=SurveyDesign(...))`` — pseudo-maximum
likelihood with weights at every level and design-based standard errors
(issue 17).  See mlsem.spec.survey (the declaration), mlsem.data.weights (checks
and scaling), mlsem.model.pseudo (the pseudo-likelihood), mlsem.inference.design
(the linearised variance)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from ..data.encode import load
from ..data.prepare import prepare
from ..data.weights import level_weights, subpop_rows, survey_columns, top_design
from ..errors import MlsemError
from ..estimate.optimize import identification, information, optimize
from ..inference.design import design_info, linearized, meat, psu_totals
from ..model.multilevel import Model
from ..model.pseudo import Hierarchy, PseudoModel
from ..model.scores import row_scores
from ..results.fitresult import FitResult
from ..spec.formula import effects_of, nest_levels, parse_formula
from ..spec.survey import SurveyDesign
from ..spec.table import multilevel_table


def check_survey_options(survey, *, vce="mixed", weights=None, method="ml", effects=None,
                         residuals=None, coefficients=None, df=None, backend="auto",
                         client=None, npartitions=None):
    """The combinations a survey design is refused with, each said clearly."""
    if not isinstance(survey, SurveyDesign):
        raise MlsemError(f"survey={survey!r} must be an mlsem.SurveyDesign")
    if weights is not None:
        raise MlsemError("weights= and survey= together: give the top-level weights in the "
                         "design, SurveyDesign(weights={top level: column})")
    if vce != "mixed":
        raise MlsemError(f"vce={vce!r} with survey=: the standard errors of a survey design are "
                         "the linearised (design-based) ones; for cluster-robust errors of top-level "
                         "weights use weights= and vce=('cluster', column) instead")
    if not isinstance(method, str) or method.lower() != "ml":
        raise MlsemError(f"method={method!r} with survey=: survey designs are fitted by "
                         "pseudo-maximum likelihood (method='ml') only; REML and ADF are not "
                         "defined for weights at several levels here")
    if effects or residuals or coefficients:
        raise MlsemError("effects=, residuals= and coefficients= (relaxations) are not supported "
                         "with survey=: fit the mixed model's constraints")
    if df is not None:
        raise MlsemError(f"df={df!r} with survey=: tests and intervals use the design degrees "
                         "of freedom (#PSU - #strata)")
    if backend == "dask" or client is not None or npartitions is not None:
        raise MlsemError("backend='dask' is not supported with survey=: fit in one process")


def fit_survey(data, formula, survey, *, index=None, backend="auto", nthreads=None,
               progress=None):
    t0 = time.perf_counter()
    F = parse_formula(formula)
    levels = nest_levels(F)
    level_cols = [lv[-1] for lv in levels]
    top = level_cols[0]
    L = len(levels)
    extra = ([index] if index else []) + survey_columns(survey, level_cols)
    df_all, F, encoding = load(data, F, extra)
    tab = top_design(df_all, top, survey)
    dinfo = design_info(tab, top, survey)
    df = subpop_rows(df_all, survey.subpop)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects_of(F), index=index)
    H = Hierarchy(prep, [None] * (L + 1))
    ws = level_weights(df, prep, H, survey, level_cols)
    table = multilevel_table(prep, F, levels)
    if prep.nobs <= table.nparams:
        raise MlsemError(f"data: {prep.nobs} observation(s) for {table.nparams} parameters: too "
                         "few to estimate the model")
    w0 = ws[0] if ws[0] is not None else np.ones(prep.nrows)
    # The pseudo-log-likelihood scales with the top-level weights while the
    # optimiser's stopping rules are absolute: optimise with the top weights
    # normalised to sum to the number of top units, then scale the
    # log-likelihood and the Hessian back (the fit is invariant to their scale).
    wscale = float(w0.shape[0] / w0.sum())
    w0n = w0 * wscale
    lower = any(w is not None for w in ws[1:])
    if lower:
        model = PseudoModel(prep, table, [w0n] + list(ws[1:]), backend=backend, nthreads=nthreads)
    else:
        prep.wrow = np.ascontiguousarray(w0n)
        model = Model(prep, table, backend=backend, nthreads=nthreads)
    t1 = time.perf_counter()
    if progress is not None and hasattr(progress, "prepared"):
        progress.prepared(prep)
    opt = optimize(model, progress=progress)
    t2 = time.perf_counter()
    psi = opt.final
    info = information(model, psi, opt)
    # back to the weights as given: the model, the log-likelihood, the Hessian
    if lower:
        model.H.w[0] = np.asarray(w0, dtype=float)
        if getattr(model, "_fast", False):
            model._wlev[0] = np.ascontiguousarray(model.H.w[0])
    else:
        prep.wrow = np.ascontiguousarray(w0)
    if info is not None:
        info = info / wscale
    opt.loglik = float(opt.loglik) / wscale
    opt.gradient_norm = float(opt.gradient_norm) / wscale
    if opt.hessian is not None:
        opt.hessian = opt.hessian / wscale
    names = table.names
    kinds = [p.kind for p in table.params]
    S = model.unit_scores(psi) if lower else row_scores(model, psi)
    Sw = S * w0[:, None]
    top_ids = prep.top_ids.to_list()
    Z = psu_totals(dinfo, top_ids, Sw)
    M = meat(dinfo, Z)
    notes = []
    if info is None or not np.all(np.isfinite(info)):
        cov = np.full((len(names), len(names)), np.nan)
        identified, confounded = False, list(names)
        notes.append("the Hessian could not be computed at the estimate: no standard errors")
    else:
        identified, confounded = identification(info, names)
        cov = linearized(info, M)
    dfd = dinfo.df
    res = FitResult(
        formula=formula, names=names, kinds=kinds, estimate=psi.copy(), cov=cov,
        loglik=float(opt.loglik), converged=opt.converged, nobs=prep.nobs, vce="linearized",
        levels=prep.levels, opt=opt, outcome=F.outcome, identified=identified,
        confounded=confounded, lr_ols={}, dropped_covariate=prep.dropped_covariate,
        missing_outcome=prep.missing_outcome, npatterns=prep.npatterns, nslots=prep.nslots,
        timings={"prepare": t1 - t0, "optimize": t2 - t1,
                 "inference": time.perf_counter() - t2},
        model=model, info=info, notes=notes, backend=getattr(model, "backend", ""))
    res.attach_encoding(encoding)
    if dfd >= 1:
        res.df = np.array([float(dfd) if k == "fixed" else np.nan for k in kinds])
        res.df_method = f"design (#PSU - #strata = {dfd})"
    cum = _cumulative(H, ws, L)
    res.survey = SimpleNamespace(
        design=survey, info=dinfo, weights=ws, scores=S, top_weights=w0, psu_totals=Z, meat=M,
        top=top, level_cols=level_cols, top_ids=top_ids, df=dfd, design_table=tab,
        weighted_counts=cum, pseudo=True)
    res.notes += design_notes(res)
    return res


def _cumulative(H, ws, L) -> list:
    """Per level (then the observations) the sum over its units of the product
    of the weights from the top down to the unit: the weighted counts."""
    prod = np.ones(H.nunits[0]) if ws[0] is None else ws[0].copy()
    out = [float(prod.sum())]
    for d in range(1, L):
        prod = prod[H.parent[d]] * (1.0 if ws[d] is None else ws[d])
        out.append(float(prod.sum()))
    po = prod[H.obs_unit] * (1.0 if ws[L] is None else ws[L])
    out.append(float(po.sum()))
    return out


def design_notes(res) -> list:
    sv = res.survey
    d, info = sv.design, sv.info
    out = []
    strata = f"{info.nstrata} strata ({d.strata})" if d.strata else "1 stratum"
    psu = f"{info.npsu} PSUs ({d.psu})" if d.psu else f"{info.npsu} PSUs (the {sv.top} units)"
    fpc = "no FPC" if d.fpc is None else f"FPC {d.fpc!r}"
    out.append(f"survey design: {strata}, {psu}, design df = {sv.df}, {fpc}, singleton={d.singleton!r}; "
               "std. errors by linearisation, H^-1 M H^-1 (M: between-PSU variance of the score "
               "totals within strata)")
    if d.weights:
        levels = sv.level_cols + ["obs"]
        parts = []
        for key, col in d.weights.items():
            how = "not rescaled" if key == sv.top or d.scale == "none" else f"scale={d.scale!r} within the parent unit"
            parts.append(f"{key}: {col} ({how})")
        parts.sort(key=lambda s: levels.index(s.split(":")[0]))
        out.append("pseudo-likelihood weights " + "; ".join(parts))
    names = sv.level_cols + ["observations"]
    unw = [lv.ngroups for lv in res.levels] + [res.nobs]
    out.append("counts (unweighted / weighted): " + ", ".join(
        f"{n} {u:,} / {w:,.6g}" for n, u, w in zip(names, unw, sv.weighted_counts)))
    if d.subpop is not None:
        out.append(f"subpopulation {d.subpop}: estimates on its {res.nobs:,} observations, "
                   "standard errors from the whole design")
    out.append("the log-likelihood is a pseudo-log-likelihood: LR tests, AIC and BIC are not "
               "valid under the design and are refused")
    return out
