"""Estimation by GMM / ADF (asymptotically distribution-free weighted least
squares, Browne 1984) and the Satorra-Bentler scaled test, for SEMs with
fixed exogenous covariates (lavaan's ``fixed.x = TRUE``).

Moments.  With y the P endogenous observed variables and x the q fixed
covariates, z = (y, x) (p = P + q).  The sample statistics are the means of
y and the elements of vech(S) (column-wise lower triangle of the joint
covariance S of z) that involve at least one y: the covariates' own moments
(their means, variances and covariances) are fixed at their sample values and
dropped, as lavaan drops their rows.  ADF uses the unbiased covariance
S = Z'Z / (N - 1) (centred), ML the biased one (divisor N).

Implied moments, with Lt = Lambda (I - B)^-1, Sigma = Lt Psi Lt' + Theta,
the total effect of x on y T = Gamma_y + Lt Gamma_eta and the intercepts
m0 = nu + Lt alpha (DESIGN.md section 4):

    mu_y = m0 + T xbar,  Cov(y) = Sigma + T Sxx T',  Cov(y, x) = T Sxx.

Gamma (N times the asymptotic covariance of the statistics): lavaan's
lav_samplestats_Gamma, fixed.x branch.  Per unit i, with yhat_i the fitted
values of the regression of each y on (1, x) and zhat_i = (yhat_i, x_i):

    d_i = (y_i - yhat_i,  vech(zc_i zc_i') - vech(zhatc_i zhatc_i'))

(c: centred at the sample mean), restricted to the kept rows, centred;
Gamma = sum_i d_i d_i' / N.

ADF: minimise F(theta) = (s - sigma(theta))' W (s - sigma(theta)),
W = Gamma^-1, gradient -2 Delta' W (s - sigma) with Delta = d sigma / d theta
(analytic, from the parameter table); vcov = (Delta' W Delta)^-1 / (N - 1);
test statistic (N - 1) F_min on (number of moments - number of parameters)
degrees of freedom (lavaan's estimator = "WLS").

Satorra-Bentler (lavaan's estimator = "MLM"): on an ML fit of complete data,
with A the expected normal-theory information of the saturated model at the
model-implied moments (kept rows) and Gamma as above with the biased
moments, U = A - A Delta (Delta' A Delta)^-1 Delta' A, the scaling factor is
c = tr(U Gamma) / df and the scaled statistic chi2 / c.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import MlsemError

ADF_NAMES = ("adf", "gmm")


def _vech_pairs(p):
    """Column-wise lower triangle (lavaan's vech order): (row, col) pairs."""
    a = [i for j in range(p) for i in range(j, p)]
    b = [j for j in range(p) for i in range(j, p)]
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def check_complete(Y, X, names, what="method='adf'"):
    """Complete data or a clear error (no silent listwise deletion)."""
    A = np.hstack([Y, X]) if X.size else Y
    miss = np.isnan(A)
    if miss.any():
        c = int(np.flatnonzero(miss.any(axis=0))[0])
        rows = np.flatnonzero(miss[:, c])
        show = ", ".join(str(int(r) + 1) for r in rows[:5])
        raise MlsemError(
            f"{what} needs complete data: column {names[c]!r} has {len(rows)} missing value(s) "
            f"(rows {show}{' ...' if len(rows) > 5 else ''}), and {int(miss.any(axis=1).sum())} "
            f"of {A.shape[0]} units have a missing cell (an unbalanced design leaves cells of the "
            "wide form empty). ADF's weight matrix needs every unit's fourth-order moments, so it "
            "does not delete units silently: use method='ml' (FIML over the missing patterns), or "
            "drop the incomplete units yourself")


class Moments:
    """The sample statistics of complete wide data (Y: n x P, X: n x q) and
    their ADF covariance Gamma (fixed.x)."""

    def __init__(self, Y, X, names, unbiased=True, check=True, what="method='adf'"):
        """``check``: refuse N <= number of moments (ADF inverts Gamma; the
        scaled test needs only Gamma itself: check=False).  ``what`` names the
        caller in the messages."""
        n, P = Y.shape
        q = X.shape[1]
        self.n, self.P, self.q = n, P, q
        self.names = list(names)
        Z = np.hstack([Y, X])
        p = P + q
        a, b = _vech_pairs(p)
        keep = (a < P) | (b < P)
        self.pa, self.pb = a[keep], b[keep]
        self.nmom = P + int(keep.sum())
        self.what = what
        if check and n <= self.nmom:
            raise MlsemError(
                f"{what} needs more units than moments: {n} unit(s) for {self.nmom} sample "
                f"moments ({P} means, {self.nmom - P} variances and covariances of the "
                f"{P} outcome(s) with each other and with the {q} covariate(s)); the ADF weight "
                "matrix (the inverse of the moments' fourth-order covariance Gamma) is singular "
                f"unless there are at least {self.nmom + 1} units. Use method='ml' (FIML)")
        const = [c for c in range(p) if np.ptp(Z[:, c]) == 0.0]
        if const:
            adf = what == "method='adf'"
            raise MlsemError(
                f"{what}: column {self.names[const[0]]!r} is constant, so "
                + ("the ADF weight matrix (the inverse of Gamma, the covariance of the sample "
                   "moments) is singular; drop it from the model or use method='ml'" if adf else
                   "its moments have no variance; drop it from the model"))
        mean = Z.mean(axis=0)
        Zc = Z - mean
        S = Zc.T @ Zc / (n - 1 if unbiased else n)
        self.mean, self.S = mean, S
        self.xbar = mean[P:]
        self.Sxx = S[P:, P:]
        self.s = np.concatenate([mean[:P], S[self.pa, self.pb]])
        # Gamma, lavaan's fixed.x branch (divisor n)
        Q = np.hstack([np.ones((n, 1)), X])
        coef, *_ = np.linalg.lstsq(Q, Y, rcond=None)
        Zh = Z.copy()
        Zh[:, :P] = Q @ coef
        Zhc = Zh - Zh.mean(axis=0)
        d = np.hstack([(Z - Zh)[:, :P], Zc[:, self.pa] * Zc[:, self.pb] - Zhc[:, self.pa] * Zhc[:, self.pb]])
        d -= d.mean(axis=0)
        self.Gamma = d.T @ d / n
        self._W = None

    @property
    def W(self):
        """Gamma^-1 (ADF's weight matrix), or a clear error if Gamma is singular.
        The test and the inverse use the correlation form D^-1/2 Gamma D^-1/2
        (D = diag(Gamma)), as lavaan does, so they do not depend on the units of
        the variables."""
        if self._W is None:
            G = self.Gamma
            dg = np.diag(G).copy()
            if np.any(dg <= 0.0) or not np.all(np.isfinite(dg)):
                r = int(np.flatnonzero(~(dg > 0.0))[0])
                raise MlsemError(
                    "method='adf': the covariance of the sample moments (Gamma) is singular: the "
                    f"moment {self.moment_names()[r]} does not vary across units, so the ADF weight "
                    "matrix does not exist. Use method='ml'")
            sd = np.sqrt(dg)
            Gs = G / np.outer(sd, sd)
            lam, V = np.linalg.eigh(Gs)
            if lam.min() <= 1e-12 * max(lam.max(), 1e-300):
                k = int(np.argmin(lam))
                v = np.abs(V[:, k])
                r = int(np.argmax(v))
                raise MlsemError(
                    "method='adf': the covariance of the sample moments (Gamma) is singular, so the "
                    f"ADF weight matrix does not exist (smallest eigenvalue of its correlation form "
                    f"{lam.min():.3g}; the moment most involved is {self.moment_names()[r]}): a "
                    "variable is constant or a linear function of others. Use method='ml'")
            Wi = (V / lam) @ V.T
            W = Wi / np.outer(sd, sd)
            self._W = 0.5 * (W + W.T)
        return self._W

    def moment_names(self):
        out = [f"mean({self.names[i]})" for i in range(self.P)]
        out += [f"cov({self.names[i]}, {self.names[j]})" if i != j else f"var({self.names[i]})"
                for i, j in zip(self.pa, self.pb)]
        return out


def _joint(Cyy, Cyx, Sxx):
    P, q = Cyx.shape
    C = np.empty((P + q, P + q))
    C[:P, :P] = Cyy
    C[:P, P:] = Cyx
    C[P:, :P] = Cyx.T
    C[P:, P:] = Sxx
    return C


def matrix_derivatives(model, psi):
    """d Sigma (nfull, P, P), d m0 (nfull, P) and d T (nfull, P, q) with respect to
    the full parameters (analytic, through the model's index arrays), where
    Sigma = Lt Psi Lt' + Theta, m0 = nu + Lt alpha and T = Gamma_y + Lt Gamma_eta.
    Returns (matrices, Lt, Sigma, T, m0, dSig, dm0, dTot)."""
    m = model.matrices(psi)
    P, M, q = model.P, model.M, model.q
    E = np.linalg.inv(np.eye(M) - m["beta"])
    Lt = m["lambda"] @ E
    Psi, alpha, geta = m["psi"], m["alpha"], m["geta"]
    Sigma = Lt @ Psi @ Lt.T + m["theta"]
    Tot = m["gy"] + Lt @ geta
    m0 = m["nu"] + Lt @ alpha
    nfull = len(model.table.full_names)
    dSig = np.zeros((nfull, P, P))
    dm0 = np.zeros((nfull, P))
    dTot = np.zeros((nfull, P, q))
    LtPsi = Lt @ Psi
    for mat in ("lambda", "beta", "psi", "theta", "nu", "alpha", "gy", "geta"):
        rr, cc, ff = model.idx[mat]
        for r, c, f in zip(rr.tolist(), cc.tolist(), ff.tolist()):
            if mat in ("lambda", "beta"):
                if mat == "lambda":
                    dLt = np.zeros((P, M))
                    dLt[r, :] = E[c, :]
                else:
                    dLt = np.outer(Lt[:, r], E[c, :])
                X1 = dLt @ LtPsi.T
                dSig[f] += X1 + X1.T
                dTot[f] += dLt @ geta
                dm0[f] += dLt @ alpha
            elif mat == "psi":
                dSig[f] += np.outer(Lt[:, r], Lt[:, c])
            elif mat == "theta":
                dSig[f, r, c] += 1.0
            elif mat == "nu":
                dm0[f, r] += 1.0
            elif mat == "alpha":
                dm0[f] += Lt[:, r]
            elif mat == "gy":
                dTot[f, r, c] += 1.0
            else:  # geta
                dTot[f, :, c] += Lt[:, r]
    return m, Lt, Sigma, Tot, m0, dSig, dm0, dTot


def assemble(m0, Tot, Sigma, mom: Moments, dSig=None, dm0=None, dTot=None):
    """The kept implied moments (mu_y, vech rows) from m0, T and Sigma, and, given
    their derivatives (leading axis: parameters), Delta (nmom x nparam)."""
    Sxx, xbar = mom.Sxx, mom.xbar
    mu = m0 + Tot @ xbar
    Cyx = Tot @ Sxx
    C = _joint(Sigma + Cyx @ Tot.T, Cyx, Sxx)
    sig = np.concatenate([mu, C[mom.pa, mom.pb]])
    if dSig is None:
        return sig, None, C
    P, q = Tot.shape
    k = dSig.shape[0]
    dmu = dm0 + dTot @ xbar                                   # (k, P)
    dCyx = dTot @ Sxx                                         # (k, P, q)
    X2 = dCyx @ Tot.T                                         # (k, P, P)
    dC = np.zeros((k, P + q, P + q))
    dC[:, :P, :P] = dSig + X2 + X2.transpose(0, 2, 1)
    dC[:, :P, P:] = dCyx
    dC[:, P:, :P] = dCyx.transpose(0, 2, 1)
    return sig, np.hstack([dmu, dC[:, mom.pa, mom.pb]]).T, C


def sigma_and_jacobian(model, psi, mom: Moments, need_jac=True):
    """sigma(psi) on the kept moments and Delta = d sigma / d psi (analytic) for a
    SemModel; third value: the joint implied covariance of (y, x)."""
    m, Lt, Sigma, Tot, m0, dSig, dm0, dTot = matrix_derivatives(model, psi)
    if not need_jac:
        return assemble(m0, Tot, Sigma, mom)
    sig, D, C = assemble(m0, Tot, Sigma, mom, dSig, dm0, dTot)
    return sig, D @ model.table.T, C


class MultilevelMoments:
    """The wide form of a multilevel model (mlsem.fit's table and prepared data)
    for ADF and the scaled test: Y (units x slots), the covariates of every slot
    as fixed x (columns that are linear combinations of the intercept and of the
    others, e.g. a top-level covariate repeated in every slot, kept once), and
    the implied moments with analytic derivatives from the parameter table."""

    def __init__(self, prep, table, unbiased=True, what="method='adf'", check=True):
        alt = "; use method='ml'" if what == "method='adf'" else ""
        if getattr(table, "theta_func", None) is not None:
            raise MlsemError(f"{what}: not available for a structured residual covariance "
                             "(residuals= ar1 or another correlation structure): its moments are not "
                             f"linear in the parameters{alt}")
        if np.any(prep.load != 1.0):
            raise MlsemError(f"{what}: not available with random slopes (the wide form's covariance "
                             f"depends on each unit's covariates){alt}")
        n, P = prep.nrows, prep.nslots
        self.prep, self.table = prep, table
        rowid = np.repeat(np.arange(n), np.diff(prep.row_ptr))
        Y = np.full((n, P), np.nan)
        Y[rowid, prep.slot] = prep.y
        lab = prep.slot_labels.sort("slot")
        below = [c for c in lab.columns if c != "slot"]
        names = ["y" + "_".join(str(r[c]) for c in below) for r in lab.iter_rows(named=True)]
        empty = np.isnan(Y)
        if empty.any():
            s = int(np.flatnonzero(empty.any(axis=0))[0])
            top = prep.levels[0].name
            ids = prep.top_ids.filter(pl.Series(empty[:, s])).sort().head(5).to_list()
            row = lab.row(s, named=True)
            raise MlsemError(
                f"{what} needs complete data: {int(empty.sum())} cell(s) of the wide form are empty "
                f"in {int(empty.any(axis=1).sum())} of {n} top-level units (an unbalanced design), e.g. "
                f"slot {names[s]} ({', '.join(f'{c} = {row[c]}' for c in below)}) "
                f"in {top} = {', '.join(map(str, ids))}. ADF's weight matrix needs every unit's "
                "fourth-order moments, so it does not delete units silently: use method='ml' (FIML "
                "over the missing patterns), or keep only complete units yourself")
        qd = prep.X.shape[1]
        Zf = np.zeros((n, P * qd))
        Zf[rowid[:, None], prep.slot[:, None] * qd + np.arange(qd)[None, :]] = prep.X
        one = np.ones((n, 1))
        from scipy.linalg import qr
        A = np.hstack([one, Zf])
        # constant columns (every slot's intercept, a covariate constant in the
        # data) are linear in the intercept: drop them first, then choose a basis
        # of the centred rest by pivoted QR (pivoting among tied constant columns
        # would depend on rounding)
        nz = np.flatnonzero(np.ptp(Zf, axis=0) > 0.0) if n else np.zeros(0, dtype=np.int64)
        if len(nz):
            Ac = Zf[:, nz] - Zf[:, nz].mean(axis=0)
            Ac /= np.linalg.norm(Ac, axis=0)        # the rank decision is scale-free
            _, R, piv = qr(Ac, mode="economic", pivoting=True)
            dg = np.abs(np.diag(R))
            keep = np.sort(nz[piv[dg > 1e-10 * dg.max()]] + 1)
        else:
            keep = np.zeros(0, dtype=np.int64)
        Xk = A[:, keep]
        B1 = np.hstack([one, Xk])
        Cmap, *_ = np.linalg.lstsq(B1, Zf, rcond=None)
        if np.max(np.abs(B1 @ Cmap - Zf)) > 1e-8 * max(1.0, np.abs(Zf).max()):  # pragma: no cover
            raise MlsemError(f"{what}: internal error laying out the covariates of the wide form")
        xn = [f"{c}[slot {s + 1}]" for s in range(P) for c in prep.xnames]
        self.xnames = [xn[k - 1] for k in keep]
        self.C3 = Cmap.reshape(1 + len(keep), P, qd)
        self.Y, self.X = Y, Xk
        self.mom = Moments(Y, Xk, names + self.xnames, unbiased=unbiased, check=check, what=what)
        M = prep.nlatent
        Lam = np.zeros((P, max(M, 1)))
        for k in range(prep.slot_lat.shape[1]):
            ok = prep.slot_lat[:, k] >= 0
            Lam[np.flatnonzero(ok), prep.slot_lat[ok, k]] = 1.0
        self.Lam = Lam[:, :M]
        self.M = M

    def __call__(self, psi, need_jac=True):
        t, P, M = self.table, self.prep.nslots, self.M
        npar = len(psi)
        beta = psi[t.beta_param]
        Phi = np.zeros((M, M))
        Phi[t.phi_row, t.phi_col] = psi[t.phi_param]
        Theta = np.zeros((P, P))
        Theta[t.theta_row, t.theta_col] = psi[t.theta_param]
        Sigma = self.Lam @ Phi @ self.Lam.T + Theta
        Mm = np.einsum("asc,c->as", self.C3, beta)
        m0, Tot = Mm[0], Mm[1:].T
        if not need_jac:
            return assemble(m0, Tot, Sigma, self.mom)
        dSig = np.zeros((npar, P, P))
        for r, c, k in zip(t.phi_row, t.phi_col, t.phi_param):
            dSig[k] += np.outer(self.Lam[:, r], self.Lam[:, c])
        for r, c, k in zip(t.theta_row, t.theta_col, t.theta_param):
            dSig[k, r, c] += 1.0
        Bk = np.zeros((npar, len(beta)))
        Bk[t.beta_param, np.arange(len(beta))] = 1.0
        dMm = np.einsum("asc,kc->kas", self.C3, Bk)
        return assemble(m0, Tot, Sigma, self.mom, dSig, dMm[:, 0, :], dMm[:, 1:, :].transpose(0, 2, 1))


class AdfObjective:
    """F(psi) = (s - sigma)' W (s - sigma) and its gradient; ``fn(psi, need_jac)``
    returns (sigma, Delta, ...) on the kept moments of ``mom``."""

    def __init__(self, fn, mom: Moments):
        self.fn = fn
        self.mom = mom
        self.W = mom.W
        self.nevals = 0

    @classmethod
    def for_sem(cls, model, mom: Moments):
        return cls(lambda psi, need_jac=True: sigma_and_jacobian(model, psi, mom, need_jac), mom)

    def value(self, psi):
        sig = self.fn(psi, False)[0]
        d = self.mom.s - sig
        return float(d @ self.W @ d)

    def value_grad(self, psi):
        self.nevals += 1
        sig, D = self.fn(psi, True)[:2]
        d = self.mom.s - sig
        Wd = self.W @ d
        return float(d @ Wd), -2.0 * D.T @ Wd, D

    def decrement(self, g, D):
        """The decrease of F that a Gauss-Newton step would still bring,
        g' H^-1 g / 4 (H = Delta' W Delta): F is unit-free (W is the inverse of
        the moments' covariance), and so is this, unlike the gradient, whose
        entries scale with the parameters' units."""
        H = D.T @ self.W @ D
        try:
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, g, rcond=None)[0]
        return abs(float(g @ step)) / 4.0

    def minimize(self, psi0, maxiter=500, tol=1e-12):
        """Gauss-Newton (the objective is a weighted sum of squares) with step
        halving; then, if it stalled, BFGS from there.  Returns (psi, F, info)."""
        psi = np.asarray(psi0, dtype=float).copy()
        f, g, D = self.value_grad(psi)
        it = 0
        converged = False
        for it in range(1, maxiter + 1):
            H = D.T @ self.W @ D
            try:
                step = np.linalg.solve(H, -0.5 * g)
            except np.linalg.LinAlgError:
                step = np.linalg.lstsq(H, -0.5 * g, rcond=None)[0]
            t = 1.0
            while True:
                cand = psi + t * step
                fc = self.value(cand)
                if np.isfinite(fc) and fc <= f + 1e-14 * max(1.0, abs(f)):
                    break
                t *= 0.5
                if t < 1e-10:
                    break
            if t < 1e-10:
                break
            psi = cand
            fn, g, D = self.value_grad(psi)
            small = np.max(np.abs(t * step) / np.maximum(np.abs(psi), 1.0)) < 1e-10
            done = abs(f - fn) <= tol * max(1.0, abs(fn))
            f = fn
            if small or (done and self.decrement(g, D) < 1e-10):
                converged = True
                break
        if not converged:
            from scipy.optimize import minimize
            r = minimize(lambda x: self.value_grad(x)[:2], psi, jac=True, method="BFGS",
                         options={"gtol": 1e-10, "maxiter": 10000})
            psi = r.x
            f, g, D = self.value_grad(psi)
            converged = bool(r.success) or self.decrement(g, D) < 1e-10
        H = D.T @ self.W @ D
        return psi, f, {"iterations": it, "converged": converged, "grad": g, "info": H, "jacobian": D}


def _expected_h1_information(C, mom: Moments):
    """Per-unit expected normal-theory information of the saturated model at the
    joint covariance C, on the kept moments (the covariates' rows dropped, as
    lavaan zeroes them with fixed.x): C^-1 (means of y), 1/2 D'(C^-1 x C^-1)D (vech)."""
    try:
        Ci = np.linalg.inv(C)
    except np.linalg.LinAlgError:
        raise MlsemError("the implied covariance matrix is singular") from None
    P = mom.P
    a, b = mom.pa, mom.pb
    off = (a != b).astype(float) + 1.0   # 2 for an off-diagonal pair (both triangles)
    Acov = 0.5 * (Ci[np.ix_(a, a)] * Ci[np.ix_(b, b)] + Ci[np.ix_(a, b)] * Ci[np.ix_(b, a)])
    Acov *= 0.5 * off[:, None] * off[None, :]
    A = np.zeros((mom.nmom, mom.nmom))
    A[:P, :P] = Ci[:P, :P]
    A[P:, P:] = Acov
    return A


def satorra_bentler(C, D, mom: Moments, chi2, df):
    """lavaan's MLM scaled statistic: (chi2 / c, c), c = tr(U Gamma) / df, at the
    ML estimate (C: joint implied covariance, D: Delta; mom: biased moments)."""
    if df <= 0:
        return float("nan"), float("nan")
    A = _expected_h1_information(C, mom)
    AD = A @ D
    U = A - AD @ np.linalg.solve(D.T @ AD, AD.T)
    c = float(np.trace(U @ mom.Gamma)) / df
    return chi2 / c, c


def robust_sem_vcov(C, D, mom: Moments):
    """lavaan's se = "robust.sem" (MLM's standard errors): the sandwich with the
    expected information as bread, (D'AD)^-1 D'A Gamma A D (D'AD)^-1 / N."""
    A = _expected_h1_information(C, mom)
    AD = A @ D
    Bi = np.linalg.inv(D.T @ AD)
    V = Bi @ (AD.T @ mom.Gamma @ AD) @ Bi / mom.n
    return 0.5 * (V + V.T)


def chi2_pvalue(chi2, df):
    from scipy import stats
    return float(stats.chi2.sf(chi2, df)) if df > 0 else float("nan")


__all__ = ["Moments", "MultilevelMoments", "AdfObjective", "sigma_and_jacobian", "matrix_derivatives",
           "satorra_bentler", "robust_sem_vcov", "check_complete", "ADF_NAMES"]
