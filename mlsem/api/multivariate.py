"""api layer, several outcomes (issue 15): ``mlsem.fit(data, [formula, formula, ...])``.

One formula per outcome, the same nested grouping in each; FIML over the (unit,
outcome) cells with Theta block-diagonal per unit (mlsem.model.multivariate).  What
the multivariate fit does not support yet is refused here with a message, never
ignored.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..data.multivariate import load_multi, prepare_multi
from ..errors import MlsemError
from ..estimate.mnewton import optimize_multi
from ..inference.vce import apply_vce, unit_columns
from ..model.multivariate import MultiModel
from ..spec.multivariate import check_structures, multivariate_table, parse_formulas


def _refuse(what: str):
    raise MlsemError(f"several outcomes: {what} is not supported with a list of formulas yet; "
                     "fit one outcome at a time for it")


def fit_multi(data, formulas, *, outcomes=None, index=None, opts=None, df=None, effects=None,
              residuals=None, coefficients=None, client=None, npartitions=None, progress=None,
              finish=None):
    """The multivariate fit (called by mlsem.fit when ``formula`` is a list; ``finish``:
    mlsem.api.fitting's result builder, passed in so that this module does not import it)."""
    if opts.backend == "dask" or client is not None or npartitions is not None:
        _refuse("backend='dask'")
    if opts.method != "ml":
        _refuse(f"method={opts.method!r} (several outcomes are fitted by ML)")
    if opts.vce not in ("mixed", "oim", "robust", "cluster"):
        _refuse(f"vce={opts.vce!r}")
    if df is not None:
        _refuse(f"df={df!r}")
    for name, val in (("effects=", effects), ("residuals=", residuals),
                      ("coefficients=", coefficients)):
        if val:
            _refuse(name)
    t0 = time.perf_counter()
    Fs, levels = parse_formulas(formulas)
    structures = check_structures(outcomes, [lv[-1] for lv in levels])
    frame, encs = load_multi(data, Fs, levels, index=index,
                             extra=[c for c in (opts.cluster, opts.weights) if c])
    prep = prepare_multi(frame, Fs, encs, levels, index=index)
    # cluster ids and sampling weights per top-level unit (the weights also set the
    # kernel's row weights: a pseudo-likelihood fitted on the whole data, not grouped)
    unit = unit_columns(frame, levels[0][-1], prep, opts) if (opts.cluster or opts.weights) else {}
    t1 = time.perf_counter()
    if progress is not None and hasattr(progress, "prepared"):
        progress.prepared(prep)
    outs = [F.outcome for F in Fs]
    table = multivariate_table(prep, outs, structures)
    if prep.nobs <= table.nparams:
        raise MlsemError(f"data: {prep.nobs} observed cells for {table.nparams} parameters: "
                         "too few to estimate the model")
    model = MultiModel(prep, table, backend=opts.backend, nthreads=opts.nthreads)
    opt = optimize_multi(model, progress=progress)
    t2 = time.perf_counter()
    res = finish(model, opt, opts, _Outcomes(outs), prep,
                  {"prepare": t1 - t0, "optimize": t2 - t1}, t2)
    res = apply_vce(res, opts, unit)
    if getattr(opt, "path", None) == "full" and getattr(opt, "grouped_reason", None):
        res.notes.append(f"optimised on the whole data, not on the grouped data "
                         f"({opt.grouped_reason}): slower on large data")
    res.encoding = encs
    for o, e in zip(outs, encs):
        note = e.dropped_note()
        if note:
            res.notes.append(f"{o}: {note}")
    res.outcome = ", ".join(outs)
    # (no LR test of pseudo-likelihoods under sampling weights, as for one outcome)
    res.lr_ols = _lr_separate(model, opt, table) if opts.weights is None else {}
    res.notes.append(_counts_note(prep))
    cor = correlations(res)
    if cor:
        res.notes.append("correlations across outcomes: " + ", ".join(
            f"{n} = {v:.4f}" for n, v in cor.items()))
    return res


class _Outcomes:
    def __init__(self, outs):
        self.outcome = ", ".join(outs)


def _counts_note(prep) -> str:
    m = prep.meta
    miss = ", ".join(f"{o} {n:,}" for o, n in m["cells_missing"].items())
    s = f"several outcomes: {prep.nobs:,} observed cells of {m['units']:,} units; "
    if m["dropped_units"]:
        s += f"{m['dropped_units']:,} unit(s) with no usable outcome dropped; "
    return s + (f"{prep.missing_outcome:,} missing cell(s) among the kept ones (outcome or a "
                f"covariate of its formula missing): {miss}")


def _lr_separate(model, opt, table) -> dict:
    """LR test against the separate linear regressions of the outcomes."""
    kinds = [p.kind for p in table.params]
    nvc = sum(1 for k in kinds if k in ("var", "cov", "rcov"))
    if not nvc:
        return {}
    from scipy import stats
    ll0 = model.ols_loglik()
    chi2 = max(0.0, 2.0 * (opt.loglik - ll0))
    return {"chi2": chi2, "df": nvc, "p_value": float(stats.chi2.sf(chi2, nvc)),
            "loglik_linear_regression": ll0}


def correlations(res) -> dict:
    """{corr(a,b): estimate} of every cross-outcome covariance cov(a,b) of a fit."""
    est = dict(zip(res.names, res.estimate))
    out = {}
    for n, v in est.items():
        if n.startswith("cov(") and n.endswith(")"):
            a, b = n[4:-1].split(",")
            va, vb = est.get(f"var({a})"), est.get(f"var({b})")
            if va and vb and va > 0 and vb > 0:
                out[f"corr({a},{b})"] = v / math.sqrt(va * vb)
            else:
                out[f"corr({a},{b})"] = float("nan")
    return out


def covariance_matrix(res, level: str) -> np.ndarray:
    """The nout x nout covariance across outcomes at ``level`` (a grouping column or
    "Residual") of a several-outcome fit."""
    outs = res.model.table.outcomes
    est = dict(zip(res.names, res.estimate))
    S = np.zeros((len(outs), len(outs)))
    for i, a in enumerate(outs):
        for j, b in enumerate(outs):
            if i == j:
                S[i, i] = est[f"var({level}:{a})"]
            else:
                lo, hi = (a, b) if i < j else (b, a)
                S[i, j] = est.get(f"cov({level}:{lo},{level}:{hi})", 0.0)
    return S
