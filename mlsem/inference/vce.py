"""Inference after the fit: robust and cluster-robust covariance, sampling
weights, REML, Wald tests, score tests and the test against the saturated model.

Definitions (each checked against lavaan 0.6-14 / lme4 1.1-31 in
tests/test_inference.py):

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
* score tests and modification indices: mlsem.inference.scoretests.

This module sits beside ``results``: FitResult's test methods call it on the
model the result holds (it evaluates the model again; nothing here is in the
optimiser's loop).
"""
from __future__ import annotations

import math
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
    return out


# ---- test against the saturated model -------------------------------------------
def _wide(prep):
    """Wide outcome (NaN = missing cell) and covariates (0 where the cell is
    missing, lavaan's fill) of the top-level units."""
    n, P = prep.nrows, prep.nslots
    rowid = np.repeat(np.arange(n), np.diff(prep.row_ptr))
    Y = np.full((n, P), np.nan)
    Y[rowid, prep.slot] = prep.y
    cols = []
    for c, xn in enumerate(prep.xnames):
        if xn == "Intercept" or np.all(prep.X[:, c] == prep.X[0, c]):
            continue
        Xc = np.zeros((n, P))
        Xc[rowid, prep.slot] = prep.X[:, c]
        cols.append(Xc)
    Z = np.hstack([np.ones((n, 1))] + cols)
    if Z.shape[1] >= n:
        raise MlsemError(
            f"fit_test: the saturated model regresses every slot on every slot's covariates: "
            f"{Z.shape[1]} regressors (an intercept and {Z.shape[1] - 1} slot covariates) for "
            f"{n} top-level units, more parameters than the units can estimate, so there is no "
            "saturated model to test against (compare nested models with mlsem.lrtest instead)")
    # drop covariate columns that are linear combinations of others (a
    # top-level covariate repeated in every slot)
    if Z.shape[1] > 1:
        Q, R, piv = _qr_pivot(Z)
        d = np.abs(np.diag(R))
        keep = np.sort(piv[d > 1e-10 * d.max()])
        if 0 not in keep:
            keep = np.concatenate([[0], keep])
        Z = Z[:, keep]
    return Y, Z


def _qr_pivot(A):
    from scipy.linalg import qr
    return qr(A, mode="economic", pivoting=True)


def saturated_em(Y, Z, tol=1e-10, maxiter=20000):
    """ML of the multivariate regression Y = Z B + E, E ~ N(0, Sigma)
    unrestricted, with missing outcomes (EM).  Returns (loglik, B, Sigma, iterations)."""
    n, P = Y.shape
    obs = ~np.isnan(Y)
    keys, inv = np.unique(obs, axis=0, return_inverse=True)
    inv = np.asarray(inv).ravel()
    groups = [(keys[g], np.flatnonzero(inv == g)) for g in range(len(keys))]
    ZtZ = Z.T @ Z
    Yf = np.where(obs, Y, np.nanmean(Y, axis=0))
    B = np.linalg.solve(ZtZ, Z.T @ Yf)
    E = Yf - Z @ B
    Sigma = E.T @ E / n
    ll_old = -np.inf
    it = 0
    for it in range(1, maxiter + 1):
        Yh = Yf.copy()
        Csum = np.zeros((P, P))
        ll = 0.0
        mu = Z @ B
        for o, rows in groups:
            m = ~o
            So = Sigma[np.ix_(o, o)]
            C = np.linalg.cholesky(So)
            Ro = Y[np.ix_(rows, np.flatnonzero(o))] - mu[np.ix_(rows, np.flatnonzero(o))]
            V = np.linalg.solve(C, Ro.T)
            no = int(o.sum())
            ll += -0.5 * (len(rows) * (no * math.log(2 * math.pi) + 2 * np.log(np.diag(C)).sum())
                          + float((V * V).sum()))
            if m.any():
                A = np.linalg.solve(So, Sigma[np.ix_(o, m)]).T       # Sigma_mo Sigma_oo^-1
                Yh[np.ix_(rows, np.flatnonzero(m))] = mu[np.ix_(rows, np.flatnonzero(m))] + Ro @ A.T
                Csum[np.ix_(m, m)] += len(rows) * (Sigma[np.ix_(m, m)] - A @ Sigma[np.ix_(o, m)])
        B = np.linalg.solve(ZtZ, Z.T @ Yh)
        E = Yh - Z @ B
        Sigma = (E.T @ E + Csum) / n
        Yf = Yh
        if abs(ll - ll_old) < tol * max(1.0, abs(ll)):
            break
        ll_old = ll
    else:
        raise MlsemError(f"fit_test: the EM for the saturated model did not converge in {maxiter} iterations")
    return ll, B, Sigma, it


def fit_test(res, max_slots=200):
    """LR test of the model against the saturated model of its wide form: every
    slot's mean an unrestricted regression on all slots' covariates (the
    exogenous x of lavaan/Stata's sem with fixed.x) and an unrestricted
    residual covariance; fitted by EM where cells are missing.  As lavaan's
    ``chisq`` and Stata's ``LR test of model vs. saturated``."""
    if res.method == "ADF":
        return _adf_fit_test(res)
    if res.method == "SEM":
        return _sem_fit_test(res)
    m = res.model
    prep = m.prep
    if res.method != "ML":
        raise MlsemError("fit_test: the saturated-model test needs an ML fit (method='ml')")
    if np.any(prep.wrow != 1.0):
        raise MlsemError("fit_test: not available with sampling weights (the pseudo-likelihood "
                         "ratio is not chi-squared)")
    if np.any(prep.load != 1.0):
        raise MlsemError("fit_test: the model has random slopes, so its covariance depends on "
                         "the covariates: no saturated model of the wide form nests it")
    P = prep.nslots
    if P > max_slots:
        raise MlsemError(f"fit_test: the wide form has {P} slots: the saturated model "
                         f"(P(P+1)/2 = {P * (P + 1) // 2} covariances) is too large to fit "
                         f"(limit {max_slots} slots)")
    Y, Z = _wide(prep)
    obs = ~np.isnan(Y)
    kz = Z.shape[1]
    nsat = P * kz + P * (P + 1) // 2
    out = _saturated_lr(res, Y, Z, nsat, lambda s: f"slot {s}", "top-level units")
    if res.vce == "robust":
        def moments():
            from ..estimate.adf import MultilevelMoments
            mm = MultilevelMoments(prep, m.table, unbiased=False, what="the scaled test", check=False)
            return mm(res.estimate)[1:], mm.mom
        _add_scaled(out, obs.all(), moments)
    elif res.vce.startswith("cluster"):
        out["scaled_note"] = _CLUSTER_NOTE
    return out


def saturated_weighted(Y, Z, w):
    """The saturated multivariate regression of complete Y on Z with sampling
    weights w (summing to the number of rows): weighted least squares and the
    weighted residual covariance, the maximiser of the weighted
    pseudo-log-likelihood sum_i w_i log N(y_i; B'z_i, Sigma).  Returns it."""
    n, P = Y.shape
    Zw = Z * w[:, None]
    B = np.linalg.solve(Z.T @ Zw, Zw.T @ Y)
    E = Y - Z @ B
    Sigma = (E * w[:, None]).T @ E / w.sum()
    sign, logdet = np.linalg.slogdet(Sigma)
    if sign <= 0:
        raise MlsemError("fit_test: the saturated model's weighted residual covariance is singular")
    return -0.5 * float(w.sum()) * (P * math.log(2 * math.pi) + logdet + P)


def _saturated_lr(res, Y, Z, nsat, name, units, weights=None):
    """LR test of a fit against the saturated regression of the wide outcomes Y
    (NaN = missing) on Z: by EM over the missing cells, or in closed form with
    sampling weights (complete data only).  ``name(s)`` names outcome s in
    messages, ``units`` the rows of Y."""
    obs = ~np.isnan(Y)
    kz = Z.shape[1]
    if nsat >= obs.sum():
        raise MlsemError(f"fit_test: the saturated model has {nsat} parameters for {int(obs.sum())} "
                         "observed outcomes: too large to fit")
    per = obs.sum(axis=0)
    if per.min() <= kz:
        s = int(np.argmin(per))
        raise MlsemError(f"fit_test: {name(s)} is observed in {int(per[s])} {units}, not more than "
                         f"its {kz} regression coefficients: the saturated model is not identified")
    together = obs.T.astype(float) @ obs.astype(float)
    if together.min() < 1:
        s, u = np.unravel_index(int(np.argmin(together)), together.shape)
        raise MlsemError(f"fit_test: {name(s)} and {name(u)} are never observed together (in the same "
                         f"one of the {units}): their covariance in the saturated model is not identified")
    if weights is not None:
        if not obs.all():
            raise MlsemError("fit_test: with sampling weights the saturated model is fitted in closed "
                             f"form, which needs complete data, but {int((~obs).sum())} value(s) are "
                             "missing (a weighted EM is not implemented); the test is not available")
        ll_sat, iters = saturated_weighted(Y, Z, weights), 0
    else:
        ll_sat, _, _, iters = saturated_em(Y, Z)
    df = nsat - res.nparams
    chi2 = max(0.0, 2.0 * (ll_sat - res.loglik))
    out = {"test": "LR test of model vs. saturated", "chi2": float(chi2), "df": int(df),
           "p_value": float(stats.chi2.sf(chi2, df)) if df > 0 else float("nan"),
           "loglik": float(res.loglik), "loglik_saturated": float(ll_sat), "npar": res.nparams,
           "npar_saturated": nsat, "em_iterations": iters}
    if weights is not None:
        out["test"] = ("LR test of model vs. saturated, sampling weights (pseudo-likelihood ratio, "
                       "as lavaan's chisq with sampling.weights)")
    return out


# ---- scaled test (Satorra-Bentler), ADF and SEM tests (mlsem.estimate.adf) ------------------
_CLUSTER_NOTE = ("no scaled test statistic for a cluster-robust fit: the Satorra-Bentler statistic "
                 "(lavaan's MLM) treats the rows as independent; fit with vce='robust' for it")


def _add_scaled(out, complete, moments):
    """chi2_scaled and scaling_factor (lavaan's MLM) on complete data; on data with
    missing cells say that none is available (lavaan's MLR, the Yuan-Bentler
    statistic, is not implemented)."""
    from ..estimate.adf import satorra_bentler
    if not complete:
        out["chi2_scaled"] = out["scaling_factor"] = out["p_value_scaled"] = float("nan")
        out["scaled_note"] = ("no scaled test statistic: the data have missing cells, where the "
                              "Satorra-Bentler statistic does not apply and the Yuan-Bentler "
                              "statistic (lavaan's MLR) is not implemented")
        return
    try:
        (D, C), mom = moments()
    except MlsemError as exc:
        out["chi2_scaled"] = out["scaling_factor"] = out["p_value_scaled"] = float("nan")
        out["scaled_note"] = f"no scaled test statistic: {exc}"
        return
    if mom.nmom - out["npar"] != out["df"]:  # pragma: no cover - the two counts agree by construction
        raise MlsemError("fit_test: internal error: moment count differs from the saturated model's")
    chi2s, c = satorra_bentler(C, D, mom, out["chi2"], out["df"])
    out["chi2_scaled"] = float(chi2s)
    out["scaling_factor"] = float(c)
    out["p_value_scaled"] = float(stats.chi2.sf(chi2s, out["df"])) if out["df"] > 0 else float("nan")
    out["scaled_test"] = ("Satorra-Bentler (lavaan's MLM: expected information, ADF Gamma with "
                          "fixed covariates); the standard errors of this fit are Huber-White "
                          "(vce='robust'), not MLM's robust.sem")


def _adf_fit_test(res):
    a = res.adf
    return {"test": "ADF (GMM) test of model vs. saturated: (N - 1) F_min", "chi2": a["chi2"],
            "df": a["df"], "p_value": a["p_value"], "fmin": a["fmin"], "npar": res.nparams,
            "nmoments": a["nmom"], "nobs": res.nobs}


def _sem_fit_test(res):
    """lavaan's chisq of an SEM fit by ML (FIML): against the saturated model (every
    observed variable's mean an unrestricted regression on the fixed covariates,
    unrestricted residual covariance), by EM where cells are missing."""
    m = res.model
    wd = m.prep
    t = m.table
    if res.nparams and not res.converged:
        raise MlsemError("fit_test: the fit did not converge")
    P, q = t.P, t.q
    if P > 200:
        raise MlsemError(f"fit_test: {P} observed variables: the saturated model is too large to fit "
                         "(limit 200)")
    Y = np.full((wd.nrows, P), np.nan)
    Y[wd.obs_row, wd.slot] = wd.y
    if q and wd.dropped_cells:
        raise MlsemError("fit_test: values were dropped because a covariate is missing: the saturated "
                         "model of lavaan's fixed.x needs complete covariates")
    Z = np.hstack([np.ones((wd.nrows, 1)), wd.X])
    obs = ~np.isnan(Y)
    nsat = P * (1 + q) + P * (P + 1) // 2
    weighted = bool(np.any(wd.wrow != 1.0))
    out = _saturated_lr(res, Y, Z, nsat, lambda s: t.observed[s], "rows",
                        weights=wd.wrow if weighted else None)
    if weighted:
        out["scaled_note"] = ("no scaled test statistic for a weighted fit: lavaan's MLR statistic "
                              "(Yuan-Bentler) is not implemented")
        return out
    if res.vce == "robust":
        def moments():
            from ..estimate.adf import Moments, sigma_and_jacobian
            mom = Moments(Y, wd.X, t.observed + t.covariates, unbiased=False, check=False,
                          what="the scaled test")
            _, D, C = sigma_and_jacobian(m, res.estimate, mom)
            return (D, C), mom
        _add_scaled(out, bool(obs.all()), moments)
    elif res.vce.startswith("cluster"):
        out["scaled_note"] = _CLUSTER_NOTE
    return out
