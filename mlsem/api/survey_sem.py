"""api layer: ``mlsem.sem(model, data, survey=SurveyDesign(...))`` — an SEM on
wide data (one row per unit) under a survey design (issue 17): the rows'
sampling weights unscaled (pseudo-likelihood), strata, PSUs (default: the
rows), FPC, subpopulations, and the linearised covariance H^-1 M H^-1
(mlsem.inference.design).  The rows are the top-level units, so the design
takes one weight, ``weights={"obs": column}`` (or ``{"row": column}``)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl

from ..data.prepare import scan
from ..data.weights import subpop_rows, top_design
from ..errors import MlsemError
from ..estimate.optimize import information
from ..inference.design import design_info, linearized, meat, psu_totals
from ..model.semscores import sem_row_scores
from ..spec.survey import SurveyDesign

ROW = "__mlsem_unit"


def check_sem_survey(survey, vce, method, weights):
    if not isinstance(survey, SurveyDesign):
        raise MlsemError(f"survey={survey!r} must be an mlsem.SurveyDesign")
    if weights is not None:
        raise MlsemError("weights= and survey= together: give the rows' weights in the design, "
                         "SurveyDesign(weights={'obs': column})")
    if vce is not None:
        raise MlsemError(f"vce={vce!r} with survey=: the standard errors of a survey design are the "
                         "linearised (design-based) ones")
    if not isinstance(method, str) or method.lower() != "ml":
        raise MlsemError(f"method={method!r} with survey=: SEM fits under a survey design are "
                         "pseudo-maximum likelihood (method='ml') only")
    keys = list(survey.weights)
    if len(keys) > 1 or (keys and keys[0] not in ("obs", "row")):
        raise MlsemError(f"SurveyDesign weights {survey.weights!r} with mlsem.sem: the rows of wide "
                         "data are the units, which take one weight: weights={'obs': column}")


def sem_survey(fit_sem, model, data, survey, **kw):
    """``fit_sem``: mlsem.sem itself (called on the subpopulation's rows with the
    weights normalised, which leaves the estimates unchanged); the weights,
    log-likelihood, information and covariance are then the design's (the
    caller refreshes the lavaan-style rows from the new covariance)."""
    lf = scan(data)
    wcol = next(iter(survey.weights.values()), None)
    df_all = lf.collect().with_row_index(ROW)
    tab = top_design(df_all, ROW, survey)
    dinfo = design_info(tab, ROW, survey)
    sub = subpop_rows(df_all, survey.subpop)
    if wcol is not None:
        if wcol not in sub.columns:
            raise MlsemError(f"data: column {wcol!r} (the design's weights) is not in the data")
        w_all = sub[wcol].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        for bad, what in ((np.isnan(w_all), "a missing"), (np.isinf(w_all), "an infinite"),
                          (w_all < 0, "a negative"), (w_all == 0, "a zero")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise MlsemError(f"SurveyDesign: weights column {wcol!r} has {what} value at data "
                                 f"row {int(sub[ROW][i]) + 1}; sampling weights must be positive and finite")
    else:
        w_all = np.ones(sub.height)
    res = fit_sem(model, sub.drop(ROW), vce="robust" if wcol else None, weights=wcol, **kw)
    m = res.model
    wd = m.prep
    w = w_all[wd.data_row]
    wd.wrow = np.ascontiguousarray(w)
    psi = res.estimate
    ll, _ = m.evaluate(psi, need_grad=False)
    info = information(m, psi)
    S = sem_row_scores(m, psi)
    ids = sub[ROW].to_numpy()[wd.data_row].tolist()
    Z = psu_totals(dinfo, ids, S * w[:, None])
    M = meat(dinfo, Z)
    n = len(res.names)
    cov = linearized(info, M) if info is not None and np.all(np.isfinite(info)) else np.full((n, n), np.nan)
    res.loglik = float(ll)
    res.info = info
    res.cov = cov
    res.vce = "linearized"
    res.notes = [x for x in res.notes if "sampling weights" not in x and "Huber-White" not in x]
    dfd = dinfo.df
    if dfd >= 1:        # t tests and intervals on the design df, as fit(survey=) does
        res.df = np.full(n, float(dfd))
        res.df_method = f"design (#PSU - #strata = {dfd})"
    res.survey = SimpleNamespace(
        design=survey, info=dinfo, weights=[w], scores=S, top_weights=w, psu_totals=Z, meat=M,
        top=ROW, level_cols=[], top_ids=ids, df=dfd, design_table=tab,
        weighted_counts=[float(w.sum())], pseudo=True)
    strata = f"{dinfo.nstrata} strata ({survey.strata})" if survey.strata else "1 stratum"
    psu = f"{dinfo.npsu} PSUs ({survey.psu})" if survey.psu else f"{dinfo.npsu} PSUs (the rows)"
    fpc = "no FPC" if survey.fpc is None else f"FPC {survey.fpc!r}"
    res.notes.append(f"survey design: {strata}, {psu}, design df = {dfd}, {fpc}, "
                     f"singleton={survey.singleton!r}; std. errors by linearisation, H^-1 M H^-1")
    res.notes.append(f"rows (unweighted / weighted): {wd.nrows:,} / {float(w.sum()):,.6g}"
                     + (f"; weights {wcol!r} not rescaled (pseudo-likelihood)" if wcol else ""))
    if survey.subpop is not None:
        res.notes.append(f"subpopulation {survey.subpop}: estimates on its rows, standard errors "
                         "from the whole design")
    res.notes.append("the log-likelihood is a pseudo-log-likelihood: LR tests, AIC, BIC and the "
                     "chi-square test of fit are not valid under the design and are refused")
    return res

