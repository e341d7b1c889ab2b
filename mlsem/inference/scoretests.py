"""Score (Lagrange multiplier) tests of a fitted multilevel model: every
equality constraint the mixed model imposes on its wide SEM form, their joint
test, and every fixed entry (modification indices) -- lavaan's
``lavTestScore`` and ``modindices``, Stata's ``estat scoretests``, with
lavaan's default expected information (see mlsem.inference.scorespace.ScoreSpace).

Like mlsem.inference.vce, this sits beside ``results`` and evaluates the fitted
model's matrices again; nothing here is in the optimiser's loop.
"""
from __future__ import annotations

import warnings

import numpy as np
import polars as pl
from scipy import stats

from ..errors import MlsemError
from ..estimate.optimize import param_scale
from .scorespace import ScoreSpace


def _score_stat(g, I, K):
    """Score statistic and one-step change for the directions K (columns)."""
    gk = K.T @ g
    A = K.T @ I @ K
    try:
        d = np.linalg.solve(A, gk)
    except np.linalg.LinAlgError:
        d = np.linalg.pinv(A) @ gk
    return float(gk @ d), d


def score_tests(res, information="expected", fixed=True):
    """Score (Lagrange multiplier) tests at the fitted estimates.

    One row per equality constraint (the entries of the wide form that the
    parameter table ties, first entry against each other, as lavaan's
    ``lavTestScore``), the joint test of all equality constraints, and (with
    ``fixed=True``) one row per fixed entry (lavaan's ``modindices``: the
    modification index and expected parameter change).  ``information``:
    "expected" (lavaan's default for both) or "observed"."""
    if information not in ("expected", "observed"):
        raise MlsemError(f"score_tests: information={information!r} is not 'expected' or 'observed'")
    if res.method != "ML":
        raise MlsemError("score_tests: available for ML fits (method='ml')")
    # the observed information is a finite difference of the gradient, which
    # the linear parametrisation of the space supports for every coordinate
    # except the outcome-on-outcome regressions
    sp = ScoreSpace(res, extras=fixed, yy=(information == "expected"))
    for note in sp.notes:
        warnings.warn(f"score_tests: {note}", stacklevel=3)
    rho = sp.rho0
    g, I = sp.gradient_information(rho, information)
    if information == "observed":
        I = sp.information_observed(rho)
    K = sp.K
    # parameters at a bound (variance 0) are held fixed
    # (relative to each parameter's unit: a variance of 1e-10 in an outcome of small
    # units is not at its bound)
    unit = param_scale(res.model)
    at_bound = np.array([np.isfinite(p.lower) and v - p.lower <= 1e-7 * max(u, abs(v))
                         for p, v, u in zip(res.model.table.params, res.estimate, unit)])
    Kf = K[:, ~at_bound]
    free = np.flatnonzero(~at_bound)
    IK = I @ Kf
    A0 = Kf.T @ IK
    g0 = Kf.T @ g

    def release(i):
        """Score statistic and one-step change when coordinate i gets its own
        parameter: directions [Kf - e_i k', e_i], k = Kf[i] (0 for a fixed entry)."""
        k = Kf[i]
        a, c = IK[i], I[i, i]
        A = np.empty((len(free) + 1, len(free) + 1))
        A[:-1, :-1] = A0 - np.outer(a, k) - np.outer(k, a) + c * np.outer(k, k)
        A[:-1, -1] = A[-1, :-1] = a - c * k
        A[-1, -1] = c
        gk = np.append(g0 - k * g[i], g[i])
        try:
            d = np.linalg.solve(A, gk)
        except np.linalg.LinAlgError:
            d = np.linalg.pinv(A) @ gk
        return float(gk @ d), d

    rows = []
    cons = []
    groups = {}
    for i, e in enumerate(sp.ents):
        if e.group >= 0:
            groups.setdefault(e.group, []).append(i)
    for p, members in groups.items():
        for i in members[1:]:
            cons.append((p, members[0], i))
    for p, i0, i in cons:
        stat, d = release(i)
        # epc: the released entry's change relative to the entries it was tied to
        epc = d[-1] - (d[int(np.searchsorted(free, p))] if not at_bound[p] else 0.0)
        rows.append(("equality", sp.ents[i0].text, "==", sp.ents[i].text, res.names[p], stat, 1,
                     float(stats.chi2.sf(stat, 1)), float(epc)))
    if cons:
        E = np.zeros((len(rho), len(cons)))
        E[[i for _, _, i in cons], np.arange(len(cons))] = 1.0
        Kall = np.column_stack([Kf, E])
        stat, _ = _score_stat(g, I, Kall)
        df = len(cons)
        rows.append(("joint", "all equality constraints", "", "", "", stat, df,
                     float(stats.chi2.sf(stat, df)), float("nan")))
    if fixed:
        for i, e in enumerate(sp.ents):
            if e.group >= 0:
                continue
            stat, d = release(i)
            rows.append(("fixed", e.lhs, e.op, e.rhs, "", stat, 1,
                         float(stats.chi2.sf(stat, 1)), float(d[-1])))
    out = pl.DataFrame(rows, schema={"type": pl.String, "lhs": pl.String, "op": pl.String,
                                     "rhs": pl.String, "param": pl.String, "chi2": pl.Float64,
                                     "df": pl.Int64, "p_value": pl.Float64, "epc": pl.Float64},
                       orient="row")
    return out
