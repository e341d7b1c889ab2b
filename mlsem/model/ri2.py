"""Model layer: the whole exact Hessian of grouped random intercepts in one pass.

On the grouped data (:mod:`mlsem.model.reduced`) of nested random intercepts,
each pseudo-observation i of a unit (a school of a county) loads on its own
lower latent (loading l1_i, variance tau_i) and on the unit's top latent
(loading l0_i, variance gamma), with residual variance theta_i.  A unit's
covariance matrix is then a diagonal plus rank one,

    Sigma = D + gamma a a',   D_i = l1_i^2 tau_i + theta_i,   a_i = l0_i,

so that with d = 1/D, f = d a, s = a'f, kappa = 1 + gamma s, rho = gamma/kappa
and r = Sigma^-1 e = d e - rho f (f'e):

    log|Sigma| = sum log D_i + log kappa,   e'Sigma^-1 e = sum d_i e_i^2 - rho (f'e)^2,

and every derivative of the unit's log-likelihood (dSigma/dgamma = a a', the
other variances enter D only) is a sum over its pseudo-observations plus
rank-one terms in the few parameters the unit touches (the formulas are
written out in ``_oracle.ri2_dense``'s docstring and in ``_core.ri2_unit``).  The kernel (``_core.ri2_eval``) returns the log-likelihood,
the gradient and the whole Hessian in (beta, variances), cross terms included,
O(m q^2) per unit; the within-group part of the grouped data adds its closed
form.  ``build_exact(red)`` returns the evaluator, or (None, reason) where the
structure is not this one (random slopes, covariances, three levels, ...).
The NumPy oracle of the same quantities is ``_oracle.ri2_dense``.
"""
from __future__ import annotations

import math

import numpy as np

from .multilevel import _core

LOG2PI = math.log(2.0 * math.pi)


def parameter_layout(t, q) -> str | None:
    """None if every parameter of table ``t`` is either one design column's coefficient
    or a (co)variance of Phi or Theta (what the closed-form Hessians index), else why not."""
    beta = np.asarray(t.beta_param)
    if len(beta) != q or len(np.unique(beta)) != len(beta):
        return "coefficients shared between design columns"
    cov = np.unique(np.concatenate([np.asarray(t.phi_param), np.asarray(t.theta_param)]))
    if np.intersect1d(cov, beta).size:
        return "a parameter both a coefficient and a (co)variance"
    if len(beta) + len(cov) != t.nparams:
        return "parameters outside the coefficients and the (co)variances"
    return None


def why_not_exact(red) -> str | None:
    """None if :func:`build_exact` applies to the grouped model ``red``."""
    t = red.table
    if _core is None or not hasattr(_core, "ri2_eval") or red.backend != "cython":
        return "the compiled kernel is not in use"
    if red.dense or t.theta_func is not None:
        return "Theta is not a diagonal of parameters"
    if t.chol_blocks or np.any(t.phi_row != t.phi_col):
        return "covariances of random effects"
    lat = np.asarray(red.prep.slot_lat)
    if lat.shape[1] > 2:
        return "more than two nested levels"
    why = parameter_layout(t, red.q)
    if why:
        return why
    if len(np.unique(np.asarray(t.theta_row))) != len(t.theta_row) or len(t.theta_row) != red.P:
        return "a slot without one residual variance"
    return None


class ExactGrouped:
    """ll, dl/dpsi and d2l/dpsi2 of a :class:`mlsem.model.reduced.ReducedModel`
    of grouped random intercepts from one kernel pass (see the module's docstring).
    Evaluations are counted on the reduced model (``red.nevals``)."""

    def __init__(self, red, top_col, low_col):
        self.red = red
        t = red.table
        prep = red.prep
        P, M = red.P, red.M
        lat = np.asarray(prep.slot_lat)
        load = np.asarray(prep.load, dtype=np.float64)
        slot = red._slot
        n = len(slot)
        self.top = int(lat[0, top_col]) if top_col is not None else -1
        self.l0 = np.ascontiguousarray(load[:, top_col]) if top_col is not None else np.zeros(n)
        if low_col is not None:
            self.low = np.ascontiguousarray(lat[:, low_col], dtype=np.int64)   # per slot
            has = self.low[slot] >= 0
            self.l1 = np.ascontiguousarray(np.where(has, load[:, low_col], 0.0))
        else:
            self.low = np.full(P, -1, dtype=np.int64)
            self.l1 = np.zeros(n)
        par_of_lat = np.full(M, -1, dtype=np.int64)
        par_of_lat[np.asarray(t.phi_row)] = np.asarray(t.phi_param)
        self.pgam = int(par_of_lat[self.top]) if self.top >= 0 else -1
        lowc = np.maximum(self.low, 0)
        self.ptau = np.ascontiguousarray(np.where(self.low >= 0, par_of_lat[lowc], -1), dtype=np.int32)
        pth = np.full(P, -1, dtype=np.int64)
        pth[np.asarray(t.theta_row)] = np.asarray(t.theta_param)
        self.pth = np.ascontiguousarray(pth, dtype=np.int32)
        self.beta = np.asarray(t.beta_param, dtype=np.int64)
        self.nv = t.nparams
        self.phi_param = np.asarray(t.phi_param, dtype=np.int64)
        self.theta_param = np.unique(np.asarray(t.theta_param))
        q, nt, nv = red.q, red._nt, self.nv
        self._ll = np.zeros(nt)
        self._gv = np.zeros((nt, nv))
        self._gb = np.zeros((nt, max(q, 1)))
        self._hvv = np.zeros((nt, nv * nv))
        self._hvb = np.zeros((nt, max(nv * q, 1)))
        self._hbb = np.zeros((nt, max(q * q, 1)))
        self._status = np.zeros(nt, dtype=np.int32)
        self._y = np.ascontiguousarray(prep.y, dtype=np.float64)
        self._wrow = np.ascontiguousarray(prep.wrow, dtype=np.float64)
        self._row_ptr = np.ascontiguousarray(prep.row_ptr, dtype=np.int64)
        # the within-group part: per used slot, its theta parameter
        s = red._wslots
        self._wpar = pth[s]

    def evaluate(self, psi, hess=True):
        """(ll, g, H) at psi (H None without ``hess``); None where psi is not
        admissible (a variance below 0, a residual variance not above 0, Sigma
        not positive definite)."""
        red = self.red
        red.nevals += 1
        t = red.table
        psi = np.asarray(psi, dtype=float)
        if len(self.phi_param) and np.any(psi[self.phi_param] < 0):
            return None
        if np.any(psi[self.theta_param] <= 0):
            return None
        Phid = np.zeros(red.M)
        Phid[t.phi_row] = psi[t.phi_param]
        tau_s = np.where(self.low >= 0, Phid[np.maximum(self.low, 0)], 0.0)
        theta_s = np.zeros(red.P)
        theta_s[t.theta_row] = psi[t.theta_param]
        gamma = float(Phid[self.top]) if self.top >= 0 else 0.0
        beta = np.ascontiguousarray(psi[self.beta]) if red.q else np.zeros(0)
        self._status[:] = 0
        # (no BLAS inside the kernel: no thread limit needed around it)
        _core.ri2_eval(self._row_ptr, red._slot, self._y, red._X, beta, self.l0, self.l1,
                       tau_s, theta_s, self.ptau, self.pth, gamma, self.pgam, self._wrow,
                       self._ll, self._gv, self._gb, self._hvv, self._hvb, self._hbb,
                       self._status, red._nt, 1, int(hess))
        if self._status.any():
            return None
        q, nv = red.q, self.nv
        one = self._ll.shape[0] == 1
        ll = float(self._ll[0] if one else self._ll.sum())
        g = self._gv[0].copy() if one else self._gv.sum(axis=0)
        if q:
            g[self.beta] += self._gb[0, :q] if one else self._gb[:, :q].sum(axis=0)
        H = None
        if hess:
            H = (self._hvv[0].copy() if one else self._hvv.sum(axis=0)).reshape(nv, nv)
            if q:
                hvb = (self._hvb[0] if one else self._hvb.sum(axis=0))[:nv * q].reshape(nv, q)
                hbb = (self._hbb[0] if one else self._hbb.sum(axis=0))[:q * q].reshape(q, q)
                hbb = np.tril(hbb) + np.tril(hbb, -1).T
                H[:, self.beta] += hvb
                H[self.beta, :] += hvb.T
                H[np.ix_(self.beta, self.beta)] = hbb
        wl = self._within(psi, beta, theta_s, g, H)
        return ll + wl, g, H

    def _within(self, psi, beta, theta_s, g, H):
        """The within-group part (see mlsem.model.reduced) added to g and H; its ll."""
        return add_within(self.red, self._wpar, self.beta, beta, theta_s, g, H)


def add_within(red, wpar, beta_idx, beta, theta_s, g, H):
    """The within-group part of the grouped model ``red`` (see mlsem.model.reduced) at
    the coefficients ``beta`` (parameters ``beta_idx``) and the slots' residual
    variances ``theta_s``: its log-likelihood, its gradient added to g and (H not
    None) its Hessian added to H; ``wpar`` the theta parameter of each of
    ``red._wslots``."""
    s = red._wslots
    if not len(s):
        return 0.0
    th = theta_s[s]
    Wxx, Wxy, Wyy, cnt = red._Wxx[s], red._Wxy[s], red._Wyy[s], red._wcnt[s]
    if red.q:
        Wb = Wxx @ beta
        W = Wyy - 2.0 * (Wxy @ beta) + Wb @ beta
        R = Wxy - Wb                                   # (ns, q)
    else:
        W = Wyy.copy()
    W = np.maximum(W, 0.0)
    ll = -0.5 * float(np.sum(cnt * (LOG2PI + np.log(th)) + W / th))
    p = wpar
    nv = len(g)
    g += np.bincount(p, weights=-0.5 * cnt / th + 0.5 * W / (th * th), minlength=nv)
    if red.q:
        g[beta_idx] += (1.0 / th) @ R
    if H is not None:
        d = np.diag_indices(nv)
        H[d] += np.bincount(p, weights=0.5 * cnt / th ** 2 - W / th ** 3, minlength=nv)
        if red.q:
            H[np.ix_(beta_idx, beta_idx)] -= np.tensordot(1.0 / th, Wxx, axes=1)
            cross = -R / (th * th)[:, None]           # (ns, q)
            for c, b in enumerate(beta_idx):
                col = np.bincount(p, weights=cross[:, c], minlength=nv)
                H[:, b] += col
                H[b, :] += col
    return ll


def build_exact(red):
    """(ExactGrouped, None) for the grouped model ``red``, or (None, reason)."""
    why = why_not_exact(red)
    if why is not None:
        return None, why
    prep = red.prep
    lat = np.asarray(prep.slot_lat)
    slot = red._slot
    used = np.flatnonzero(np.bincount(slot, minlength=red.P))
    if not used.size:
        return None, "no data"
    top_col = low_col = None
    for c in range(lat.shape[1]):
        col = lat[used, c]
        if top_col is None and col[0] >= 0 and np.all(col == col[0]):
            top_col = c
        else:
            low_col = c
    if low_col is not None:
        low = lat[:, low_col]
        if top_col is not None and np.any(low[used] == lat[used[0], top_col]):
            return None, "a slot's two latents are the same"
        # each pseudo-observation of a unit has its own lower latent
        row_ptr = np.asarray(prep.row_ptr, dtype=np.int64)
        nrows = len(row_ptr) - 1
        unit = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(row_ptr))
        ls = low[slot]
        ok = ls >= 0
        key = unit[ok] * red.M + ls[ok]
        if key.size:
            if nrows * red.M <= 8 * key.size + 1_000_000:
                dup = np.bincount(key, minlength=nrows * red.M).max() > 1
            else:
                dup = np.unique(key).size != key.size
            if dup:
                return None, "two groups of one unit share a lower latent"
    return ExactGrouped(red, top_col, low_col), None
