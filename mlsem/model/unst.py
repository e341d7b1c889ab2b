"""Model layer: the whole exact Hessian of grouped random intercepts whose latents
have a general covariance (unstructured, equal or listed covariances, with or
without the top-level effect; issue 14).

On the grouped data (:mod:`mlsem.model.reduced`) a unit (a county) has m
pseudo-observations (its schools), pseudo-observation i with loadings L_i on the
unit's latents (its school's effect, the county's effect), residual variance
theta_i and residual e_i = y_i - x_i'beta.  Phi (M x M, M the latents of the
wide form, the slots' effects) is linear in the parameters: an entry of Phi is
one parameter, shared by the slots the parameter table says.  Per unit

    Sigma = L Phi L' + D,   D = diag(theta_i),   P = Sigma^-1,   r = P e,
    V = P L (m x M),  K = L'PL = L'V,  g = L'r           (only the unit's latents)

(for q latents, K = C (I + Phi C)^-1 and g = (I + C Phi)^-1 b with C = L'D^-1 L,
b = L'D^-1 e; the kernel factors the m x m Sigma instead, m <= q + 1 on these
designs, and needs no Phi^-1: a singular Phi is fine as long as Sigma is
positive definite).  With every entry of Phi, theta_i and beta a separate
argument (dSigma/dPhi_ab = L e_a e_b' L', dSigma/dtheta_i = e_i e_i'):

    l            = -1/2 [m log 2pi + log|Sigma| + e'r]
    dl/dPhi_ab   = G_ab = 1/2 (g_a g_b - K_ab)
    dl/dtheta_i  = 1/2 (r_i^2 - P_ii)
    dl/dbeta     = X'r
    d2l/dPhi_ab dPhi_cd   = 1/2 K_ac K_db - 1/2 (K_ac g_d g_b + K_bc g_d g_a)
                           (dK = -K dPhi K, dg = -K dPhi g)
    d2l/dPhi_ab dtheta_i  = 1/2 [V_ia V_ib - r_i (V_ia g_b + g_a V_ib)]
                           (dK = -V_i V_i', dg = -V_i r_i)
    d2l/dPhi_ab dbeta     = -(X'V)_a g_b
    d2l/dtheta_i dtheta_j = 1/2 P_ij^2 - r_i r_j P_ij
    d2l/dtheta_i dbeta    = -(X'P)_i r_i
    d2l/dbeta2            = -X'PX

Summed over units (times the unit's weight) and mapped to the parameters (a
parameter's derivative is the sum over its entries).  The kernel
(``_core.unst_eval``) accumulates everything but the Phi-Phi block, O(m^3 + m q^2)
per unit; the Phi-Phi block is sum_units K_ac K_db and K_ac g_d g_b, which are
two matrix products of the units' vech(K) and vech(g g') (one row per unit):
O(n_units M^4 / 4) in BLAS.  The within-group part of the grouped data adds its
closed form (``ri2.add_within``).  The oracle is ``_oracle.unst_dense``.

``build_unst(red)`` returns the evaluator, or (None, reason) where the model is
not of this kind (random slopes, a structured Theta, too many latents, ...).
"""
from __future__ import annotations

import numpy as np

from .multilevel import _core
from .ri2 import add_within

# the path's limits: latents of the wide form (the Phi-Phi block costs
# n_units M^4 / 4) and pseudo-observations of one unit (m^3 per unit)
MAX_LATENTS = 24
MAX_UNIT_GROUPS = 64
# units per kernel call (bounds the per-unit rows of vech(K), vech(g g'))
CHUNK_UNITS = 1 << 15
# units of one set of latents that get their own (narrower) products in the Phi-Phi block
MIN_RUN = 32


def why_not_unst(model, grouped=False) -> str | None:
    """None if :func:`build_unst` can apply to ``model`` (the full model; ``grouped``:
    the grouped model, whose loadings are the groups' sqrt(n))."""
    t = model.table
    if _core is None or not hasattr(_core, "unst_eval") or model.backend != "cython":
        return "the compiled kernel is not in use"
    if model.dense or t.theta_func is not None:
        return "Theta is not a diagonal of parameters"
    if not grouped and not getattr(model, "_unit_load", False):
        return "loadings other than 1 (random slopes)"
    if not len(t.phi_param):
        return "no random effects"
    if np.all(np.asarray(t.phi_row) == np.asarray(t.phi_col)):
        return "no covariances of random effects (the paths of mlsem.model.ri2 and mlsem.estimate.newton)"
    if model.M > MAX_LATENTS:
        return f"more than {MAX_LATENTS} latent variables"
    beta = np.asarray(t.beta_param)
    if len(beta) != model.q or len(np.unique(beta)) != len(beta):
        return "coefficients shared between design columns"
    var = np.unique(np.concatenate([np.asarray(t.phi_param), np.asarray(t.theta_param)]))
    if np.intersect1d(var, beta).size or np.intersect1d(np.asarray(t.phi_param),
                                                        np.asarray(t.theta_param)).size:
        return "a parameter in two of beta, Phi and theta"
    if len(beta) + len(var) != t.nparams:
        return "parameters outside beta, Phi and theta"
    if len(np.unique(np.asarray(t.theta_row))) != len(t.theta_row) or len(t.theta_row) != model.P:
        return "a slot without one residual variance"
    return None


class ExactCov:
    """ll, dl/dpsi and d2l/dpsi2 of a grouped model (:class:`mlsem.model.reduced.ReducedModel`)
    of random intercepts with a general Phi, from one kernel pass and two matrix
    products (see the module's docstring).  Evaluations are counted on the
    reduced model (``red.nevals``)."""

    label = "mlsem.model.unst"

    def __init__(self, red):
        self.red = red
        t = red.table
        prep = red.prep
        M, P = red.M, red.P
        self.M = M
        self.nv = nv = t.nparams
        self.beta = np.asarray(t.beta_param, dtype=np.int64)
        self.lat = np.ascontiguousarray(prep.slot_lat, dtype=np.int32)
        self._order_units(red)
        thp = np.full(P, -1, dtype=np.int64)
        thp[np.asarray(t.theta_row)] = np.asarray(t.theta_param)
        self.theta_params, pth = np.unique(thp, return_inverse=True)
        self.pth = np.ascontiguousarray(pth.ravel(), dtype=np.int32)    # compact, per slot
        self.nt = len(self.theta_params)
        self._thp = thp
        self._wpar = thp[red._wslots]
        # vech index of Phi's entries
        iu = np.triu_indices(M)
        self.ne = len(iu[0])
        vi = np.zeros((M, M), dtype=np.int32)
        vi[iu] = np.arange(self.ne)
        vi[iu[1], iu[0]] = np.arange(self.ne)
        self.vi = vi
        # the table's Phi entries -> parameters: A (n_phi_params x n_entries)
        ent = np.asarray(t.phi_row) * M + np.asarray(t.phi_col)
        self.phi_params, pcode = np.unique(np.asarray(t.phi_param), return_inverse=True)
        self.ent, ecode = np.unique(ent, return_inverse=True)
        A = np.zeros((len(self.phi_params), len(self.ent)))
        np.add.at(A, (pcode.ravel(), ecode.ravel()), 1.0)
        self.A = A
        a, b = self.ent // M, self.ent % M
        # indices of the Phi-Phi block's entry pairs (ab, cd) into Kv'Kv and Kv'Gv
        self._i_ac = vi[a[:, None], a[None, :]]
        self._i_db = vi[b[None, :], b[:, None]]
        self._i_bc = vi[b[:, None], a[None, :]]
        self._i_da = vi[b[None, :], a[:, None]]
        self.phi_row, self.phi_col, self.phi_param = t.phi_row, t.phi_col, t.phi_param
        q = red.q
        self.q = q
        self.nacc = 1 + M * M + self.nt + q + self.nt ** 2 + self.nt * q + q * q + M * M * q
        self._acc = np.zeros((red._nt, self.nacc))
        self._status = np.zeros(red._nt, dtype=np.int32)
        nrows = len(self._row_ptr) - 1
        ch = min(nrows, CHUNK_UNITS)
        self._Kv = np.zeros((max(ch, 1), self.ne))
        self._Gv = np.zeros((max(ch, 1), self.ne))
        rp = self._row_ptr
        big = max([int(rp[min(r + ch, nrows)] - rp[r]) for r in range(0, nrows, max(ch, 1))] + [1])
        self._Vo = np.zeros((big, 2 * M))
        self._ro = np.zeros(big)
        # per pseudo-observation: its unit's weight, its residual variance's class
        w = np.repeat(self._wrow, np.diff(rp))
        self._wobs = None if np.all(w == 1.0) else w
        cls = self.pth[self._slot]
        self._cls = None if self.nt == 1 else [np.flatnonzero(cls == k) for k in range(self.nt)]
        # the blocks of Phi that must stay positive semi-definite: the connected
        # latents of Phi's free entries
        self.blocks = _phi_blocks(M, t.phi_row, t.phi_col)

    def _order_units(self, red):
        """The units sorted by the set of latents they touch (their pseudo-observations
        gathered in that order: ``_row_ptr``, ``_slot``, ``_y``, ``_X``, ``load``,
        ``_wrow``), and the runs of one set (``_runs``: (first unit, last unit + 1,
        the set's vech columns)) with at least MIN_RUN units: the Phi-Phi block's
        products then use the set's columns only (a county of 3 schools: 6 of 55)."""
        prep = red.prep
        M = red.M
        rp = np.asarray(prep.row_ptr, dtype=np.int64)
        nu = len(rp) - 1
        cnt = np.diff(rp)
        slot = np.asarray(red._slot)
        unit = np.repeat(np.arange(nu), cnt)
        pres = np.zeros((nu, M), dtype=bool)
        for c in range(self.lat.shape[1]):
            lc = self.lat[slot, c]
            ok = lc >= 0
            pres[unit[ok], lc[ok]] = True
        bits = pres.astype(np.int64) @ (np.int64(1) << np.arange(M, dtype=np.int64))
        order = np.argsort(bits, kind="stable")
        c2 = cnt[order]
        rp2 = np.zeros(nu + 1, dtype=np.int64)
        np.cumsum(c2, out=rp2[1:])
        idx = np.arange(rp2[-1]) - np.repeat(rp2[:-1], c2) + np.repeat(rp[order], c2)
        self._row_ptr = rp2
        self._slot = np.ascontiguousarray(slot[idx], dtype=np.int32)
        self._y = np.ascontiguousarray(np.asarray(prep.y, dtype=np.float64)[idx])
        self._X = np.ascontiguousarray(red._X[idx])
        self.load = np.ascontiguousarray(np.asarray(prep.load, dtype=np.float64)[idx])
        self._wrow = np.ascontiguousarray(np.asarray(prep.wrow, dtype=np.float64)[order])
        sb = bits[order]
        cut = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1], True])
        self._runs = []
        rest = []
        vi = np.zeros((M, M), dtype=np.int64)
        iu = np.triu_indices(M)
        vi[iu] = np.arange(len(iu[0]))
        for u0, u1 in zip(cut[:-1], cut[1:]):
            if u1 - u0 >= MIN_RUN:
                S = np.flatnonzero(pres[order[u0]])
                a, b = np.triu_indices(len(S))
                self._runs.append((int(u0), int(u1), vi[S[a], S[b]]))
            else:
                rest.append(np.arange(u0, u1))
        self._rest = np.concatenate(rest) if rest else None

    def _phi_products(self, Kv, Gv, r0, T1, T2):
        """Add Kv'Kv and Kv'Gv over the rows of units r0.. (the chunk in Kv) to T1, T2,
        run by run of one set of latents."""
        r1 = r0 + Kv.shape[0]
        for u0, u1, cols in self._runs:
            a, b = max(u0, r0), min(u1, r1)
            if a >= b:
                continue
            Kc = Kv[a - r0:b - r0][:, cols]
            ix = np.ix_(cols, cols)
            T1[ix] += Kc.T @ Kc
            T2[ix] += Kc.T @ Gv[a - r0:b - r0][:, cols]
        if self._rest is not None:
            rows = self._rest[(self._rest >= r0) & (self._rest < r1)] - r0
            if len(rows):
                Kc = Kv[rows]
                T1 += Kc.T @ Kc
                T2 += Kc.T @ Gv[rows]

    def _cross(self, o0, o1, hpt):
        """Add the Phi-theta block (entry-level) of pseudo-observations o0..o1-1 (rows 0..
        of the kernel's [V, r g] and r) to hpt (M, M, nt): per class of theta,
        sum_t w [V_ta V_tb - r_t (V_ta g_b + g_a V_tb)] / 2, as one product V'[V, r g]."""
        n = o1 - o0
        M = self.M
        W = self._Vo[:n]
        w = self._wobs[o0:o1] if self._wobs is not None else None
        Vw = W[:, :M] if w is None else W[:, :M] * w[:, None]
        if self._cls is None:
            P = Vw.T @ W
            hpt[:, :, 0] += 0.5 * (P[:, :M] - P[:, M:] - P[:, M:].T)
        else:
            for k, rows in enumerate(self._cls):
                rows = rows[(rows >= o0) & (rows < o1)] - o0
                P = Vw[rows].T @ W[rows]
                hpt[:, :, k] += 0.5 * (P[:, :M] - P[:, M:] - P[:, M:].T)

    def phi(self, psi):
        Phi = np.zeros((self.M, self.M))
        Phi[self.phi_row, self.phi_col] = psi[self.phi_param]
        return Phi

    def psd(self, Phi):
        """True if every block of Phi is positive semi-definite (to rounding)."""
        for blk in self.blocks:
            S = Phi[np.ix_(blk, blk)]
            lam = np.linalg.eigvalsh(S)
            if lam[0] < -1e-10 * max(abs(lam[-1]), 1e-300):
                return False
        return True

    def step_cap(self, psi, step):
        """The largest t <= 1 with Phi(psi + t step) positive semi-definite, times 0.9
        (at most 90% of the way to the boundary of the covariance blocks)."""
        Phi0 = self.phi(psi)
        dPhi = self.phi(psi + step) - Phi0
        t = np.inf
        for blk in self.blocks:
            if len(blk) < 2:
                continue          # a variance: the bound of 0 (fraction_to_bound)
            t = min(t, psd_step_limit(Phi0[np.ix_(blk, blk)], dPhi[np.ix_(blk, blk)]))
        return min(1.0, 0.9 * t)

    def moment_start(self, psi0):
        """A start for Newton: psi0's coefficients; each residual variance from the
        within-group sums of squares; Phi from the moments of the pseudo-observations'
        residuals z (E z_i z_j = sqrt(n_i n_j) L_i' Phi L_j, E z_i^2 = n_i L_i' Phi L_i +
        theta_i) by weighted least squares over pairs of groups of one unit, pooled by
        the groups' latents, then made positive semi-definite (eigenvalues clipped) and
        its covariances shrunk until it is.  psi0 where that fails."""
        red = self.red
        psi = np.array(psi0, dtype=float)
        beta = psi[self.beta] if self.q else np.zeros(0)
        t = red.table
        ws = red._wslots
        if len(ws):
            W = red._Wyy[ws].copy()
            if self.q:
                W += -2.0 * (red._Wxy[ws] @ beta) + (red._Wxx[ws] @ beta) @ beta
            cnt = red._wcnt[ws]
            code = np.searchsorted(self.theta_params, self._wpar)
            num = np.bincount(code, weights=np.maximum(W, 0.0), minlength=self.nt)
            den = np.bincount(code, weights=cnt, minlength=self.nt)
            ok = (den > 0) & (num > 0)
            psi[self.theta_params[ok]] = num[ok] / den[ok]
        theta_s = np.zeros(red.P)
        theta_s[t.theta_row] = psi[t.theta_param]
        slot = self._slot
        z = self._y - (self._X @ beta if self.q else 0.0)
        n = self.load[:, 0] ** 2
        keys, code_s = np.unique(self.lat, axis=0, return_inverse=True)   # the slots' latents
        code = code_s.ravel()[slot]
        nc = len(keys)
        nu = len(self._row_ptr) - 1
        unit = np.repeat(np.arange(nu), np.diff(self._row_ptr))
        Zs = np.bincount(unit * nc + code, weights=z * np.sqrt(n), minlength=nu * nc).reshape(nu, nc)
        Ns = np.bincount(unit * nc + code, weights=n, minlength=nu * nc).reshape(nu, nc)
        SZ = Zs.T @ Zs
        SN = Ns.T @ Ns
        SZ[np.diag_indices(nc)] -= np.bincount(code, weights=theta_s[slot] * n, minlength=nc)
        lam = np.zeros((nc, self.M))
        for c in range(keys.shape[1]):
            ok = keys[:, c] >= 0
            lam[np.flatnonzero(ok), keys[ok, c]] = 1.0
        a, b = self.ent // self.M, self.ent % self.M
        i1, i2 = np.nonzero(np.triu(SN) > 0)
        if not len(i1):
            return psi
        rows = (lam[i1][:, a] * lam[i2][:, b]) @ self.A.T            # (pairs, phi params)
        w = np.sqrt(SN[i1, i2])
        sol = np.linalg.lstsq(rows * w[:, None], SZ[i1, i2] / SN[i1, i2] * w, rcond=None)[0]
        cand = psi.copy()
        cand[self.phi_params] = sol
        Phi = self.phi(cand)
        for blk in self.blocks:
            S = Phi[np.ix_(blk, blk)]
            ev, Q = np.linalg.eigh(S)
            floor = 0.05 * max(float(np.mean(np.maximum(ev, 0.0))), 1e-300)
            Phi[np.ix_(blk, blk)] = (Q * np.maximum(ev, floor)) @ Q.T
        cnt_e = self.A.sum(axis=1)
        cand[self.phi_params] = (self.A @ Phi.ravel()[self.ent]) / cnt_e
        diag = np.zeros(len(self.phi_params), dtype=bool)
        diag[np.unique(np.searchsorted(self.phi_params, np.asarray(t.phi_param)[t.phi_row == t.phi_col]))] = True
        for _ in range(20):
            if self.psd(self.phi(cand)) and np.all(cand[self.phi_params[diag]] > 0):
                return cand
            cand[self.phi_params[~diag]] *= 0.5
        return psi

    def between(self, psi, hess=True):
        """(ll, g, H) of the pseudo-observations alone (without the within part), or
        None; the kernel's part, checked against ``_oracle.unst_dense``."""
        red = self.red
        psi = np.asarray(psi, dtype=float)
        Phi = self.phi(psi)
        theta_s = np.zeros(red.P)
        theta_s[red.table.theta_row] = psi[red.table.theta_param]
        if np.any(theta_s <= 0) or not self.psd(Phi):
            return None
        beta = np.ascontiguousarray(psi[self.beta]) if self.q else np.zeros(0)
        M, nt, q, ne = self.M, self.nt, self.q, self.ne
        acc = self._acc
        acc[:] = 0.0
        self._status[:] = 0
        nrows = len(self._row_ptr) - 1
        T1 = np.zeros((ne, ne)) if hess else None
        T2 = np.zeros((ne, ne)) if hess else None
        hpt = np.zeros((M, M, nt)) if hess else None
        rp = self._row_ptr
        r0 = 0
        while r0 < nrows:
            r1 = min(nrows, r0 + self._Kv.shape[0])
            _core.unst_eval(rp, r0, r1, self._slot, self._y, self._X, beta, self.load,
                            self.lat, Phi, theta_s, self.pth, self._wrow, self.vi, acc,
                            self._Kv, self._Gv, self._Vo, self._ro,
                            self._status, red._nt, int(hess))
            if self._status.any():
                return None
            if hess:
                self._phi_products(self._Kv[:r1 - r0], self._Gv[:r1 - r0], r0, T1, T2)
                self._cross(rp[r0], rp[r1], hpt)
            r0 = r1
        tot = acc.sum(axis=0) if acc.shape[0] > 1 else acc[0]
        o = 0
        ll = float(tot[o]); o += 1
        gphi = tot[o:o + M * M]; o += M * M
        gth = tot[o:o + nt]; o += nt
        gb = tot[o:o + q]; o += q
        nv = self.nv
        g = np.zeros(nv)
        pp, tp, bp = self.phi_params, self.theta_params, self.beta
        g[pp] += self.A @ gphi[self.ent]
        g[tp] += gth
        if q:
            g[bp] += gb
        if not hess:
            return ll, g, None
        htt = tot[o:o + nt * nt].reshape(nt, nt); o += nt * nt
        htb = tot[o:o + nt * q].reshape(nt, q); o += nt * q
        hbb = tot[o:o + q * q].reshape(q, q); o += q * q
        hpb = tot[o:o + M * M * q].reshape(M * M, q)
        hpt = hpt.reshape(M * M, nt)
        H = np.zeros((nv, nv))
        hE = 0.5 * (T1[self._i_ac, self._i_db] - T2[self._i_ac, self._i_db] - T2[self._i_bc, self._i_da])
        A = self.A
        H[np.ix_(pp, pp)] = A @ hE @ A.T
        H[np.ix_(tp, tp)] = htt
        hpt_p = A @ hpt[self.ent]
        H[np.ix_(pp, tp)] = hpt_p
        H[np.ix_(tp, pp)] = hpt_p.T
        if q:
            hbb = np.tril(hbb) + np.tril(hbb, -1).T
            H[np.ix_(bp, bp)] = hbb
            H[np.ix_(tp, bp)] = htb
            H[np.ix_(bp, tp)] = htb.T
            hpb_p = A @ hpb[self.ent]
            H[np.ix_(pp, bp)] = hpb_p
            H[np.ix_(bp, pp)] = hpb_p.T
        return ll, g, H

    def evaluate(self, psi, hess=True):
        """(ll, g, H) at psi (H None without ``hess``); None where psi is not
        admissible (a residual variance not above 0, Phi not positive semi-definite,
        a unit's Sigma not positive definite)."""
        red = self.red
        red.nevals += 1
        psi = np.asarray(psi, dtype=float)
        got = self.between(psi, hess)
        if got is None:
            return None
        ll, g, H = got
        theta_s = np.zeros(red.P)
        theta_s[red.table.theta_row] = psi[red.table.theta_param]
        beta = psi[self.beta] if self.q else np.zeros(0)
        wl = add_within(red, self._wpar, self.beta, beta, theta_s, g, H)
        return ll + wl, g, H


def _phi_blocks(M, rows, cols):
    """The connected components (lists of latents) of Phi's free entries."""
    par = list(range(M))

    def find(i):
        while par[i] != i:
            par[i] = par[par[i]]
            i = par[i]
        return i

    for a, b in zip(np.asarray(rows).tolist(), np.asarray(cols).tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            par[ra] = rb
    used = sorted(set(np.asarray(rows).tolist()))
    comp = {}
    for a in used:
        comp.setdefault(find(a), []).append(a)
    return list(comp.values())


def build_unst(red):
    """(ExactCov, None) for the grouped model ``red``, or (None, reason)."""
    why = why_not_unst(red, grouped=True)
    if why is not None:
        return None, why
    rp = np.asarray(red.prep.row_ptr, dtype=np.int64)
    if len(rp) < 2 or rp[-1] == 0:
        return None, "no data"
    if int(np.diff(rp).max()) > MAX_UNIT_GROUPS:
        return None, f"a unit with more than {MAX_UNIT_GROUPS} groups"
    return ExactCov(red), None


def psd_step_limit(S, dS):
    """The largest t with S + t dS positive semi-definite (inf if every t >= 0 keeps
    it), S positive semi-definite; 0 on the boundary when dS points out of it (no step
    into the indefinite directions)."""
    lam, Q = np.linalg.eigh(S)
    if lam[0] <= 1e-12 * max(lam[-1], 1e-300):
        null = Q[:, lam <= 1e-12 * max(lam[-1], 1e-300)]
        return 0.0 if np.linalg.eigvalsh(null.T @ dS @ null)[0] < 0 else np.inf
    W = Q / np.sqrt(lam)
    mu = np.linalg.eigvalsh(W.T @ dS @ W)[0]
    return -1.0 / mu if mu < 0 else np.inf
