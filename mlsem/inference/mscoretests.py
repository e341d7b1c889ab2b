"""Score (Lagrange multiplier) tests of a several-outcome fit: the covariances across
outcomes that ``outcomes={...: "independent"}`` fixed at 0.

At the restricted estimates (every omitted covariance 0), the unrestricted model's
gradient g (the kernel's analytic one) and observed information I (central differences
of g, steps relative to each parameter's unit) give for a set J of released
covariances the statistic g' K (K' I K)^-1 K' g, K the directions of the free
parameters and J (lavaan's ``lavTestScore`` / ``modindices`` with
``information="observed"``; Stata's ``estat scoretests``).  Rows: one per omitted
covariance (df 1, with its expected parameter change), one per level (its
covariances jointly) and, with more than one level restricted, all of them jointly.
The LR test of the same restriction is ``mlsem.lrtest`` of the two fits.
"""
from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from ..errors import MlsemError
from ..estimate.optimize import param_scale
from ..model.multivariate import MultiModel
from ..spec.multivariate import check_structures, multivariate_table
from .scoretests import _score_stat as _stat

_SCHEMA = {"type": pl.String, "lhs": pl.String, "op": pl.String, "rhs": pl.String,
           "param": pl.String, "chi2": pl.Float64, "df": pl.Int64, "p_value": pl.Float64,
           "epc": pl.Float64}


def _observed_information(model, psi):
    unit = param_scale(model)
    n = len(psi)
    H = np.zeros((n, n))
    for i in range(n):
        h = 1e-5 * max(abs(psi[i]), unit[i])
        p, q = psi.copy(), psi.copy()
        p[i] += h
        q[i] -= h
        gp, gq = model.evaluate(p)[1], model.evaluate(q)[1]
        if gp is None or gq is None:
            raise MlsemError("score_tests: the unrestricted model cannot be evaluated near the "
                             "restricted estimates")
        H[:, i] = (gp - gq) / (2 * h)
    return -0.5 * (H + H.T)


def multi_score_tests(res) -> pl.DataFrame:
    """Score tests of the cross-outcome covariances fixed at 0 (see the module)."""
    if res.method != "ML":
        raise MlsemError("score_tests: available for ML fits")
    if getattr(res, "survey", None) is not None or any("sampling weights" in n for n in res.notes):
        raise MlsemError("score_tests: the score tests use the model-based information, not "
                         "valid for a weighted pseudo-likelihood; use res.wald(...)")
    model = res.model
    t = model.table
    prep = model.prep
    outs = list(t.outcomes)
    levels = [lv.name for lv in prep.levels] if hasattr(prep, "levels") else []
    full_t = multivariate_table(prep, outs, check_structures(None, levels))
    have = {n: i for i, n in enumerate(res.names)}
    names = [p.name for p in full_t.params]
    released = [i for i, n in enumerate(names) if n not in have]
    if not released:
        return pl.DataFrame([], schema=_SCHEMA, orient="row")
    full = MultiModel(prep, full_t, backend=model.backend, nthreads=getattr(model, "nthreads", None))
    psi = np.zeros(len(names))
    est = np.asarray(res.estimate, dtype=float)
    for i, n in enumerate(names):
        if n in have:
            psi[i] = est[have[n]]
    ll, g = full.evaluate(psi)
    if g is None:
        raise MlsemError("score_tests: the unrestricted model cannot be evaluated at the "
                         "restricted estimates")
    I = _observed_information(full, psi)
    unit = param_scale(full)
    # free parameters at their bound (a variance of 0) are held there
    kept = [i for i in range(len(names)) if i not in released and not (
        np.isfinite(full_t.params[i].lower) and psi[i] - full_t.params[i].lower
        <= 1e-7 * max(unit[i], abs(psi[i])))]

    def directions(extra):
        K = np.zeros((len(names), len(kept) + len(extra)))
        K[kept, np.arange(len(kept))] = 1.0
        K[extra, len(kept) + np.arange(len(extra))] = 1.0
        return K

    rows = []
    for i in released:
        stat, d = _stat(g, I, directions([i]))
        a, b = names[i][4:-1].split(",")
        rows.append(("fixed", a, "~~", b, names[i], stat, 1, float(stats.chi2.sf(stat, 1)),
                     float(d[-1])))
    by_level = {}
    for i in released:
        by_level.setdefault(names[i][4:-1].split(":")[0], []).append(i)
    for lv, idx in by_level.items():
        if len(idx) > 1:
            stat, _ = _stat(g, I, directions(idx))
            rows.append(("joint", f"covariances across outcomes at {lv}", "", "", "", stat,
                         len(idx), float(stats.chi2.sf(stat, len(idx))), float("nan")))
    if len(by_level) > 1:
        stat, _ = _stat(g, I, directions(released))
        rows.append(("joint", "all covariances across outcomes", "", "", "", stat,
                     len(released), float(stats.chi2.sf(stat, len(released))), float("nan")))
    return pl.DataFrame(rows, schema=_SCHEMA, orient="row")
