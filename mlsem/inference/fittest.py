"""The test against the saturated model (fit_test): the saturated model of the
wide data by EM (weighted when the fit is), the likelihood-ratio statistic, the
Satorra-Bentler scaled test under robust errors, and the ADF and general-SEM
tests (mlsem.estimate.adf). FitResult.fit_test calls it on the fitted model.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..errors import MlsemError


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
