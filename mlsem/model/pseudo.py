"""Model layer: pseudo-likelihood with sampling weights at every level.

Pfeffermann et al. (1998), Rabe-Hesketh & Skrondal (2006); DESIGN.md section 8.
With levels 0 (top) .. L-1 and observations below, conditional weights w at
every level and the path latents eta = (eta_0, .., eta_{L-1}) of an
observation (eta_d ~ N(0, Phi_d), e_d of them: the random effects of level d),

    l_unit(eta_anc) = log int N(eta_own; 0, Phi_d) exp(sum_child w_child l_child(eta_anc, eta_own)) d eta_own

with the observations' terms log f_i = -1/2 [log 2 pi theta + (r_i - z_i' eta)^2 / theta],
r_i = y_i - x_i' beta, at the bottom, and the objective sum_k w_k l_k.  Every
l is a quadratic c + a' eta - 1/2 eta' B eta in its ancestors' latents, so each
level is one Gaussian integral per unit in closed form, through the factor F of
Phi_d (Phi_d = F F', K = I + F' B_oo F, T = F K^-1 F'; no inverse of Phi_d):

    c' = c + 1/2 a~' K^-1 a~ - 1/2 log|K|,     a~ = F' a_o
    a_p' = a_p - B_po T a_o,                    B_pp' = B_pp - B_po T B_op

then multiplied by the unit's weight and summed into its parent.  O(rows)
per evaluation (units are runs of consecutive observations: np.add.reduceat).

The gradient is the expectation of the integrand's gradient under the nested
tilted posteriors, which are Gaussian: top-down, a unit's own latents given
its ancestors' are N(T (a_o - B_op eta_p), T), so the path (mu, Sigma) of every
unit follows from its parent's; then

    dl/dPhi_d   += W/2 (g g' + H Sigma_p H' - (B_oo - B_oo T B_oo)),
                   g = (I - B_oo T)(a_o - B_op mu_p), H = -(I - B_oo T) B_op
    dl/dtheta   += W w_i (-1/(2 theta) + ((r_i - z_i' mu)^2 + z_i' Sigma z_i) / (2 theta^2))
    dl/dbeta    += W w_i x_i (r_i - z_i' mu) / theta

with W the product of the weights of the unit's ancestors below the top (the
top weight multiplies a whole top unit's score).  Integer weights give exactly
the log-likelihood of the data with every weighted unit replicated.

``PseudoModel`` is a ``Model`` whose evaluation is this computation; it is used
only when a level below the top carries weights (top-level weights alone are
the kernel's row weights).  Nested random intercepts (one per level, loadings
1) run on the compiled kernel (``_core.pseudo_intercepts``: 2.6 ms per
evaluation on the 115,699 rows of ``medium``); random slopes and levels
without an effect run here, in NumPy vectorised over units (~20 ms there), and
this NumPy code is the kernel's oracle in the tests.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import MlsemError
from . import multilevel as _ml
from .multilevel import Model

LOG2PI = math.log(2.0 * math.pi)


def _inv_small(K):
    """Batched inverse and log-determinant of positive definite (n, e, e) K,
    or None if one is not positive definite."""
    e = K.shape[-1]
    if e == 1:
        k = K[:, 0, 0]
        if not np.all(k > 0):
            return None
        return (1.0 / k)[:, None, None], np.log(k)
    try:
        C = np.linalg.cholesky(K)
    except np.linalg.LinAlgError:
        return None
    logdet = 2.0 * np.sum(np.log(np.diagonal(C, axis1=1, axis2=2)), axis=1)
    Ci = np.linalg.inv(C)
    return np.einsum("nki,nkj->nij", Ci, Ci), logdet


class Hierarchy:
    """Units of every level as runs of the model's observations (CSR order), and
    the conditional weights of each level's units and of the observations.

    ``starts[d]``: first observation of each unit of level d; ``parent[d]`` (d >= 1):
    the level-(d-1) unit of each unit of level d; ``w[d]``: the units' weights
    (level L: the observations'); ``top_of[d]``: the top unit of each unit."""

    def __init__(self, prep, weights):
        nobs = prep.nobs
        frame = prep.meta.get("frame")
        if frame is None:
            raise MlsemError("internal: the prepared data carry no id frame")
        L = len(prep.levels)
        brk = np.ones(nobs, dtype=bool)
        rid = frame["__rowid"].to_numpy()
        brk[1:] = rid[1:] != rid[:-1]
        self.starts, self.parent, self.top_of = [], [], []
        prev_code = None
        for d in range(L):
            if d >= 1:
                lab = frame[f"__lab{d}"].to_numpy()
                brk[1:] |= lab[1:] != lab[:-1]
            st = np.flatnonzero(brk)
            code = np.cumsum(brk) - 1            # unit of level d of each observation
            self.starts.append(st)
            self.top_of.append(rid[st])
            self.parent.append(None if prev_code is None else prev_code[st])
            prev_code = code
        self.obs_unit = prev_code                 # lowest-level unit of each observation
        self.L = L
        self.w = [None if weights[d] is None else np.asarray(weights[d], dtype=float)
                  for d in range(L + 1)]
        for d in range(L):
            if self.w[d] is not None and self.w[d].shape[0] != len(self.starts[d]):
                raise MlsemError("internal: level weights do not match the units")
        self.nunits = [len(s) for s in self.starts]


class PseudoModel(Model):
    """Pseudo-likelihood with weights below the top (see the module docstring)."""

    def __init__(self, prep, table, weights, backend="auto", nthreads=None):
        super().__init__(prep, table, backend=backend, nthreads=nthreads)
        if self.dense:
            raise MlsemError("survey weights below the top level need a diagonal residual "
                             "covariance (no residual correlations or structures)")
        th = np.unique(np.asarray(table.theta_param))
        if len(th) != 1:
            raise MlsemError("survey weights below the top level need one residual variance "
                             "(no residuals= relaxation)")
        self.theta_param = int(th[0])
        self.hess_params = np.zeros(0, dtype=np.int64)      # Hessian by differences
        self.H = Hierarchy(prep, weights)
        L = self.H.L
        # latents per level: the loadings' columns are ordered by level, then effect
        nl = prep.slot_lat.shape[1]
        terms = []
        for g in range(prep.nlatent):
            terms.append(prep.latent_term[g][0])
        self.e = []
        col = 0
        s0 = 0
        self.lat = []
        for d in range(L):
            lats = [g for g in prep.slot_lat[s0, :nl] if g >= 0 and terms[g] == d]
            self.e.append(len(lats))
            self.lat.append(np.array(lats, dtype=np.int64))
            col += len(lats)
        self.D = col
        self.off = np.concatenate([[0], np.cumsum(self.e)]).astype(int)
        self.Z = np.ascontiguousarray(prep.load[:, :self.D]) if self.D else np.zeros((prep.nobs, 0))
        self._unit = bool(np.all(self.Z == 1.0))
        if np.any(prep.slot_lat[prep.slot][:, :self.D] < 0):
            raise MlsemError("survey weights below the top level: every observation must "
                             "load on its units' random effects (nested models only)")
        # parameter index of each entry of Phi_d (-1: fixed)
        self.pidx = []
        pmap = {}
        for r, c, p in zip(table.phi_row, table.phi_col, table.phi_param):
            pmap[(int(r), int(c))] = int(p)
        for d in range(L):
            e = self.e[d]
            P_ = np.full((e, e), -1, dtype=np.int64)
            for i in range(e):
                for j in range(e):
                    P_[i, j] = pmap.get((int(self.lat[d][i]), int(self.lat[d][j])), -1)
            self.pidx.append(P_)
        self.ntop = self.H.nunits[0]
        # nested random intercepts on the compiled kernel (_core.pseudo_intercepts); this
        # module's NumPy code is then its oracle (and computes the per-unit scores)
        core = _ml._core
        self._fast = (self.backend == "cython" and core is not None
                      and hasattr(core, "pseudo_intercepts") and self._unit
                      and all(e == 1 for e in self.e))
        if self._fast:
            H = self.H
            self._obs_ptr = [np.ascontiguousarray(np.r_[H.starts[L - 1], prep.nobs], dtype=np.int64)]
            self._child_ptr = [None]
            for d in range(1, L):
                par = H.parent[d]
                runs = np.flatnonzero(np.r_[True, par[1:] != par[:-1]])
                self._child_ptr.append(np.ascontiguousarray(np.r_[runs, len(par)], dtype=np.int64))
            self._wlev = [np.ascontiguousarray(H.w[d] if H.w[d] is not None else np.ones(H.nunits[d]))
                          for d in range(L)]
            self._wobs = np.ascontiguousarray(H.w[L] if H.w[L] is not None else np.ones(prep.nobs))
            self._v = np.zeros(prep.nobs)
            self._gl = np.zeros(L)

    # the objective ---------------------------------------------------------
    def evaluate(self, psi, need_grad: bool = True):
        self.nevals += 1
        if self._fast:
            return self._evaluate_kernel(psi)
        out = self.pseudo(psi, need_grad, scores=False)
        if out is None:
            return None, None
        return out[0], (out[1] if need_grad else None)

    def phi_hessian(self, psi):
        return None

    def _evaluate_kernel(self, psi):
        """(ll, dl/dpsi) from _core.pseudo_intercepts (random intercepts, unit loadings)."""
        beta, Phi, Theta = self.matrices(psi)
        theta = float(Theta[0])
        phis = np.array([Phi[self.lat[d][0], self.lat[d][0]] for d in range(self.H.L)])
        if not theta > 0 or np.any(phis < 0):
            return None, None
        r = self.prep.y - self._X @ beta if self.q else self.prep.y.copy()
        out = _ml._core.pseudo_intercepts(np.ascontiguousarray(r), self._wobs, self._obs_ptr,
                                          self._child_ptr, self._wlev, np.sqrt(phis), theta,
                                          self._v, self._gl)
        if out is None or not np.isfinite(out[0]):
            return None, None
        ll, gth = out
        g = np.zeros(self.table.nparams)
        if self.q:
            np.add.at(g, np.asarray(self.table.beta_param), self._X.T @ self._v)
        g[self.theta_param] += gth
        for d in range(self.H.L):
            p = self.pidx[d][0, 0]
            if p >= 0:
                g[p] += self._gl[d]
        return float(ll), g

    def unit_scores(self, psi):
        """Per top-level unit score dl_k/dpsi (not multiplied by the top weight),
        (ntop, nparams), rows in the order of ``prep.top_ids``."""
        out = self.pseudo(psi, True, scores=True)
        if out is None:
            raise MlsemError("scores: Sigma is not positive definite at the estimates")
        return out[2]

    def unit_loglik(self, psi):
        """log L_k per top-level unit (unweighted by the top weight)."""
        out = self.pseudo(psi, False, scores=False, per_unit=True)
        if out is None:
            raise MlsemError("the pseudo-likelihood is not defined at psi")
        return out

    def pseudo(self, psi, need_grad=True, scores=False, per_unit=False):
        H = self.H
        L = H.L
        beta, Phi, Theta = self.matrices(psi)
        theta = float(Theta[0])
        if not theta > 0:
            return None
        F = self.factor(Phi)
        if F is None:
            return None
        r = self.prep.y - self.prep.X @ beta if self.q else self.prep.y.copy()
        Z = self.Z
        D = self.D
        wobs = H.w[L]
        wi = np.ones(len(r)) if wobs is None else wobs
        # leaves: the lowest level's units, over the whole path
        st = H.starts[L - 1]
        c = np.add.reduceat(wi * (-0.5 * (LOG2PI + math.log(theta)) - 0.5 * r * r / theta), st)
        if self._unit and D:
            # random intercepts: every loading 1, a = (sum w r / theta) 1, B = (sum w / theta) 1 1'
            a = np.repeat(np.add.reduceat(wi * r, st)[:, None] / theta, D, axis=1)
            B = np.repeat(np.repeat((np.add.reduceat(wi, st) / theta)[:, None, None], D, axis=1), D, axis=2)
        else:
            a = np.add.reduceat((wi * r / theta)[:, None] * Z, st, axis=0) if D else np.zeros((len(st), 0))
            B = (np.add.reduceat((wi / theta)[:, None, None] * Z[:, :, None] * Z[:, None, :], st, axis=0)
                 if D else np.zeros((len(st), 0, 0)))
        saved = [None] * L
        for d in range(L - 1, -1, -1):
            e, p0 = self.e[d], self.off[d]
            if e:
                Fd = F[np.ix_(self.lat[d], self.lat[d])]
                ao = a[:, p0:p0 + e]
                Boo = B[:, p0:p0 + e, p0:p0 + e]
                Bpo = B[:, :p0, p0:p0 + e]
                at = ao @ Fd                                        # F' a_o
                K = np.einsum("ki,nkl,lj->nij", Fd, Boo, Fd)
                K[:, np.arange(e), np.arange(e)] += 1.0
                inv = _inv_small(K)
                if inv is None:
                    return None
                Ki, logdetK = inv
                c = c + 0.5 * np.einsum("ni,nij,nj->n", at, Ki, at) - 0.5 * logdetK
                T = np.einsum("ik,nkl,jl->nij", Fd, Ki, Fd)         # F K^-1 F'
                if p0:
                    Ta = np.einsum("nij,nj->ni", T, ao)
                    a = a[:, :p0] - np.einsum("npo,no->np", Bpo, Ta)
                    B = B[:, :p0, :p0] - np.einsum("npo,noq,nrq->npr", Bpo, T, Bpo)
                else:
                    a = a[:, :0]
                    B = B[:, :0, :0]
                saved[d] = (ao, Boo, Bpo, T)
            if d == 0:
                break
            wd = H.w[d]
            cw, aw, Bw = (c, a, B) if wd is None else (wd * c, wd[:, None] * a, wd[:, None, None] * B)
            # units of level d are consecutive runs within their parent's
            pst = np.flatnonzero(np.r_[True, H.parent[d][1:] != H.parent[d][:-1]])
            c = np.add.reduceat(cw, pst)
            a = np.add.reduceat(aw, pst, axis=0)
            B = np.add.reduceat(Bw, pst, axis=0)
        w0 = H.w[0]
        if per_unit:
            return c
        ll = float(c.sum() if w0 is None else (w0 * c).sum())
        if not np.isfinite(ll):
            return None
        if not need_grad:
            return ll, None, None
        # top-down: the path posterior (mu, Sigma) of every unit; scores per top unit
        npar = self.table.nparams
        S = np.zeros((self.ntop, npar))
        mu = np.zeros((self.ntop, 0))
        Sig = np.zeros((self.ntop, 0, 0))
        W = np.ones(self.ntop)              # product of the weights below the top
        for d in range(L):
            if d >= 1:
                par = H.parent[d]
                mu, Sig = mu[par], Sig[par]
                W = W[par] * (1.0 if H.w[d] is None else H.w[d])
            e, p0 = self.e[d], self.off[d]
            if not e:
                continue
            ao, Boo, Bpo, T = saved[d]
            n = T.shape[0]
            I_BT = np.broadcast_to(np.eye(e), (n, e, e)) - np.einsum("nij,njk->nik", Boo, T)
            if p0:
                lin = ao - np.einsum("npo,np->no", Bpo, mu)
            else:
                lin = ao
            g = np.einsum("nij,nj->ni", I_BT, lin)
            G = Boo - np.einsum("nij,njk,nkl->nil", Boo, T, Boo)
            dPhi = np.einsum("ni,nj->nij", g, g) - G
            if p0:
                Hm = -np.einsum("nij,npj->nip", I_BT, Bpo)          # e x p
                dPhi += np.einsum("nip,npq,njq->nij", Hm, Sig, Hm)
            dPhi *= 0.5 * W[:, None, None]
            top = H.top_of[d]
            P_ = self.pidx[d]
            for i in range(e):
                for j in range(e):
                    if P_[i, j] >= 0:
                        S[:, P_[i, j]] += np.bincount(top, weights=dPhi[:, i, j], minlength=self.ntop)
            # own latents' posterior given the ancestors
            m_own = np.einsum("nij,nj->ni", T, lin)
            if p0:
                TBo = np.einsum("nij,npj->nip", T, Bpo)              # T B_op: e x p
                cross = -np.einsum("npq,niq->npi", Sig, TBo)        # Cov(eta_p, own)
                own = T + np.einsum("nip,npq,njq->nij", TBo, Sig, TBo)
                newS = np.empty((n, p0 + e, p0 + e))
                newS[:, :p0, :p0] = Sig
                newS[:, :p0, p0:] = cross
                newS[:, p0:, :p0] = np.transpose(cross, (0, 2, 1))
                newS[:, p0:, p0:] = own
                Sig = newS
                mu = np.concatenate([mu, m_own], axis=1)
            else:
                Sig, mu = T.copy(), m_own
        # observations
        u = H.obs_unit
        if self._unit and D:
            # z = 1: z' mu and z' Sigma z are per-unit scalars
            fit = r - mu.sum(axis=1)[u]
            zsz = Sig.sum(axis=(1, 2))[u]
        elif D:
            fit = r - np.einsum("ni,ni->n", Z, mu[u])
            zsz = np.einsum("ni,nij,nj->n", Z, Sig[u], Z)
        else:
            fit, zsz = r, 0.0
        Wo = W[u] * wi
        # the observations are sorted by top unit: sums per top unit by runs
        st0 = H.starts[0]
        gth = Wo * (-0.5 / theta + 0.5 * (fit * fit + zsz) / theta ** 2)
        S[:, self.theta_param] += np.add.reduceat(gth, st0)
        if self.q:
            gx = np.add.reduceat((Wo * fit / theta)[:, None] * self.prep.X, st0, axis=0)
            np.add.at(S, (slice(None), np.asarray(self.table.beta_param)), gx)
        g = S.sum(axis=0) if w0 is None else w0 @ S
        return ll, g, (S if scores else None)
