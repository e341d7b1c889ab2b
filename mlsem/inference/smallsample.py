"""Small-sample inference for the fixed effects: Satterthwaite and
Kenward-Roger denominator degrees of freedom (results layer: reads the fitted
model, evaluates the kernel again; nothing here is in the optimiser's loop).

Notation: psi_v the variance parameters (variances, covariances, residual
variance), V = sum_i psi_i G_i (V is linear in them: G_i = Lambda dPhi/dpsi_i
Lambda' per top-level unit, or the indicator of the slots of a residual
variance), C = X'V^-1X, Phi = C^-1 the covariance of the fixed effects,
P_i = X'V^-1 G_i V^-1 X (so dPhi/dpsi_i = Phi P_i Phi).

* Satterthwaite, as lmerTest 3.1 (``contest1D``/``contestMD``): for a
  contrast l, df = 2 (l'Phi l)^2 / (g' A g) with g_i = l' Phi P_i Phi l and A
  the covariance of the variance parameters, the inverse of the observed
  information of the deviance in them.  lmerTest differentiates the REML (or,
  for ML fits, the ML with beta profiled out) deviance numerically in (theta,
  sigma); at an interior optimum g'Ag does not depend on the parameterisation,
  so the observed information in psi gives the same numbers.  For REML it is
  the REML fit's own Hessian; for ML the Schur complement of the fixed effects
  in the full observed information (beta profiled out, as lmerTest's
  deviance).  A variance estimated at 0 drops out (in lmerTest's theta its
  derivatives vanish there).  Several restrictions: lmerTest's F test
  (eigen-decomposition of L Phi L', one df per direction, combined by
  ``get_Fstat_ddf``).
* Kenward-Roger, as pbkrtest 0.5 (``vcovAdj``, ``Lb_ddf``, ``KRmodcomp``),
  REML only: W = 2 IE^-1 with IE_ij = tr(V^-1G_iV^-1G_j) - 2 tr(Phi Q_ij) +
  tr(Phi P_i Phi P_j), Q_ij = X'V^-1G_iV^-1G_jV^-1X; the adjusted covariance
  Phi_A = Phi + 2 Phi U Phi, U = sum_ij W_ij (Q_ij - P_i Phi P_j); the df and
  the F scaling of Kenward & Roger (1997).

P_i comes from V^-1 X, which the kernel gives column by column (as REML's
GLS does), and the per-unit sums Lambda_r' V^-1 X_r: analytic, no nested
differences.  Q_ij and the traces (Kenward-Roger only) are sums over the
missing patterns of small dense matrices (one V^-1 per pattern).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..errors import MlsemError
from ..estimate.optimize import SINGULAR_BLOCK, singular_block_params
from ..model.scores import kernel_eval

METHODS = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger"}


def check_df_option(df, method):
    """None, 'satterthwaite' or 'kenward-roger' (case-insensitive); KR needs REML."""
    if df is None:
        return None
    if not isinstance(df, str) or df.lower().replace("_", "-") not in METHODS:
        raise MlsemError(f"df={df!r} is not one of None, 'satterthwaite', 'kenward-roger'")
    df = df.lower().replace("_", "-")
    if method not in ("ml", "reml"):
        raise MlsemError(f"df={df!r} needs method='ml' or 'reml' (a likelihood fit), not {method!r}")
    if df == "kenward-roger" and method != "reml":
        raise MlsemError("df='kenward-roger' needs method='reml' (Kenward-Roger is defined for "
                         "the REML fit, as pbkrtest); use df='satterthwaite' with method='ml'")
    return df


# ---- the blocks --------------------------------------------------------------
class _Blocks:
    """Phi = C^-1, V^-1 X and P_i at psi for the model's variance parameters."""

    def __init__(self, model, psi):
        t = model.table
        prep = model.prep
        if model.dense or t.theta_func is not None:
            raise MlsemError("small-sample df: the model has a structured or correlated residual "
                             "covariance; Satterthwaite/Kenward-Roger df need a diagonal one")
        if np.any(prep.wrow != 1.0):
            raise MlsemError("small-sample df cannot be combined with sampling weights")
        if len(np.unique(t.beta_param)) != model.q or model.q == 0:
            raise MlsemError("small-sample df need one coefficient per design column")
        self.model, self.psi = model, psi
        self.fixed = np.asarray(t.beta_param)
        kinds = [p.kind for p in t.params]
        self.var = np.array([i for i, k in enumerate(kinds) if k != "fixed"], dtype=np.int64)
        _, Phi, Theta = model.matrices(psi)
        self.Phi_re, self.Theta = Phi, Theta
        q = model.q
        WX = np.empty((prep.nobs, q))
        for a in range(q):
            out = kernel_eval(model, prep.X[:, a], Phi, Theta)
            if out is None:
                raise MlsemError("small-sample df: V is not positive definite at the estimates")
            WX[:, a] = out[3]
        C = prep.X.T @ WX
        C = 0.5 * (C + C.T)
        self.WX = WX
        self.C = C
        self.V = np.linalg.inv(C)
        self.V = 0.5 * (self.V + self.V.T)
        self.P = self._p_blocks()

    def _p_blocks(self):
        m, t, prep = self.model, self.model.table, self.model.prep
        q, M = m.q, m.M
        WX = self.WX
        pos = {int(p): c for c, p in enumerate(self.var)}
        P = np.zeros((len(self.var), q, q))
        # residual variances: G = indicator of their slots
        tp = np.full(m.P, -1, dtype=np.int64)
        tp[t.theta_row] = t.theta_param
        po = tp[prep.slot]
        for p in np.unique(t.theta_param):
            sel = po == p
            P[pos[int(p)]] += WX[sel].T @ WX[sel]
        if len(t.phi_param):
            # U_r = Lambda_r' V^-1 X_r per top unit: (nrows, M, q)
            n = prep.nrows
            rowid = np.repeat(np.arange(n), np.diff(prep.row_ptr))
            U = np.zeros((n * M, q))
            for k in range(prep.slot_lat.shape[1]):
                lat = prep.slot_lat[prep.slot, k]
                ok = lat >= 0
                idx = rowid[ok] * M + lat[ok]
                for a in range(q):
                    U[:, a] += np.bincount(idx, weights=prep.load[ok, k] * WX[ok, a], minlength=n * M)
            U = U.reshape(n, M, q)
            for p in np.unique(t.phi_param):
                e = t.phi_param == p
                A = U[:, t.phi_row[e], :].reshape(-1, q)
                B = U[:, t.phi_col[e], :].reshape(-1, q)
                P[pos[int(p)]] += A.T @ B
        return 0.5 * (P + np.transpose(P, (0, 2, 1)))

    # ---- Kenward-Roger's second-order pieces ---------------------------------
    def _pattern_design(self):
        """(D, tp): dPhi/dpsi_i (nv, M, M) and the residual variance's position per slot."""
        m, t = self.model, self.model.table
        nv = len(self.var)
        pos = np.full(t.nparams, -1, dtype=np.int64)
        pos[self.var] = np.arange(nv)
        D = np.zeros((nv, m.M, m.M))
        if len(t.phi_param):
            np.add.at(D, (pos[t.phi_param], t.phi_row, t.phi_col), 1.0)
        tp = np.full(m.P, -1, dtype=np.int64)
        tp[t.theta_row] = pos[t.theta_param]
        return D, tp

    def _pattern_lambda(self, o0, o1):
        prep, M = self.model.prep, self.model.M
        s = prep.slot[o0:o1]
        lam = np.zeros((o1 - o0, M))
        for k in range(prep.slot_lat.shape[1]):
            g = prep.slot_lat[s, k]
            ok = g >= 0
            lam[np.flatnonzero(ok), g[ok]] += prep.load[o0:o1, k][ok]
        used = np.flatnonzero(np.any(lam != 0, axis=0))
        return s, lam[:, used], used

    def kr_pieces(self):
        """(Ktrace, Q): Ktrace_ij = sum_r tr(V^-1G_iV^-1G_j), Q_ij = sum_r
        X'V^-1G_iV^-1G_jV^-1X, per missing pattern with G_i = Lambda D_i
        Lambda' + T_i (T_i the diagonal of residual variance i), B = V^-1
        Lambda, S = Lambda'B, U = Lambda'V^-1X:
        tr(G_iV^-1G_jV^-1) = tr(D_iSD_jS) + tr(D_iB'T_jB) + tr(D_jB'T_iB) + t_i'(V^-1 o V^-1)t_j,
        V^-1G_jV^-1X = B D_j U + V^-1 T_j V^-1X.  O(n^2 (m + q)) per unit beyond V^-1."""
        m, prep = self.model, self.model.prep
        q = m.q
        nv = len(self.var)
        D, tp = self._pattern_design()
        K = np.zeros((nv, nv))
        Q = np.zeros((nv, nv, q, q))
        Phi, Theta = self.Phi_re, self.Theta
        for pt in range(prep.npatterns):
            r0, r1 = int(prep.pat_ptr[pt]), int(prep.pat_ptr[pt + 1])
            o0, o1 = int(prep.row_ptr[r0]), int(prep.row_ptr[r0 + 1])
            s, lam, used = self._pattern_lambda(o0, o1)
            n, nr = o1 - o0, r1 - r0
            Vp = lam @ Phi[np.ix_(used, used)] @ lam.T
            Vp[np.diag_indices(n)] += Theta[s]
            Vi = np.linalg.inv(Vp)
            Vi = 0.5 * (Vi + Vi.T)
            B = Vi @ lam
            S = lam.T @ B
            Dp = D[:, used][:, :, used]                          # (nv, m, m)
            T = (tp[s][None, :] == np.arange(nv)[:, None]).astype(float)   # (nv, n)
            DS = Dp @ S                                          # D_i S
            K1 = np.einsum("iab,jba->ij", DS, DS)
            BTB = np.einsum("na,in,nb->iab", B, T, B)            # B' T_i B
            K2 = np.einsum("iab,jba->ij", Dp, BTB)               # tr(D_i B'T_j B)
            K3 = T @ (Vi * Vi) @ T.T
            K += nr * (K1 + K2 + K2.T + K3)
            o_end = int(prep.row_ptr[r1])
            WXp = self.WX[o0:o_end].reshape(nr, n, q)
            U = np.einsum("na,rnq->raq", lam, WXp)               # Lambda'V^-1X_r
            DU = np.einsum("iab,rbq->riaq", Dp, U)               # D_i U_r
            TW = T[None, :, :, None] * WXp[:, None, :, :]        # T_i V^-1X_r (nr, nv, n, q)
            O = np.einsum("na,riaq->rinq", lam, DU) + TW          # G_i V^-1 X_r
            VO = np.einsum("na,riaq->rinq", B, DU) + np.matmul(Vi, TW)
            O2 = np.transpose(O, (1, 0, 2, 3)).reshape(nv, nr * n, q)
            VO2 = np.transpose(VO, (1, 0, 2, 3)).reshape(nv, nr * n, q)
            Q += np.einsum("ixp,jxq->ijpq", O2, VO2, optimize=True)
        return K, Q


# ---- the df ---------------------------------------------------------------------
KR_RCOND = 1e-10          # relative: below it the expected information is treated as singular


def _pinv_sub(info, keep):
    """The inverse of info over the kept parameters (zeros elsewhere), by its
    eigen-decomposition (as lmerTest's Moore-Penrose inverse of the Hessian)."""
    A = np.zeros(info.shape)
    sub = info[np.ix_(keep, keep)]
    # on the unit-diagonal scale: the variance parameters' units differ (a slope's
    # variance is in y^2 / x^2), and a threshold on the raw eigenvalues dropped the
    # slope's direction when x was in large units (df 4,244 instead of 17)
    d = _unit_scale(sub)
    S = sub / np.outer(d, d)
    lam, Qv = np.linalg.eigh(0.5 * (S + S.T))
    pos = lam > 1e-8 * max(lam.max(initial=0.0), 1e-300)
    A[np.ix_(keep, keep)] = ((Qv[:, pos] / lam[pos]) @ Qv[:, pos].T) / np.outer(d, d)
    return A


def _unit_scale(B):
    """sqrt of B's diagonal (1 where it is 0): B / outer(d, d) has a unit diagonal."""
    d = np.sqrt(np.abs(np.diag(B)))
    d[d == 0] = 1.0
    return d


class SmallSample:
    """Denominator df of the fixed effects of a fit (``res.small``)."""

    def __init__(self, res, method, reml_info=None, reml_params=None):
        self.method = method
        m = res.model
        psi = res.estimate
        b = _Blocks(m, psi)
        self.blocks = b
        self.fixed = b.fixed
        self.names = [res.names[i] for i in b.fixed]
        self.beta = psi[b.fixed]
        self.V = b.V
        self.notes = []
        if method == "satterthwaite":
            self.P_df = b.P
            done = False
            if not len(singular_block_params(m, psi)):
                done = self._satterthwaite_psi(res, b, reml_info, reml_params)
            if not done:
                # a rank-deficient covariance block (correlation +-1): V is not
                # positive definite on one side of psi, and the psi derivatives
                # of the deviance are one-sided there; lmerTest's theta (a
                # Cholesky factor) has the singular direction at 0, where the
                # deviance and cov(beta) are even in it: it drops out
                self._satterthwaite_tau(res, b)
            self.Vadj = self.V
        else:
            with m._one_blas_thread():     # many small matrices: one BLAS thread is faster
                K, Q = b.kr_pieces()
            Phi, P = b.V, b.P
            nv = len(b.var)
            IE = np.empty((nv, nv))
            for i in range(nv):
                for j in range(nv):
                    IE[i, j] = (K[i, j] - 2.0 * np.sum(Phi * Q[i, j])
                                + np.sum((Phi @ P[i]) * (P[j] @ Phi)))
            IE = 0.5 * (IE + IE.T)
            d = _unit_scale(IE)          # judged and inverted on the unit-diagonal scale
            IEs = IE / np.outer(d, d)
            ev = np.abs(np.linalg.eigvalsh(IEs))
            if ev.min() > KR_RCOND * ev.max():
                W = 2.0 * np.linalg.inv(IEs) / np.outer(d, d)
            else:
                W = 2.0 * np.linalg.pinv(IEs, rcond=KR_RCOND, hermitian=True) / np.outer(d, d)
                self.notes.append(f"Kenward-Roger: the expected information of the variance "
                                  f"parameters is singular (smallest/largest eigenvalue "
                                  f"{ev.min() / ev.max():.2g}); its pseudo-inverse is used")
            U = np.zeros_like(Phi)
            for i in range(nv):
                for j in range(nv):
                    U += W[i, j] * (Q[i, j] - P[i] @ Phi @ P[j])
            PhiA = Phi + 2.0 * Phi @ U @ Phi
            self.W = 0.5 * (W + W.T)
            self.Vadj = 0.5 * (PhiA + PhiA.T)
            self.dropped = []
        self.df = np.array([self._df1(np.eye(len(self.fixed))[a]) for a in range(len(self.fixed))])


    def _satterthwaite_psi(self, res, b, reml_info, reml_params):
        """A = the inverse information of the variance parameters psi; False
        when the REML Hessian in psi cannot be computed."""
        m, psi, t = res.model, res.estimate, res.model.table
        lo = np.array([p.lower for p in t.params])
        idx = b.var
        if res.method == "REML":
            if reml_info is not None and (reml_params is None
                                          or not np.array_equal(np.asarray(reml_params), idx)):
                raise MlsemError("internal: the REML information is not over the variance "
                                 "parameters of the model")
            if reml_info is None:
                from ..estimate.reml import RemlObjective
                H = RemlObjective(m).hessian(psi)
                if H is None:
                    return False
                reml_info = -H
            info_v = reml_info
        else:
            if res.info is None or not np.all(np.isfinite(res.info)):
                raise MlsemError("Satterthwaite df: no observed information at the estimates")
            I = res.info
            Ibb = I[np.ix_(b.fixed, b.fixed)]
            Ivb = I[np.ix_(idx, b.fixed)]
            info_v = I[np.ix_(idx, idx)] - Ivb @ np.linalg.solve(Ibb, Ivb.T)
        # a variance at its bound 0 (where the optimiser put it) drops out
        # (lmerTest's theta = 0); the test is relative to the parameter's unit
        from ..estimate.optimize import _at_bound
        keep = ~((lo[idx] == 0.0) & _at_bound(m, psi)[idx])
        self.dropped = [res.names[i] for i in idx[~keep]]
        self.A = _pinv_sub(info_v, keep)
        return True

    def _satterthwaite_tau(self, res, b):
        """A and the P blocks in the optimiser's coordinates tau (lme4's
        Cholesky parameters of each covariance block, up to units), with the
        Cholesky diagonals at 0 and the variances at their bound left out."""
        m, psi, t = res.model, res.estimate, res.model.table
        tau = m.psi_to_tau(psi, psd=True)
        nt, n0 = m.ntau, len(m.free_plain)
        owner = np.empty(nt, dtype=np.int64)
        owner[:n0] = m.free_plain
        diag = np.zeros(nt, dtype=bool)
        pos = n0
        for blk in m._chol:
            k = blk.pidx.shape[0]
            r, c = np.tril_indices(k)
            owner[pos: pos + len(r)] = blk.pidx[r, c]
            diag[pos: pos + len(r)] = r == c
            pos += len(r)
        unit = m._scale()
        if np.any(np.abs(m.tau_to_psi(tau) - psi) > 1e-8 * np.maximum(np.abs(psi), unit)):
            raise MlsemError("internal: Satterthwaite df: the estimates are not in the "
                             "optimiser's coordinates")
        fixed_t = np.isin(owner, b.fixed)
        lo_t = np.array([-np.inf if bd[0] is None else bd[0] for bd in m.tau_bounds()])
        plain = np.arange(nt) < n0
        # dpsi/dtau: tau_to_psi is linear or quadratic in each entry
        J = np.empty((t.nparams, nt))
        for k in range(nt):
            e = 1e-3 * max(1.0, abs(tau[k]))
            up, dn = tau.copy(), tau.copy()
            up[k] += e
            dn[k] -= e
            J[:, k] = (m.tau_to_psi(up) - m.tau_to_psi(dn)) / (2.0 * e)
        if res.method == "REML":
            from ..estimate.reml import RemlObjective
            obj = RemlObjective(m)
            grad = lambda x: obj.value(m.tau_to_psi(x))[1]
            cols = np.flatnonzero(~fixed_t)
        else:
            grad = lambda x: m.evaluate(m.tau_to_psi(x))[1]
            cols = np.arange(nt)

        def gtau(x):
            g = grad(x)
            if g is None:
                raise MlsemError("Satterthwaite df: the deviance cannot be evaluated near the "
                                 "estimates (V not positive definite)")
            return m.grad_tau(x, g)

        H = np.zeros((len(cols), len(cols)))
        g0 = None
        for c, k in enumerate(cols):
            h = 1e-4 * max(abs(tau[k]), 0.1)        # tau is unit-free
            up, dn = tau.copy(), tau.copy()
            up[k] += h
            dn[k] -= h
            if plain[k] and np.isfinite(lo_t[k]) and dn[k] < lo_t[k]:
                if g0 is None:
                    g0 = gtau(tau)
                H[:, c] = (gtau(up)[cols] - g0[cols]) / h
            else:
                H[:, c] = (gtau(up)[cols] - gtau(dn)[cols]) / (2.0 * h)
        info = -0.5 * (H + H.T)
        if res.method != "REML":
            fb = np.flatnonzero(fixed_t)
            vv = np.flatnonzero(~fixed_t)
            Ivb = info[np.ix_(vv, fb)]
            info = info[np.ix_(vv, vv)] - Ivb @ np.linalg.solve(info[np.ix_(fb, fb)], Ivb.T)
        vt = np.flatnonzero(~fixed_t)
        at_lo = np.isfinite(lo_t[vt]) & (tau[vt] - lo_t[vt] <= 1e-7 * np.maximum(np.abs(tau[vt]), 1.0))
        # a Cholesky diagonal at 0 up to the optimiser's rounding (its square,
        # relative to the variance it belongs to, below SINGULAR_BLOCK)
        tiny = diag[vt] & (tau[vt] ** 2 * m._scale()[owner[vt]] <= SINGULAR_BLOCK * np.abs(psi[owner[vt]]))
        keep = ~(at_lo | tiny)
        self.dropped = [res.names[owner[k]] for k in vt[at_lo & plain[vt]]]
        if np.any(~keep & ~plain[vt]):
            blk_names = [res.names[owner[k]] for k in vt[~keep & ~plain[vt]]]
            self.notes.append("Satterthwaite df: a singular random-effects covariance (correlation "
                              "+-1); computed in its Cholesky parameters (lmerTest's theta), the one "
                              f"at 0 (for {', '.join(blk_names)}) left out")
        self.A = _pinv_sub(info, keep)
        # dPhi_beta/dtau_k = sum_i dpsi_i/dtau_k dPhi_beta/dpsi_i
        Jv = J[np.ix_(b.var, vt)]
        self.P_df = np.einsum("ik,iab->kab", Jv, b.P)

    # one contrast
    def _df1(self, c):
        if self.method == "satterthwaite":
            v = float(c @ self.V @ c)
            Vc = self.V @ c
            g = np.array([Vc @ Pi @ Vc for Pi in self.P_df])
            den = float(g @ self.A @ g)
            return 2.0 * v * v / den if den > 0 else math.inf
        return self._kr_ddf(c[None, :])

    def _kr_ddf(self, L):
        """pbkrtest's Lb_ddf / .KR_adjust: (df2, F scaling)."""
        df2, _ = self._kr(L)
        return df2

    def _kr(self, L):
        V0, P, W = self.V, self.blocks.P, self.W
        Th = L.T @ np.linalg.solve(L @ V0 @ L.T, L)
        TV = Th @ V0
        u = [TV @ Pi @ V0 for Pi in P]
        A1 = A2 = 0.0
        for i in range(len(P)):
            for j in range(len(P)):
                A1 += W[i, j] * np.trace(u[i]) * np.trace(u[j])
                A2 += W[i, j] * np.sum(u[i] * u[j].T)
        q = L.shape[0]
        B = (A1 + 6.0 * A2) / (2.0 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3.0 * q + 2.0 * (1.0 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0s = 1.0 + c1 * B
        V1 = 1.0 - c2 * B
        V2 = 1.0 - c3 * B
        if abs(V0s) < 1e-10:
            V0s = 0.0
        x, y = 1.0 - A2 / q, V1
        ratio = 1.0 if (abs(x) < 1e-14 and abs(y) < 1e-14) else x / y
        rho = ratio ** 2 * V0s / V2 / q
        df2 = 4.0 + (q + 2.0) / (q * rho - 1.0)
        scale = 1.0 if abs(df2 - 2.0) < 1e-2 else df2 * (1.0 - A2 / q) / (df2 - 2.0)
        return df2, scale

    # ---- tests ------------------------------------------------------------------
    def ftest(self, L, r):
        """F test of L beta = r (rows of L over the fixed effects)."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        d = L @ self.beta - r
        q = L.shape[0]
        if self.method == "kenward-roger":
            df2, scale = self._kr(L)
            wald = float(d @ np.linalg.solve(L @ self.Vadj @ L.T, d))
            F = scale * wald / q
            return {"F": float(F), "df_num": q, "df_den": float(df2), "F_scaling": float(scale),
                    "p_value": float(stats.f.sf(F, q, df2)), "df_method": METHODS[self.method]}
        VL = L @ self.V @ L.T
        lam, Pv = np.linalg.eigh(0.5 * (VL + VL.T))
        order = np.argsort(lam)[::-1]
        lam, Pv = lam[order], Pv[:, order]
        tol = max(np.finfo(float).eps ** 0.5 * lam[0], 0.0)
        pos = lam > tol
        k = int(pos.sum())
        PtL = Pv[:, :k].T @ L
        t2 = (Pv[:, :k].T @ d) ** 2 / lam[:k]
        F = float(t2.sum() / k)
        nu = np.array([self._df1(PtL[i]) for i in range(k)])
        if k == 1:
            ddf = float(nu[0])
        elif np.all(np.abs(np.diff(nu)) < 1e-8):
            ddf = float(nu.mean())
        elif np.any(nu <= 2):
            ddf = 2.0
        else:
            E = float(np.sum(nu / (nu - 2.0)))
            ddf = 2.0 * E / (E - k)
        return {"F": F, "df_num": k, "df_den": ddf, "p_value": float(stats.f.sf(F, k, ddf)),
                "df_method": METHODS[self.method]}


def apply_df(res, method, reml_info=None, reml_params=None):
    """Attach the df (and, for Kenward-Roger, the adjusted covariance of the
    fixed effects) to a fit."""
    if res.vce != "mixed":
        raise MlsemError(f"df={method!r} needs the mixed-model standard errors (vce='mixed'), "
                         f"not vce={res.vce!r}")
    s = SmallSample(res, method, reml_info, reml_params)
    res.small = s
    res.df_method = METHODS[method]
    df = np.full(len(res.names), np.nan)
    df[s.fixed] = s.df
    res.df = df
    if method == "kenward-roger":
        res.cov = res.cov.copy()
        res.cov[np.ix_(s.fixed, s.fixed)] = s.Vadj
        res.notes.append("Kenward-Roger: fixed-effect standard errors from the adjusted "
                         "covariance (pbkrtest's vcovAdj); t tests on Kenward-Roger df")
    else:
        what = "REML" if res.method == "REML" else "ML (fixed effects profiled out)"
        res.notes.append(f"Satterthwaite df (lmerTest's): t tests of the fixed effects; the "
                         f"variance parameters' covariance from the observed {what} information")
    if s.dropped:
        res.notes.append(f"Satterthwaite df: {', '.join(s.dropped)} estimated at 0, left out")
    res.notes.extend(s.notes)
    if not res.converged:
        res.notes.append(f"{METHODS[method]} df computed at estimates that did not converge: "
                         "the df (which need the optimum) are not reliable")
    return res
