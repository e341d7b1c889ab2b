"""Model layer, several outcomes (issue 15): the whole exact Hessian of grouped random
intercepts at two nested levels in one pass.

On the grouped data of several outcomes (:class:`mlsem.model.mreduced.MultiReduced`:
per county r, pseudo-units u = (school, set S_u of observed outcomes) whose cells load
l_u = sqrt(n_u) on the latents), the county's covariance matrix is

    Sigma = blockdiag_j Sigma_j + A Gam A',
    Sigma_j = B_j Tau B_j' + blockdiag_{u in j} R[S_u, S_u],

A (B_j) stacking the rows l_u e_o' of the county's (school j's) cells (u, o): Gam, Tau
and R the nout x nout covariances across outcomes at the county, school and residual
level.  A school has at most nout 2^(nout-1) cells, so Sigma_j is dense and small; the
county's effect is integrated out in closed form (Woodbury with nout x nout blocks).
With e_j the school's residuals, Y_j = Sigma_j^-1, w_j = Y_j e_j,

    s_j = -1/2 (log|Sigma_j| + e_j' w_j),  M = sum_j A_j' Y_j A_j,  a = sum_j A_j' w_j,
    l = sum_j s_j + F(Gam, M, a) - n/2 log 2 pi,
    F = 1/2 a' C a - 1/2 log|I + L' M L|,   Gam = L L',  C = (Gam^-1 + M)^-1 = L K^-1 L'

(F is the log of E exp(a'u - u'Mu/2) over the county effect u ~ N(0, Gam)).  With
m = C a, N = I - C M, b = N' a, Mt = M N, Psi = C + m m' and directions E (a symmetric
entry of a matrix):

    F_a = m, F_M[E] = -1/2 tr(E Psi), F_Gam[E] = 1/2 b'E b - 1/2 tr(E Mt),
    F_aa = C, F_aM[E] = -C E m, F_MM[E1, E2] = 1/2 tr(C E1 C E2) + m'E1 C E2 m,
    F_GamGam[E1, E2] = 1/2 tr(E1 Mt E2 Mt) - b'E1 Mt E2 b,
    F_Gama[E] = N E b, F_GamM[E1, E2] = -b'E1 N'E2 m - 1/2 tr(E1 N'E2 N).

The school-level arguments theta (entries of Tau and R, the coefficients) enter s_j,
M_j, a_j only, with the dense textbook derivatives (Sigma_i = dSigma_j/dtheta_i):
ds = -1/2 tr(Y Sigma_i) + 1/2 w'Sigma_i w, d2s = 1/2 tr(Y Sigma_i Y Sigma_k) -
w'Sigma_i Y Sigma_k w; dM = -H'Sigma_i H (H = Y A), d2M = H'Sigma_i Y Sigma_k H + (i <-> k);
da = -H'Sigma_i w, d2a = H'Sigma_i Y Sigma_k w + (i <-> k), d2a/dtheta_i dbeta =
H'Sigma_i Y X; ds/dbeta = X'w, d2s/dbeta2 = -X'YX, da/dbeta = -H'X.  The chain rule
through F (the county sums of dM, da, the contractions F_M . d2M and F_a . d2a made per
school with the county's m and Psi in a second pass) gives the whole Hessian in (Gam,
Tau, R, beta): O(cells (nout^3 + q^2)) per evaluation, the kernel ``_core.mri2_eval``;
its dense oracle is ``_oracle.mri2_dense``.  The within-school part of the grouped data
(:meth:`MultiReduced.within`: -1/2 [n log|R_S| + tr(R_S^-1 W_S(beta))] per outcome set S)
adds its closed-form derivatives (Q = R_S^-1, P_E = Q E Q):

    d/dR[E] = -n/2 tr(QE) + 1/2 tr(P_E W),
    d2/dR[E1]dR[E2] = n/2 tr(QE1QE2) - 1/2 tr(QE1QE2QW) - 1/2 tr(QE2QE1QW),
    d2/dbeta_a dbeta_b' = -Q_ab C_ab[x, x],  d2/dR[E]dbeta_a = -sum_b (P_E)_ab (C_ab g_b)[x]

(g_b = (1, -beta_b), C_ab the pooled within cross products of [y, X]).  Arguments map to
parameters through the table (an entry fixed at 0, as with ``"independent"``, maps to
none).  ``build_exact(red)`` returns the evaluator, or (None, reason) where the structure
is not this one.
"""
from __future__ import annotations

import math

import numpy as np

from ._oracle import mri2_entries
from .multilevel import _core
from .multivariate import subset_inverses
from .ri2 import parameter_layout
from .unst import psd_step_limit

LOG2PI = math.log(2.0 * math.pi)
MAX_SCHOOL_CELLS = 64        # a school's cells (dense per school): above this, not this path


def why_not_exact(red) -> str | None:
    """None if :func:`build_exact` may apply to the grouped model ``red``."""
    from .mreduced import MultiReduced
    if not isinstance(red, MultiReduced):
        return "not the grouped data of several outcomes"
    if _core is None or not hasattr(_core, "mri2_eval") or red.backend != "cython":
        return "the compiled kernel is not in use"
    t = red.table
    if t.theta_func is not None:
        return "the residual covariance is a function of the parameters"
    if not red.full._unit_load:
        return "loadings other than 1"
    sl = np.asarray(red.prep.slot_lat)
    if sl.shape[1] > 2:
        return "more than two nested levels"
    return parameter_layout(t, red.q)


def _layout(red):
    """The kernel's arrays (cells sorted by county, school, pseudo-unit) and the map of
    its arguments to the parameters; or a string, why not."""
    t = red.table
    prep = red.prep
    nout = red.nout
    slot = np.asarray(red._slot, dtype=np.int64)
    n = len(slot)
    sl = np.asarray(prep.slot_lat)
    nl = sl.shape[1]
    cout = np.asarray(red._sout, dtype=np.int64)[slot]
    row_ptr = np.asarray(prep.row_ptr, dtype=np.int64)
    nrows = len(row_ptr) - 1
    row = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(row_ptr))
    lat = [sl[slot, c].astype(np.int64) for c in range(nl)]
    if any(np.any(x < 0) for x in lat):
        return "a cell without a latent at some level"
    if any(np.any(x % nout != cout) for x in lat):
        return "latents not laid out as (group, outcome)"
    node0 = lat[0] // nout
    same = row[1:] == row[:-1]
    if n and np.any(node0[1:][same] != node0[:-1][same]):
        return "the top level is not the grouped data's unit"
    load = np.asarray(prep.load, dtype=np.float64)
    if nl == 2:
        school = lat[1] // nout
        l1 = load[:, 1].copy()
    spup = np.asarray(red._spup, dtype=np.int64)[slot]
    newpu = np.ones(n, dtype=bool)
    newpu[1:] = (spup[1:] != spup[:-1]) | (row[1:] != row[:-1])
    if nl == 2:
        newpu[1:] |= school[1:] != school[:-1]
    pu = np.cumsum(newpu) - 1
    if nl == 1:
        school = pu
        l1 = np.zeros(n)
    # cells of a school consecutive (as the grouping writes them): no sort needed
    news = np.ones(n, dtype=bool)
    news[1:] = (row[1:] != row[:-1]) | (school[1:] != school[:-1])
    first = np.flatnonzero(news)
    key = row[first] * (int(school.max()) + 1) + school[first] if n else row[first]
    if nl == 1:
        again = False               # (school = pseudo-unit: consecutive by construction)
    elif n and int(key.max()) <= 8 * n + 1_000_000:
        again = np.bincount(key).max() > 1
    else:
        again = np.unique(key).size != key.size
    if again:
        order = np.lexsort((np.arange(n), school, row))
        row_s, school_s = row[order], school[order]
        news[1:] = (row_s[1:] != row_s[:-1]) | (school_s[1:] != school_s[:-1])
        first = np.flatnonzero(news)
    else:
        order = slice(None)
        row_s = row
    sch_ptr = np.append(first, n).astype(np.int64)
    if n and int(np.diff(sch_ptr).max()) > MAX_SCHOOL_CELLS:
        return f"a school of more than {MAX_SCHOOL_CELLS} cells"
    per_row = np.bincount(row_s[first], minlength=nrows)
    rptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(per_row, out=rptr[1:])
    # the arguments: entries of Gam, Tau, R (ent order), the coefficients (compact order)
    ent, _ = mri2_entries(nout)
    V = len(ent)
    eidx = {e: i for i, e in enumerate(ent)}
    q = red.q
    Z = 3 * V + q
    par = np.full(Z, -1, dtype=np.int64)
    M = int(red.M)
    level = np.full(M, -1, dtype=np.int64)      # 0: a top latent, 1: a lower one
    level[lat[0]] = 0
    if nl == 2:
        if np.any(level[lat[1]] == 0):
            return "a latent at two levels"
        level[lat[1]] = 1
    pr = np.asarray(t.phi_row, dtype=np.int64)
    pc = np.asarray(t.phi_col, dtype=np.int64)
    pp = np.asarray(t.phi_param, dtype=np.int64)
    lr, lc = level[pr], level[pc]
    used = (lr >= 0) | (lc >= 0)                # (latents no cell loads on do not matter)
    pr, pc, pp, lr, lc = pr[used], pc[used], pp[used], lr[used], lc[used]
    if np.any(lr != lc):
        return "a covariance across levels"
    if np.any(pr // nout != pc // nout):
        return "a covariance across groups"
    lo, hi = np.minimum(pr % nout, pc % nout), np.maximum(pr % nout, pc % nout)
    po = np.full((t.nparams, 2), -1, dtype=np.int64)
    for p_, ab in t.param_outcomes.items():
        po[p_] = sorted(ab)
    if np.any(po[pp, 0] != lo) or np.any(po[pp, 1] != hi):
        return "a (co)variance parameter not of its outcomes' entry"
    etab = np.full((nout, nout), -1, dtype=np.int64)
    for i, (a, b) in enumerate(ent):
        etab[a, b] = i
    z = lr * V + etab[lo, hi]
    if z.size:
        zs, first = np.unique(z, return_index=True)
        if np.any(pp != pp[first][np.searchsorted(zs, z)]):
            return "(co)variances that differ between groups of one level"
        par[zs] = pp[first]
    for r_, c_, p in zip(np.asarray(t.theta_row), np.asarray(t.theta_col),
                         np.asarray(t.theta_param)):
        ab = (min(int(r_), int(c_)), max(int(r_), int(c_)))
        z = 2 * V + eidx[ab]
        if par[z] not in (-1, int(p)):
            return "residual (co)variances that differ between entries"
        par[z] = int(p)
    xorder = np.asarray(red._xorder, dtype=np.int64)
    par[3 * V:] = np.asarray(t.beta_param, dtype=np.int64)[xorder]
    hit = np.bincount(par[par >= 0], minlength=t.nparams)
    if np.any(hit == 0):
        return "a parameter no argument of the kernel carries"
    return dict(
        rptr=rptr, sch_ptr=sch_ptr, cout=np.ascontiguousarray(cout[order], dtype=np.int32),
        cpu=np.ascontiguousarray(pu[order], dtype=np.int32),
        l0=np.ascontiguousarray(load[order, 0]), l1=np.ascontiguousarray(l1[order]),
        y=np.ascontiguousarray(np.asarray(prep.y, dtype=np.float64)[order]),
        Xc=np.ascontiguousarray(np.asarray(red._Xc, dtype=np.float64)[order]),
        wrow=np.ascontiguousarray(prep.wrow, dtype=np.float64), par=par, V=V, Z=Z,
        ea=np.array([a for a, _ in ent], dtype=np.int32),
        eb=np.array([b for _, b in ent], dtype=np.int32), nl=nl)


class ExactMulti:
    """ll, dl/dpsi and d2l/dpsi2 of a :class:`mlsem.model.mreduced.MultiReduced` of
    random intercepts at <= 2 nested levels from one kernel pass plus the within part
    (see the module).  Evaluations are counted on the grouped model (``red.nevals``)."""

    label = "mlsem.model.mri2"

    def __init__(self, red, lay):
        self.red = red
        self.__dict__.update({"_" + k: v for k, v in lay.items()})
        t = red.table
        nout, Z, V = red.nout, self._Z, self._V
        self.nout = nout
        J = np.zeros((Z, t.nparams))
        ok = self._par >= 0
        J[np.flatnonzero(ok), self._par[ok]] = 1.0
        self._J = J
        self._xoff = np.ascontiguousarray(red._xoff, dtype=np.int32)
        self._bz = np.arange(3 * V, Z)
        nt = red._nt
        self._ll = np.zeros(nt)
        self._g = np.zeros((nt, Z))
        self._h = np.zeros((nt, Z * Z))
        self._status = np.zeros(nt, dtype=np.int32)
        ent, dirs = mri2_entries(nout)
        self._dirs = np.array(dirs)
        # the within part per outcome set: its outcomes, its entries (local directions,
        # their argument index) and its coefficients' argument indices
        self._wparts = []
        xo = self._xoff
        for mask, cnt, C in zip(red._wmasks, red._wcount, red._wC):
            S = [o for o in range(nout) if (mask >> o) & 1]
            es = [(i, S.index(a), S.index(b)) for i, (a, b) in enumerate(ent) if a in S and b in S]
            E = np.zeros((len(es), len(S), len(S)))
            for k, (_, a, b) in enumerate(es):
                E[k, a, b] = E[k, b, a] = 1.0
            ez = np.array([2 * V + i for i, _, _ in es], dtype=np.int64)
            bz = [np.arange(3 * V + xo[o], 3 * V + xo[o + 1]) for o in S]
            self._wparts.append((mask, S, float(cnt), C, E, ez, bz))
        self._kx = red._Xc.shape[1]

    # ---- the covariance matrices -------------------------------------------------------
    def matrices(self, psi):
        V, nout = self._V, self.nout
        vals = np.where(self._par >= 0, psi[np.maximum(self._par, 0)], 0.0)
        out = []
        for k in range(3):
            Mk = np.zeros((nout, nout))
            Mk[self._ea, self._eb] = vals[k * V:(k + 1) * V]
            Mk[self._eb, self._ea] = vals[k * V:(k + 1) * V]
            out.append(Mk)
        return out[0], out[1], out[2], np.ascontiguousarray(vals[3 * V:])

    @staticmethod
    def _psd_factor(S):
        """A factor L (L L' = S) of a positive semi-definite S, or None."""
        try:
            return np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            pass
        lam, Q = np.linalg.eigh(S)
        if not np.all(np.isfinite(lam)) or lam[0] < -1e-12 * max(abs(lam[-1]), 1e-300):
            return None
        return np.ascontiguousarray(Q * np.sqrt(np.maximum(lam, 0.0)))

    def evaluate(self, psi, hess=True):
        """(ll, g, H) at psi (H None without ``hess``); None where psi is not admissible
        (Gam or Tau not positive semi-definite, R not positive definite)."""
        red = self.red
        red.nevals += 1
        psi = np.asarray(psi, dtype=float)
        Gam, Tau, R, beta = self.matrices(psi)
        LG = self._psd_factor(Gam)
        if LG is None or (self._nl == 2 and self._psd_factor(Tau) is None):
            return None
        sub = subset_inverses(R)
        if sub is None:
            return None
        if self._nl == 1:
            Tau = np.eye(self.nout)      # no school level: l1 = 0, Tau unused
        self._status[:] = 0
        self._ll[:] = 0.0
        self._g[:] = 0.0
        if hess:
            self._h[:] = 0.0
        _core.mri2_eval(self._rptr, self._sch_ptr, self._cout, self._cpu, self._l0, self._l1,
                        self._y, self._Xc, self._xoff, beta, self._ea, self._eb,
                        np.ascontiguousarray(LG), np.ascontiguousarray(Tau),
                        np.ascontiguousarray(R), self._wrow, self._ll, self._g, self._h,
                        self._status, red._nt, int(hess))
        if self._status.any():
            return None
        Z = self._Z
        ll = float(self._ll.sum())
        gz = self._g.sum(axis=0)
        Hz = self._h.sum(axis=0).reshape(Z, Z) if hess else None
        ll += self._within(beta, sub, gz, Hz)
        J = self._J
        g = J.T @ gz
        H = J.T @ (0.5 * (Hz + Hz.T)) @ J if hess else None
        return ll, g, H

    def _within(self, beta, sub, gz, Hz):
        """The within part (see the module) added to gz and Hz (arguments); its ll."""
        rinv, rlogdet = sub
        nout, xo = self.nout, self._xoff
        G = np.zeros((nout, 1 + self._kx))
        G[:, 0] = 1.0
        for o in range(nout):
            G[o, 1:1 + xo[o + 1] - xo[o]] = -beta[xo[o]:xo[o + 1]]
        ll = 0.0
        for mask, S, cnt, C, E, ez, bz in self._wparts:
            k = len(S)
            Q = rinv[mask, :k, :k]
            Gs = G[S]
            CG = np.einsum("aibj,bj->aib", C, Gs)          # C_ab g_b
            W = np.einsum("ai,aib->ab", Gs, CG)
            ll -= 0.5 * (cnt * (k * LOG2PI + rlogdet[mask]) + float(np.sum(Q * W)))
            QE = Q @ E                                      # (ne, k, k)
            P = QE @ Q                                      # Q E Q
            gz[ez] += -0.5 * cnt * np.trace(QE, axis1=1, axis2=2) + 0.5 * np.einsum(
                "eab,ab->e", P, W)
            gb = np.einsum("ab,aib->ai", Q, CG)            # dl/dbeta_a (row 1 + i)
            for a in range(k):
                gz[bz[a]] += gb[a, 1:1 + len(bz[a])]
            if Hz is None:
                continue
            QW = Q @ W
            t2 = np.einsum("iab,jba->ij", QE, QE)
            t3 = np.einsum("iab,jbc,ca->ij", QE, QE, QW)
            Hz[np.ix_(ez, ez)] += 0.5 * cnt * t2 - 0.5 * (t3 + t3.T)
            HRb = -np.einsum("eab,aib->eai", P, CG)         # (ne, k, 1 + kx)
            for a in range(k):
                na = len(bz[a])
                Hz[np.ix_(ez, bz[a])] += HRb[:, a, 1:1 + na]
                Hz[np.ix_(bz[a], ez)] += HRb[:, a, 1:1 + na].T
                for b in range(k):
                    nb = len(bz[b])
                    Hz[np.ix_(bz[a], bz[b])] -= Q[a, b] * C[a, 1:1 + na, b, 1:1 + nb]
        return ll

    def step_cap(self, psi, step):
        """The largest t <= 1 with Gam, Tau positive semi-definite and R positive
        definite at psi + t step, times 0.9 (at most 90% of the way to the boundary)."""
        t = np.inf
        now = self.matrices(psi)[:3]
        new = self.matrices(psi + step)[:3]
        for k, (S, S1) in enumerate(zip(now, new)):
            if k == 1 and self._nl == 1:
                continue
            t = min(t, psd_step_limit(S, S1 - S))
        return min(1.0, 0.9 * t)


def build_exact(red):
    """(ExactMulti, None) for the grouped model ``red``, or (None, reason)."""
    why = why_not_exact(red)
    if why is not None:
        return None, why
    lay = _layout(red)
    if isinstance(lay, str):
        return None, lay
    return ExactMulti(red, lay), None
