"""The score space of a fitted multilevel model's wide SEM form (ScoreSpace):
the entries the mixed model ties by equality constraints and the fixed entries,
the gradient and the expected (or observed) information of the unconstrained
wide model at the fitted estimates. The tests themselves: mlsem.inference.scoretests.
"""
from __future__ import annotations

import numpy as np

from ..errors import MlsemError


class _Entry:
    """One coordinate of the extended parameter space of the wide form."""
    __slots__ = ("kind", "key", "lhs", "op", "rhs", "group", "value", "D", "v")

    def __init__(self, kind, key, lhs, op, rhs, group, value, D=None, v=None):
        self.kind, self.key, self.lhs, self.op, self.rhs = kind, key, lhs, op, rhs
        self.group, self.value, self.D, self.v = group, value, D, v

    @property
    def text(self):
        return f"{self.lhs} {self.op} {self.rhs}".strip()


class ScoreSpace:
    """The wide SEM around a fitted multilevel model, one coordinate per matrix
    entry (as lavaan's parameter table of the wide form):

    * relaxed entries: every entry the parameter table ties to a shared
      parameter gets its own coordinate: the coefficient of design column c in
      slot s (``y_s ~ x_s``, ``y_s ~1``), each latent (co)variance, each
      residual variance.  Entries sharing a parameter are the equality
      constraints (lavaan's ``.p1. == .p4.``);
    * fixed entries (modification indices): covariances of latents and of
      residuals fixed at 0, loadings of the slots on the random intercepts
      (their own, fixed at 1; the others, fixed at 0 -- lavaan's modindices
      leaves these cross loadings out), regressions of one slot's outcome on
      another slot's covariates and on another slot's outcome, and of a
      covariate on an outcome (fixed at 0; :meth:`_joint_xy`).

    The expected information needs only the first derivatives of the
    model-implied mean and covariance at the estimates (dmu/drho, dSigma/drho),
    which is what makes the outcome-on-outcome regressions cheap here: at 0,
    y_s ~ y_t moves mu_s by mu_t and Sigma by E_st Sigma + Sigma E_ts.
    Gradient and information are computed per missing pattern in dense
    NumPy (a one-time pass; sizes are checked)."""

    MAX_SLOTS = 60
    MAX_CROSS = 2000
    MAX_JOINT = 40

    def __init__(self, res, extras=True, yy=True):
        m = res.model
        if m.table.theta_func is not None:
            raise MlsemError("score_tests: not available for a structured residual covariance")
        prep = m.prep
        P, M = m.P, m.M
        if P > self.MAX_SLOTS:
            raise MlsemError(f"score_tests: the wide form has {P} slots (more than "
                             f"{self.MAX_SLOTS}): the dense per-pattern information is too large")
        self.res, self.model, self.prep = res, m, prep
        t = m.table
        psi = res.estimate
        self.psi = psi
        lab = prep.slot_labels
        def sname(base, s):
            # lavaan's wide names: y1_2 = y of (j = 1, i = 2); x1 -> x1_1_2
            vals = [str(v) for v in lab.row(int(s), named=True).values()][1:]
            sep = "_" if base[-1:].isdigit() else ""
            return base + sep + "_".join(vals) if vals else base
        self.ysl = [sname(res.outcome, s) for s in range(P)]
        lat = list(prep.latent_names) or ["(none)"]
        self.lat = lat
        slopes = bool(np.any(prep.load != 1.0))
        beta, Phi, Theta = m.matrices(psi)
        Th = Theta if Theta.ndim == 2 else np.diag(Theta)
        ents = []
        # relaxed mean entries: design column c in slot s
        xcols = prep.xnames
        for c, xn in enumerate(xcols):
            for s in range(P):
                D = np.where(prep.slot == s, prep.X[:, c], 0.0)
                if not np.any(D):
                    continue
                if xn == "Intercept":
                    e = _Entry("mean", (c, s), self.ysl[s], "~1", "", int(t.beta_param[c]), beta[c], D)
                else:
                    e = _Entry("mean", (c, s), self.ysl[s], "~", sname(xn, s), int(t.beta_param[c]), beta[c], D)
                ents.append(e)
        seen = set()
        for a, b, p in zip(t.phi_row, t.phi_col, t.phi_param):
            k = (min(a, b), max(a, b))
            if k in seen:
                continue
            seen.add(k)
            ents.append(_Entry("phi", k, lat[k[0]], "~~", lat[k[1]], int(p), Phi[k]))
        seen = set()
        for a, b, p in zip(t.theta_row, t.theta_col, t.theta_param):
            k = (min(a, b), max(a, b))
            if k in seen:
                continue
            seen.add(k)
            ents.append(_Entry("theta", k, self.ysl[k[0]], "~~", self.ysl[k[1]], int(p), Th[k]))
        self.notes = []
        # the covariates of the wide form, z_r = (1, x of every slot), zero
        # where a cell is missing (lavaan's fill)
        rowid = np.repeat(np.arange(prep.nrows), np.diff(prep.row_ptr))
        zcols = [np.ones(prep.nrows)]
        zpos = {}
        znames = ["1"]
        for c, xn in enumerate(xcols):
            if xn == "Intercept":
                continue
            xw = np.zeros((prep.nrows, P))
            xw[rowid, prep.slot] = prep.X[:, c]
            for u in range(P):
                zpos[(c, u)] = len(zcols)
                zcols.append(xw[:, u])
                znames.append(sname(xn, u))
        Zw = np.column_stack(zcols)
        self.Zw, self.zpos, self.xcols = Zw, zpos, xcols
        nz = Zw.shape[1]

        def zvec(c, u):
            v = np.zeros(nz)
            v[0 if xcols[c] == "Intercept" else zpos[(c, u)]] = 1.0
            return v
        for e in ents:
            if e.kind == "mean":
                e.v = zvec(*e.key)
        if extras:
            have_phi = {(e.key) for e in ents if e.kind == "phi"}
            for a in range(M):
                for b in range(a + 1, M):
                    if (a, b) not in have_phi:
                        ents.append(_Entry("phi", (a, b), lat[a], "~~", lat[b], -1, 0.0))
            have_th = {(e.key) for e in ents if e.kind == "theta"}
            for s in range(P):
                for u in range(s + 1, P):
                    if (s, u) not in have_th:
                        ents.append(_Entry("theta", (s, u), self.ysl[s], "~~", self.ysl[u], -1, 0.0))
            if not slopes:
                for s in range(P):
                    for k in range(prep.slot_lat.shape[1]):
                        g = prep.slot_lat[s, k]
                        if g >= 0:
                            ents.append(_Entry("load", (s, k, g), lat[g], "=~", self.ysl[s], -1, 1.0))
                    for g in range(M):
                        if g not in prep.slot_lat[s]:
                            ents.append(_Entry("load", (s, -1, g), lat[g], "=~", self.ysl[s], -1, 0.0))
            else:
                self.notes.append("loadings not tested (random slopes: loadings are covariate values)")
            # regressions of slot s on another slot's covariates
            ncross = P * (P - 1) * sum(1 for xn in xcols if xn != "Intercept")
            if ncross > self.MAX_CROSS:
                self.notes.append(f"regressions on other slots' covariates not tested ({ncross} > "
                                  f"{self.MAX_CROSS})")
                xcols_cross = []
            else:
                xcols_cross = xcols
            for c, xn in enumerate(xcols_cross):
                if xn == "Intercept":
                    continue
                xw = np.zeros((prep.nrows, P))   # zero where the slot is missing (lavaan's zero fill)
                xw[rowid, prep.slot] = prep.X[:, c]
                for s in range(P):
                    for u in range(P):
                        if u == s:
                            continue
                        D = np.where(prep.slot == s, xw[rowid, u], 0.0)
                        if np.any(D):
                            ents.append(_Entry("mean", (c, s, u), self.ysl[s], "~", sname(xn, u), -1, 0.0,
                                               D, zvec(c, u)))
            # regressions of slot s's outcome on slot t's outcome (no random slopes)
            if yy and not slopes and P * (P - 1) <= self.MAX_CROSS:
                for t_ in range(P):
                    v = np.zeros(nz)          # mu_t(row) = z_row' v
                    for c, xn in enumerate(xcols):
                        v[0 if xn == "Intercept" else zpos[(c, t_)]] += beta[c]
                    mu_t = Zw @ v
                    for s in range(P):
                        if s == t_:
                            continue
                        D = np.where(prep.slot == s, mu_t[rowid], 0.0)
                        ents.append(_Entry("yy", (s, t_), self.ysl[s], "~", self.ysl[t_], -1, 0.0, D, v))
            elif yy:
                self.notes.append("regressions of an outcome slot on another not tested")
            # regressions of a covariate on an outcome (lavaan's joint model of y and x)
            if yy and not slopes and P + nz - 1 <= self.MAX_JOINT:
                for j in range(1, nz):
                    for t_ in range(P):
                        ents.append(_Entry("xy", (j, t_), znames[j], "~", self.ysl[t_], -1, 0.0))
            elif yy:
                self.notes.append("regressions of a covariate on an outcome not tested "
                                  f"(joint model of {P + nz - 1} variables > {self.MAX_JOINT})")
        self.ents = ents
        self.nmean = sum(e.D is not None for e in ents)
        self.rho0 = np.array([e.value for e in ents])
        self.K = np.zeros((len(ents), t.nparams))
        for i, e in enumerate(ents):
            if e.group >= 0:
                self.K[i, e.group] = 1.0
        self.Dm = np.column_stack([e.D for e in ents if e.D is not None]) if self.nmean else np.zeros((prep.nobs, 0))
        self._mean_idx = np.array([i for i, e in enumerate(ents) if e.D is not None], dtype=int)
        self._cov_idx = np.array([i for i, e in enumerate(ents) if e.kind in ("phi", "theta", "load", "yy")],
                                 dtype=int)
        # expected information of the mean coordinates, lavaan's convention
        # (fixed.x, missing = "ml"): the expectation over the covariates uses
        # their moments over all top-level units, M2 = sum_r w_r z_r z_r' /
        # sum_r w_r; a mean coordinate moves slot s_a's mean by z' v_a, so
        # E[D_a' Si D_b] = Si[s_a, s_b] v_a' M2 v_b.
        wr = prep.wrow
        M2 = (Zw * wr[:, None]).T @ Zw / wr.sum()
        V = np.column_stack([ents[i].v for i in self._mean_idx]) if self.nmean else np.zeros((nz, 0))
        self.MM = V.T @ M2 @ V
        self._mslot = np.array([ents[i].key[0] if ents[i].kind == "yy" else ents[i].key[1]
                                for i in self._mean_idx], dtype=int)
        self._slopes = slopes
        self.psi = psi

    # matrices at a point of the extended space
    def _mats(self, rho):
        m, prep = self.model, self.prep
        Phi = np.zeros((m.M, m.M))
        Th = np.zeros((m.P, m.P))
        lam = {}
        for i in self._cov_idx:
            e = self.ents[i]
            if e.kind == "phi":
                Phi[e.key] = Phi[e.key[::-1]] = rho[i]
            elif e.kind == "theta":
                Th[e.key] = Th[e.key[::-1]] = rho[i]
            elif e.kind == "load":
                lam[e.key] = (i, rho[i] - e.value)
        resid = prep.y - self.Dm @ rho[self._mean_idx]
        return Phi, Th, lam, resid

    def _pattern_lambda(self, p, lam):
        prep = self.prep
        r0 = int(prep.pat_ptr[p])
        o0, o1 = prep.row_ptr[r0], prep.row_ptr[r0 + 1]
        s = prep.slot[o0:o1]
        n = len(s)
        L = np.zeros((n, self.model.M))
        for k in range(prep.slot_lat.shape[1]):
            g = prep.slot_lat[s, k]
            ok = g >= 0
            L[np.flatnonzero(ok), g[ok]] += prep.load[o0:o1, k][ok]
        for (sl, k, g), (_, dv) in lam.items():
            pos = np.flatnonzero(s == sl)
            if len(pos) and dv != 0.0:
                L[pos[0], g] += dv
        return s, L

    def _dsigma(self, s, L, Phi, lam, Sfull):
        """dSigma_o / d(each covariance coordinate), (ncov, n, n)."""
        n = len(s)
        out = np.zeros((len(self._cov_idx), n, n))
        pos = {int(v): i for i, v in enumerate(s)}
        LP = L @ Phi
        for j, i in enumerate(self._cov_idx):
            e = self.ents[i]
            if e.kind == "phi":
                a, b = e.key
                d = np.outer(L[:, a], L[:, b])
                out[j] = d + d.T if a != b else d
            elif e.kind == "theta":
                a, b = e.key
                if a in pos and b in pos:
                    out[j, pos[a], pos[b]] = 1.0
                    out[j, pos[b], pos[a]] = 1.0
            elif e.kind == "load":
                sl, k, g = e.key
                if sl in pos:
                    t = pos[sl]
                    out[j, t, :] += LP[:, g]
                    out[j, :, t] += LP[:, g]
            else:                                  # yy: E_st Sigma + Sigma E_ts
                sl, tl = e.key
                if sl in pos:
                    t = pos[sl]
                    out[j, t, :] += Sfull[tl, s]
                    out[j, :, t] += Sfull[tl, s]
        return out

    def gradient_information(self, rho, information="expected"):
        """(gradient, information) in the extended space at rho."""
        prep = self.prep
        Phi, Th, lam, resid = self._mats(rho)
        wrow = prep.wrow
        n_e = len(self.ents)
        g = np.zeros(n_e)
        I = np.zeros((n_e, n_e))
        Icc = np.zeros((len(self._cov_idx), len(self._cov_idx)))
        Imm = np.zeros((len(self._mean_idx), len(self._mean_idx)))
        wobs = np.zeros(prep.nobs)
        mi, ci = self._mean_idx, self._cov_idx
        Sfull = None
        if not self._slopes:
            Lf = np.zeros((self.model.P, self.model.M))
            for k in range(prep.slot_lat.shape[1]):
                gk = prep.slot_lat[:, k]
                ok = gk >= 0
                Lf[np.flatnonzero(ok), gk[ok]] = 1.0
            Sfull = Lf @ Phi @ Lf.T + Th
        for p in range(prep.npatterns):
            r0, r1 = int(prep.pat_ptr[p]), int(prep.pat_ptr[p + 1])
            s, L = self._pattern_lambda(p, lam)
            n = len(s)
            S = L @ Phi @ L.T + Th[np.ix_(s, s)]
            try:
                Si = np.linalg.inv(S)
            except np.linalg.LinAlgError:
                raise MlsemError("score_tests: Sigma is singular at the estimates") from None
            o0, o1 = prep.row_ptr[r0], prep.row_ptr[r1]
            E = resid[o0:o1].reshape(r1 - r0, n)
            wr = wrow[r0:r1]
            Wm = E @ Si                                        # rows: Sigma^-1 e_r
            wobs[o0:o1] = (Wm * wr[:, None]).ravel()
            nw = wr.sum()
            W = (Wm * wr[:, None]).T @ Wm
            dS = self._dsigma(s, L, Phi, lam, Sfull)
            G = 0.5 * (W - nw * Si)
            g[ci] += np.einsum("ij,aij->a", G, dS)
            if information == "expected":
                # 1/2 tr(Si dS_a Si dS_b) = 1/2 vec(Ma) . vec(Mb'), Ma = Si dS_a
                act = np.flatnonzero(np.abs(dS).reshape(len(ci), -1).max(axis=1) > 0)
                Ma = np.matmul(Si[None, :, :], dS[act])
                Icc[np.ix_(act, act)] += 0.5 * nw * (Ma.reshape(len(act), -1)
                                                     @ Ma.transpose(0, 2, 1).reshape(len(act), -1).T)
                if len(mi):
                    # nw E_x[D' Si D]: Si[s_a, s_b] M2[z_a, z_b] over the pattern's slots
                    loc = np.full(self.model.P, -1)
                    loc[s] = np.arange(n)
                    act = np.flatnonzero(loc[self._mslot] >= 0)
                    la = loc[self._mslot[act]]
                    Imm[np.ix_(act, act)] += nw * Si[np.ix_(la, la)] * self.MM[np.ix_(act, act)]
        if len(mi):
            g[mi] += self.Dm.T @ wobs
        if information == "expected":
            I[np.ix_(ci, ci)] += Icc
            I[np.ix_(mi, mi)] += Imm
            self._joint_xy(g, I)
        return g, I

    def _joint_xy(self, g, I):
        """Gradient and information rows of the covariate-on-outcome
        coordinates, in lavaan's joint model of v = (y wide, x wide) with the
        covariates' moments fixed at their sample values (fixed.x):
        v = alpha + B v + zeta, Cov(zeta) = Psi = diag(Sigma_y, S_xx),
        mu_v = A alpha, Sigma_v = A Psi A', A = (I - B)^-1 = I + B at the
        estimates.  A coordinate moving (alpha, B, Psi) by (da, dB, dPsi) moves
        mu_v by A (dB mu_v + da) and Sigma_v by A dB Sigma_v + (.)' + A dPsi A'.
        For the other coordinates this joint information equals the
        conditional one used above (the covariates' marginal does not involve
        them); only the rows of the new coordinates are computed here."""
        ents = self.ents
        xy = [i for i, e in enumerate(ents) if e.kind == "xy"]
        if not xy:
            return
        m, prep = self.model, self.prep
        P = m.P
        C = [i for i, e in enumerate(ents) if e.group >= 0] + xy
        Zw, wr = self.Zw, prep.wrow
        nx = Zw.shape[1] - 1
        Jn = P + nx
        beta, Phi, Theta = m.matrices(self.psi)
        Th = Theta if Theta.ndim == 2 else np.diag(Theta)
        Lf = np.zeros((P, m.M))
        for k in range(prep.slot_lat.shape[1]):
            gk = prep.slot_lat[:, k]
            ok = gk >= 0
            Lf[np.flatnonzero(ok), gk[ok]] = 1.0
        Sy = Lf @ Phi @ Lf.T + Th
        X = Zw[:, 1:]
        mx = wr @ X / wr.sum()
        Sxx = ((X - mx) * wr[:, None]).T @ (X - mx) / wr.sum()
        B = np.zeros((Jn, Jn))
        alpha = np.zeros(Jn)
        for c, xn in enumerate(self.xcols):
            for s_ in range(P):
                if xn == "Intercept":
                    alpha[s_] += beta[c]
                else:
                    B[s_, P + self.zpos[(c, s_)] - 1] = beta[c]
        alpha[P:] = mx
        Psi = np.zeros((Jn, Jn))
        Psi[:P, :P] = Sy
        Psi[P:, P:] = Sxx
        A = np.eye(Jn) + B
        Sv = A @ Psi @ A.T
        mu = A @ alpha
        covpos = {int(i): j for j, i in enumerate(self._cov_idx)}
        dSy_all = self._dsigma(np.arange(P), Lf, Phi, {}, Sy)
        nC = len(C)
        dmu = np.zeros((nC, Jn))
        dS = np.zeros((nC, Jn, Jn))
        for a, i in enumerate(C):
            e = ents[i]
            dB = np.zeros((Jn, Jn))
            da = np.zeros(Jn)
            dPsi = None
            if e.kind == "mean":
                jz = int(np.flatnonzero(e.v)[0])
                if jz == 0:
                    da[e.key[1]] = 1.0
                else:
                    dB[e.key[1], P + jz - 1] = 1.0
            elif e.kind in ("phi", "theta"):
                dPsi = np.zeros((Jn, Jn))
                dPsi[:P, :P] = dSy_all[covpos[i]]
            elif e.kind == "xy":
                jz, t_ = e.key
                dB[P + jz - 1, t_] = 1.0
            else:
                raise MlsemError(f"internal: joint derivative of a {e.kind} coordinate")
            dmu[a] = A @ (dB @ mu + da)
            T = A @ dB @ Sv
            dS[a] = T + T.T
            if dPsi is not None:
                dS[a] += A @ dPsi @ A.T
        rowid = np.repeat(np.arange(prep.nrows), np.diff(prep.row_ptr))
        Y = np.zeros((prep.nrows, P))
        Y[rowid, prep.slot] = prep.y
        Vd = np.hstack([Y, X]) - mu
        Ij = np.zeros((nC, nC))
        gj = np.zeros(nC)
        for p in range(prep.npatterns):
            r0, r1 = int(prep.pat_ptr[p]), int(prep.pat_ptr[p + 1])
            o0 = prep.row_ptr[r0]
            so = prep.slot[o0:prep.row_ptr[r0 + 1]]
            Jo = np.concatenate([so, np.arange(P, Jn)])
            Si = np.linalg.inv(Sv[np.ix_(Jo, Jo)])
            w = wr[r0:r1]
            nw = w.sum()
            R = Vd[r0:r1][:, Jo]
            Wr = R @ Si
            Wd = (Wr * w[:, None]).T @ Wr
            dSo = dS[:, Jo][:, :, Jo]
            dmo = dmu[:, Jo]
            gj += dmo @ (Si @ (R * w[:, None]).sum(axis=0)) + 0.5 * np.einsum(
                "ij,aij->a", Wd - nw * Si, dSo)
            # lavaan (fixed.x) drops the covariates' own moments from the
            # information: zero the x-only parts of the derivatives
            no = len(so)
            dmo = dmo.copy()
            dmo[:, no:] = 0.0
            dSo = dSo.copy()
            dSo[:, no:, no:] = 0.0
            Ma = np.matmul(Si[None, :, :], dSo)
            Ij += nw * (dmo @ Si @ dmo.T + 0.5 * (Ma.reshape(nC, -1)
                                                  @ Ma.transpose(0, 2, 1).reshape(nC, -1).T))
        nr = len(C) - len(xy)
        g[xy] = gj[nr:]
        I[np.ix_(xy, C)] = Ij[nr:, :]
        I[np.ix_(C, xy)] = Ij[:, nr:]

    def information_observed(self, rho, step=1e-5):
        n = len(rho)
        H = np.zeros((n, n))
        for i in range(n):
            h = step * max(abs(rho[i]), 0.1)
            up, dn = rho.copy(), rho.copy()
            up[i] += h
            dn[i] -= h
            g1, _ = self.gradient_information(up, "none")
            g2, _ = self.gradient_information(dn, "none")
            H[:, i] = (g1 - g2) / (2 * h)
        return -0.5 * (H + H.T)
