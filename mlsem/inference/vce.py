"""Inference after the fit: robust and cluster-robust covariance, sampling
weights, REML, Wald tests, score tests and the test against the saturated model.

Definitions (each checked against lavaan 0.6-14 / lme4 1.1-31 in
tests/inference/test_inference.py):

* ``vce="robust"``: lavaan's ``se = "robust.huber.white"`` with
  ``missing = "ml"``: A^-1 B A^-1, A the observed information (the Hessian
  of the log-likelihood), B = sum_r s_r s_r' over top-level units r (the rows
  of the wide form), no small-sample factor.
* ``vce=("cluster", c)``: the same with the scores summed within clusters of
  top-level units, times G / (G - 1) (G clusters), as lavaan's ``cluster =``.
* ``weights="w"``: pseudo-ML with unit weights rescaled to sum to the number
  of top-level units (lavaan's ``sampling.weights.normalization = "total"``):
  l = sum_r w_r l_r, A its Hessian, B = sum_r w_r^2 s_r s_r' (or per cluster).
* ``method="reml"``: mlsem.estimate.reml.
* score tests and modification indices: mlsem.inference.scoretests; the test
  against the saturated model: mlsem.inference.fittest.

This module sits beside ``results``: FitResult's test methods call it on the
model the result holds (it evaluates the model again; nothing here is in the
optimiser's loop).
"""
from __future__ import annotations

import re

import numpy as np
import polars as pl
from scipy import stats

from ..errors import MlsemError
from ..model.scores import row_scores

_VCE_NAMES = ("mixed", "oim", "robust")


# ---- options ------------------------------------------------------------------
def check_inference_options(vce, weights, method):
    """(vce, cluster column, weights column, method), or MlsemError."""
    cluster = None
    if isinstance(vce, (tuple, list)):
        if len(vce) != 2 or vce[0] != "cluster" or not isinstance(vce[1], str):
            raise MlsemError(f"vce={vce!r}: a cluster-robust request is ('cluster', column)")
        cluster = vce[1]
        vce = "cluster"
    elif vce not in _VCE_NAMES:
        raise MlsemError(f"vce={vce!r} is not one of 'mixed', 'oim', 'robust', ('cluster', column)")
    if weights is not None and not isinstance(weights, str):
        raise MlsemError(f"weights={weights!r} must be a column name")
    if not isinstance(method, str) or method.lower() not in ("ml", "reml", "adf", "gmm"):
        raise MlsemError(f"method={method!r} is not one of 'ml', 'reml', 'adf' (or 'gmm')")
    method = method.lower()
    if method in ("adf", "gmm"):
        if vce not in ("mixed", "oim") or weights is not None:
            raise MlsemError(f"method='adf' has its own distribution-free standard errors "
                             f"((Delta' W Delta)^-1 / (N - 1)): vce={vce!r}"
                             f"{' and weights=' if weights is not None else ''} cannot be combined with it")
        return "adf", None, None, "adf"
    if weights is not None:
        if vce == "mixed":
            vce = "robust"          # pseudo-ML: only the sandwich is valid
        elif vce == "oim":
            raise MlsemError("vce='oim' with weights: model-based standard errors are not valid "
                             "under sampling weights; use vce='robust' or ('cluster', column)")
    if method == "reml":
        if vce != "mixed":
            raise MlsemError(f"method='reml' gives lme4's standard errors only; vce={vce!r} "
                             "is available with method='ml'")
        if weights is not None:
            raise MlsemError("method='reml' cannot be combined with weights")
    return vce, cluster, weights, method


def _per_unit(df, top, col, prep, what):
    """Values of ``col`` per top-level unit, in the order of the model's rows;
    error if a unit has more than one value or a null."""
    nnull = df[col].null_count()
    if nnull:
        raise MlsemError(f"{what} column {col!r} has {nnull} missing value(s)")
    agg = df.group_by(top).agg(pl.col(col).first().alias("__v"),
                               pl.col(col).n_unique().alias("__n"))
    bad = agg.filter(pl.col("__n") > 1)
    if bad.height:
        ids = bad[top].sort().head(5).to_list()
        raise MlsemError(f"{what} column {col!r} varies within top-level unit(s) {top} = "
                         f"{', '.join(map(str, ids))}: it must be constant within each {top}")
    order = pl.DataFrame({top: prep.top_ids}).join(agg, on=top, how="left")
    return order["__v"]


def check_weight_dtype(df, col):
    if not df.schema[col].is_numeric():
        raise MlsemError(f"weights column {col!r} must be numeric, but it is {df.schema[col]}")


def check_weights(w, col, where):
    """Sampling weights: finite, not negative, positive sum, or a clear error;
    ``where(mask)`` names the offending units (rows or top-level ids)."""
    if np.isnan(w).any():
        raise MlsemError(f"weights column {col!r} has missing values")
    if not np.all(np.isfinite(w)):
        raise MlsemError(f"weights column {col!r} has non-finite values")
    if np.any(w < 0):
        raise MlsemError(f"weights column {col!r} has negative values ({where(w < 0)})")
    if w.sum() <= 0:
        raise MlsemError(f"weights column {col!r} sums to 0")


def unit_columns(df, top, prep, opts) -> dict:
    """Weights and cluster ids per top-level unit (CSR row order).  Sets the
    model's row weights to the sampling weights rescaled to sum to the number
    of units (lavaan's normalisation)."""
    out = {}
    if opts.weights is not None:
        col = opts.weights
        check_weight_dtype(df, col)
        w = _per_unit(df, top, col, prep, "weights").cast(pl.Float64).to_numpy()
        check_weights(w, col, lambda bad: f"{top} = " + ", ".join(
            map(str, prep.top_ids.filter(pl.Series(bad)).head(5).to_list())))
        w = w * (len(w) / w.sum())
        prep.wrow = np.ascontiguousarray(w)
        out["weights"] = w
    if opts.cluster is not None:
        cl = _per_unit(df, top, opts.cluster, prep, "cluster")
        codes = cl.rank("dense").cast(pl.Int64).to_numpy() - 1
        out["cluster"] = codes
    return out


# ---- covariance -------------------------------------------------------------
def sandwich(model, psi, info, weights=None, cluster=None, scores=None):
    """A^-1 B A^-1 (see the module docstring).  Returns (vcov, meat).
    ``scores``: per-unit scores when the model is not a multilevel Model
    (mlsem.model.semscores for SEM fits)."""
    S = row_scores(model, psi) if scores is None else scores
    if weights is not None:
        S = S * weights[:, None]
    adj = 1.0
    if cluster is not None:
        G = int(cluster.max()) + 1
        Sg = np.zeros((G, S.shape[1]))
        np.add.at(Sg, cluster, S)
        S = Sg
        if G < 2:
            raise MlsemError("vce=('cluster', ...): at least 2 clusters are needed")
        adj = G / (G - 1.0)
    B = adj * (S.T @ S)
    try:
        Ai = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        Ai = np.linalg.pinv(info)
    V = Ai @ B @ Ai
    return 0.5 * (V + V.T), B


def apply_vce(res, opts, unit):
    if opts.vce not in ("robust", "cluster"):
        return res
    if res.info is None or not np.all(np.isfinite(res.info)):
        res.notes.append("robust standard errors not computed: no information matrix")
        return res
    cl = unit.get("cluster")
    res.cov, _ = sandwich(res.model, res.estimate, res.info, unit.get("weights"), cl)
    if opts.vce == "cluster":
        G = int(cl.max()) + 1
        res.vce = f"cluster({opts.cluster})"
        res.notes.append(f"Std. errors adjusted for {G} clusters in {opts.cluster} "
                         "(sandwich, observed-information bread, G/(G-1))")
    else:
        res.vce = "robust"
        res.notes.append("Std. errors: Huber-White sandwich, scores per top-level unit, "
                         "observed-information bread")
    if opts.weights is not None:
        res.notes.append(f"sampling weights {opts.weights!r} of the top-level units, rescaled "
                         "to sum to the number of units (pseudo-likelihood)")
    return res


# ---- Wald tests ---------------------------------------------------------------
_NUM = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*")


def _parse_side(text, names, full):
    """A linear expression in parameter names -> (coefficient vector, constant)."""
    coef = np.zeros(len(names))
    const = 0.0
    s = text.strip()
    order = sorted(range(len(names)), key=lambda i: -len(names[i]))
    pos, sign, expect_term = 0, 1.0, True
    if not s:
        raise MlsemError(f"wald: empty side in {full!r}")
    while pos < len(s):
        if s[pos].isspace():
            pos += 1
            continue
        if s[pos] in "+-":
            sign = sign * (-1.0 if s[pos] == "-" else 1.0)
            pos += 1
            expect_term = True
            continue
        if not expect_term:
            raise MlsemError(f"wald: expected '+' or '-' at {s[pos:]!r} in {full!r}")
        mult = 1.0
        m = _NUM.match(s, pos)
        name_here = next((i for i in order if s.startswith(names[i], pos)), None)
        if m and name_here is None:
            mult = float(m.group(1))
            pos = m.end()
            if pos < len(s) and s[pos] == "*":
                pos += 1
                while pos < len(s) and s[pos].isspace():
                    pos += 1
            else:
                const += sign * mult
                sign, expect_term = 1.0, False
                continue
        i = next((i for i in order if s.startswith(names[i], pos)), None)
        if i is None:
            tok = re.match(r"[^\s+\-=*]+(\([^)]*\))?", s[pos:])
            tok = tok.group(0) if tok else s[pos:]
            raise MlsemError(f"wald: unknown parameter {tok!r} in {full!r} "
                             f"(parameters: {', '.join(names)})")
        coef[i] += sign * mult
        pos += len(names[i])
        sign, expect_term = 1.0, False
    if expect_term:
        raise MlsemError(f"wald: {full!r} ends with an operator")
    return coef, const


def parse_restriction(text, names):
    """'a = b', 'a - 2*b = 1', 'x = 0' -> (row of R, r) with R psi = r."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise MlsemError(f"wald: {text!r} is not a restriction 'lhs = rhs'")
    lhs, rhs = text.split("=")
    a, ca = _parse_side(lhs, names, text)
    b, cb = _parse_side(rhs, names, text)
    row = a - b
    if not np.any(row):
        raise MlsemError(f"wald: {text!r} involves no parameter")
    return row, cb - ca


def wald(res, restrictions):
    """Wald test of the linear restrictions R psi = r (a string or a list).
    chi2 = (R psi - r)' (R V R')^-1 (R psi - r) with V = res.vcov (the fit's vce)."""
    if isinstance(restrictions, str):
        restrictions = [restrictions]
    if not restrictions:
        raise MlsemError("wald: no restriction given")
    rows, rhs = zip(*(parse_restriction(t, res.names) for t in restrictions))
    R = np.vstack(rows)
    r = np.asarray(rhs)
    if np.linalg.matrix_rank(R) < R.shape[0]:
        raise MlsemError(f"wald: the restrictions {list(restrictions)!r} are linearly dependent")
    d = R @ res.estimate - r
    used = np.flatnonzero(np.any(R != 0, axis=0))     # REML: no cross-block covariances
    RVR = R[:, used] @ res.cov[np.ix_(used, used)] @ R[:, used].T
    if not np.all(np.isfinite(RVR)):
        raise MlsemError("wald: the covariance of the estimates is not available")
    chi2 = float(d @ np.linalg.solve(RVR, d))
    df = R.shape[0]
    out = {"restrictions": list(restrictions), "chi2": chi2, "df": df,
           "p_value": float(stats.chi2.sf(chi2, df)), "vce": res.vce}
    small = getattr(res, "small", None)
    if small is not None:
        # small-sample df (mlsem.inference.smallsample): the F test with its denominator df
        other = np.ones(R.shape[1], dtype=bool)
        other[small.fixed] = False
        if np.any(R[:, other]):
            raise MlsemError(f"wald: {res.df_method} F tests restrict fixed effects only; "
                             f"{list(restrictions)!r} involves a variance parameter")
        out = {"restrictions": list(restrictions), **small.ftest(R[:, small.fixed], r),
               "vce": res.vce}
    sv = getattr(res, "survey", None)
    if sv is not None:
        # the design-based adjusted Wald F (Stata's svy test), the p-value reported;
        # the chi2 and its p-value kept as p_value_chi2
        from .design import design_f
        f = design_f(chi2, df, sv.df)
        if f is not None:
            out["p_value_chi2"] = out["p_value"]
            out.update(f)
            out["p_value_F"] = f["p_value"]
    return out
