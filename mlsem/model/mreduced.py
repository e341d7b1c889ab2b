"""Model layer, several outcomes (issue 15): the same likelihood from grouped data.

Within one innermost group (a school), the units (pupils) with the same observed outcomes
S share their latents: with residuals e_i (|S| values each) of n such units, the
orthonormal change of variables across the units (Helmert, applied to every outcome
column; Jacobian 1) into z = sum_i e_i / sqrt(n) and n - 1 contrasts splits their
likelihood exactly into

* the likelihood of z, a pseudo-unit whose cells load sqrt(n) on the latents and whose
  residual covariance is R[S, S] (y and X summed over the units, divided by sqrt(n)),
  evaluated by the unchanged kernel (``_core.mfactor_loglik``, its block-arrowhead path
  reading the loadings);
* -1/2 [(n - 1) (|S| log 2 pi + log|R[S, S]|) + tr(R[S, S]^-1 W(beta))], W(beta) the
  within-group cross products of the residuals of the outcomes in S, for every pair of
  outcomes a quadratic form in (1, -beta_a), (1, -beta_b) whose matrices (the within-group
  cross products of [y, X] per outcome set S, pooled over the groups) are computed once.

So a school becomes at most 2^nout - 1 pseudo-units (one per outcome set present): on the
nested designs a tenth of the cells.  The log-likelihood, its gradient and the exact Hessian
block of the random effects' (co)variances equal the full data's to rounding (Phi does not
enter the within part).  ``reduce_multi`` returns the grouped model, or None with the
reason where the grouping does not apply or gains nothing.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .multilevel import SERIAL_BELOW, Model, _core, chain_rule
from .multivariate import MultiModel, subset_inverses
from .reduced import order_by_pattern

LOG2PI = math.log(2.0 * math.pi)
# group only when the pseudo-units are at most this share of the units
MAX_GROUP_SHARE = 0.5


def why_not_reducible(model) -> str | None:
    if not isinstance(model, MultiModel) or isinstance(model, MultiReduced):
        return "not the several-outcome model"
    if model.backend != "cython":
        return f"backend {model.backend!r}"
    if not model._unit_load:
        return "loadings other than 1"
    prep = model.prep
    if prep.nrows == 0 or prep.nobs == 0:
        return "no data"
    if np.any(np.asarray(prep.slot_lat)[:, -1] < 0):
        return "a slot without an innermost-level latent"
    return None


class MultiReduced(MultiModel):
    """A :class:`MultiModel` on the pseudo-units plus the closed-form within part: same
    table, same units (``pscale``), ``prep.nobs`` the full number of cells (the
    optimiser's scale)."""

    def __init__(self, full, rprep, Xc, within, nthreads):
        Model.__init__(self, rprep, full.table, backend=full.backend, nthreads=nthreads,
                       units=(full.ols, full.pscale))
        self.ols = full.ols
        self.full = full
        self.nout = full.nout
        self.dense = False
        self._hess_layout(full.table)
        self._gth = np.zeros((self._nt, self.nout * self.nout))
        self._sout, self._spup = full._sout, full._spup
        self.pscale = full.pscale
        self._ols_out = full._ols_out
        self._xorder, self._xoff = full._xorder, full._xoff
        self._Xc = Xc
        self._gbeta = np.zeros((self._nt, max(self.q, 8)))
        # within part: per outcome set (bit mask) present, the outcomes, their weighted
        # count of contrasts and the pooled cross products C[a, :, b, :] of [y, X_a]
        self._wmasks, self._wcount, self._wC = within
        self._kx = Xc.shape[1]

    def start_values(self):
        """Moment estimates from the grouped data, near the ML estimates on the nested
        designs (Newton then needs a few steps): the coefficients by least squares per
        outcome; R from the within-group cross products at them; with one or two
        grouping levels, the innermost level's covariance from the spread of the
        pseudo-units' mean residuals around their row's mean, the top level's from the
        spread of the rows' means, each less the share of the levels below (clipped to
        positive definite).  The full model's rule where that does not apply."""
        t = self.table
        psi = np.zeros(t.nparams)
        for rows, cols, b, _ in self._ols_out:
            psi[t.beta_param[cols]] = b
        try:
            got = self._moments(psi)
        except (np.linalg.LinAlgError, FloatingPointError, ValueError):
            got = None
        return self.full.start_values() if got is None else got

    def _moments(self, psi):
        t = self.table
        nout = self.nout
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        G = self._gammas(beta)
        num = np.zeros((nout, nout))
        den = np.zeros((nout, nout))
        for mask, n, C in zip(self._wmasks, self._wcount, self._wC):
            S = [o for o in range(nout) if (mask >> o) & 1]
            W = np.einsum("ai,aibj,bj->ab", G[S], C, G[S])
            num[np.ix_(S, S)] += W
            den[np.ix_(S, S)] += n
        if np.any(den <= 2):
            return None
        R = _psd(num / den)
        nl = self.prep.slot_lat.shape[1]
        if R is None or nl > 2:
            return None
        # the full pseudo-units (every outcome observed): mean residual per outcome
        prep = self.prep
        e = (prep.y - prep.X @ beta if self.q else prep.y.copy()) / prep.load[:, 0]
        n = prep.load[:, 0] ** 2
        spup = self._spup[prep.slot]
        new = np.ones(len(e), dtype=bool)
        new[1:] = spup[1:] != spup[:-1]
        new[prep.row_ptr[:-1][prep.row_ptr[:-1] < len(e)]] = True
        first = np.flatnonzero(new)
        size = np.diff(np.append(first, len(e)))
        full = first[size == nout]
        if len(full) < 10 * nout:
            return None
        E = e[full[:, None] + np.arange(nout)]                     # (units, nout)
        nu = n[full]
        row = np.searchsorted(prep.row_ptr, full, side="right") - 1
        J = np.bincount(row, minlength=prep.nrows).astype(float)
        used = J > 0
        mrow = np.zeros((prep.nrows, nout))
        for o in range(nout):
            mrow[:, o] = np.bincount(row, weights=E[:, o], minlength=prep.nrows)
        mrow[used] /= J[used, None]
        inv_n = 1.0 / nu
        Phi = {}
        levels = [lv.name for lv in prep.levels] if hasattr(prep, "levels") else None
        if nl == 1:
            D = E - E.mean(axis=0)
            Phi[0] = _psd(D.T @ D / max(len(E) - 1, 1) - R * inv_n.mean())
        else:
            D = E - mrow[row]
            df = float(np.sum(J[used] - 1))
            if df < 10 * nout or used.sum() < 10 * nout:
                return None
            Pj = _psd(D.T @ D / df - R * inv_n.mean())
            M = mrow[used] - mrow[used].mean(axis=0)
            mean_inv_n = np.bincount(row, weights=inv_n, minlength=prep.nrows)[used] / J[used]
            Pk = _psd(M.T @ M / max(used.sum() - 1, 1) - (Pj * np.mean(1.0 / J[used]) if Pj is not None else 0.0)
                      - R * np.mean(mean_inv_n / J[used]))
            Phi[0], Phi[1] = Pk, Pj
        if any(v is None for v in Phi.values()) or levels is None:
            return None
        out = psi.copy()
        for p, (a, b) in t.param_outcomes.items():
            lv = t.params[p].level
            if lv == "Residual":
                out[p] = R[a, b]
            elif lv in levels and levels.index(lv) in Phi:
                out[p] = Phi[levels.index(lv)][a, b]
            else:
                return None
        return out

    def _gammas(self, beta):
        """(nout, 1 + qmax): (1, -beta_o) of each outcome, zero-padded."""
        G = np.zeros((self.nout, 1 + self._kx))
        G[:, 0] = 1.0
        bo = beta[self._xorder]
        for o in range(self.nout):
            a, b = self._xoff[o], self._xoff[o + 1]
            G[o, 1:1 + b - a] = -bo[a:b]
        return G

    def within(self, psi, need_grad):
        """(ll, dl/dR (nout x nout, entrywise), dl/dbeta (design order)) of the within
        part; (None, None, None) if R is not positive definite."""
        _, _, R = self.matrices(psi)
        sub = subset_inverses(R)
        if sub is None:
            return None, None, None
        rinv, rlogdet = sub
        t = self.table
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        G = self._gammas(beta)
        nout = self.nout
        ll = 0.0
        gR = np.zeros((nout, nout))
        gb = np.zeros((nout, 1 + self._kx))
        for mask, n, C in zip(self._wmasks, self._wcount, self._wC):
            S = [o for o in range(nout) if (mask >> o) & 1]
            k = len(S)
            Ri = rinv[mask, :k, :k]
            Gs = G[S]
            CG = np.einsum("aibj,bj->aib", C, Gs)          # C_ab gamma_b
            W = np.einsum("ai,aib->ab", Gs, CG)
            ll -= 0.5 * (n * (k * LOG2PI + rlogdet[mask]) + float(np.sum(Ri * W)))
            if need_grad:
                RWR = Ri @ W @ Ri
                gR[np.ix_(S, S)] += 0.5 * (RWR - n * Ri)
                # dl/dgamma_a = -sum_b Ri_ab C_ab gamma_b; dgamma/dbeta = -1
                gb[S] += np.einsum("ab,aib->ai", Ri, CG)
        if not need_grad:
            return ll, None, None
        xtw = np.zeros(self.q)
        if self.q:
            bo = np.zeros(self.q)
            for o in range(nout):
                a, b = self._xoff[o], self._xoff[o + 1]
                bo[a:b] = gb[o, 1:1 + b - a]
            xtw[self._xorder] = bo
        return ll, gR, xtw

    def _evaluate(self, psi, need_grad, hess=False):
        out = super()._evaluate(psi, need_grad, hess)
        if out is None or out[0] is None:
            return out
        wl, gR, xtw = self.within(psi, need_grad)
        if wl is None:
            return None if hess else (None, None)
        if not need_grad:
            return out[0] + wl, None
        t = self.table
        g = chain_rule(t, psi, np.zeros((self.M, self.M)), gR, xtw if self.q else None)
        if hess:
            return out[0] + wl, out[1] + g, out[2]
        return out[0] + wl, out[1] + g


def _psd(S, floor=0.05):
    """S made symmetric positive definite: on the scale of its variances (outcomes in
    very different units: a floor of the mean diagonal would swamp the small ones),
    eigenvalues raised to ``floor``; a variance that is not positive is first raised to
    ``floor`` times the mean diagonal (it cannot start Newton's method)."""
    S = 0.5 * (S + S.T)
    if not np.all(np.isfinite(S)):
        return None
    d = np.diag(S).copy()
    d[d <= 0] = floor * max(float(np.mean(np.abs(d))), 1e-300)
    sd = np.sqrt(d)
    lam, Q = np.linalg.eigh(S / np.outer(sd, sd))
    return (Q * np.maximum(lam, floor)) @ Q.T * np.outer(sd, sd)


def reduce_multi(model, max_share=MAX_GROUP_SHARE):
    """(MultiReduced, None) for ``model`` (a :class:`MultiModel`), or (None, reason);
    ``max_share``: the largest share of pseudo-units among the units worth grouping."""
    why = why_not_reducible(model)
    if why is not None:
        return None, why
    prep = model.prep
    nout = model.nout
    nobs, nrows = prep.nobs, prep.nrows
    row_ptr = np.ascontiguousarray(prep.row_ptr, dtype=np.int64)
    slot = model._slot
    sl = np.asarray(prep.slot_lat)
    snode = np.ascontiguousarray(sl[:, -1] // nout, dtype=np.int32)
    nu, ng, maxg = _core.mgroup_count(row_ptr, slot, model._spup, model._sout, snode, nout)
    if ng > max_share * nu:
        return None, f"{ng:,} groups for {nu:,} units: nothing to gain"
    Xc = model._Xc
    k = 1 + Xc.shape[1]
    y = np.ascontiguousarray(prep.y, dtype=np.float64)
    cout = model._ocell
    # each outcome's mean of [y, X] (from the sums of MultiModel.outcome_ols): the sums
    # are centred on it (the within-group products then do not cancel against a large
    # common mean)
    zs = model._zsums
    mu = np.zeros((nout, k))
    mu[:, 0] = zs[:, -1]
    mu[:, 1:] = zs[:, 1:k]
    mu /= np.maximum(zs[:, :1], 1.0)
    wrow = np.ascontiguousarray(prep.wrow, dtype=np.float64)
    nm = 1 << nout
    gfirst = np.empty(ng, dtype=np.int64)
    gcount = np.empty(ng, dtype=np.int64)
    gmask = np.empty(ng, dtype=np.int32)
    grow = np.empty(ng, dtype=np.int64)
    gsum = np.empty((ng, nout * k))
    C = np.zeros((nm, nout * k, nout * k))
    ccount = np.zeros(nm)
    _core.mgroup_sums(row_ptr, slot, model._spup, model._sout, snode, nout, y, Xc, mu, wrow,
                      gfirst, gcount, gmask, grow, gsum, C, ccount)
    masks, counts, Cs = [], [], []
    for m in np.unique(gmask):
        S = [o for o in range(nout) if (m >> o) & 1]
        cols = np.concatenate([np.arange(o * k, (o + 1) * k) for o in S])
        Cm = C[m][np.ix_(cols, cols)]
        masks.append(int(m))
        counts.append(float(ccount[m]))
        Cs.append(0.5 * (Cm + Cm.T).reshape(len(S), k, len(S), k))
    # the pseudo-units' cells: the first unit's cells, [y, X] summed / sqrt(n)
    clen = np.array([bin(m).count("1") for m in range(nm)], dtype=np.int64)[gmask]
    cptr = np.zeros(ng + 1, dtype=np.int64)
    np.cumsum(clen, out=cptr[1:])
    ncell = int(cptr[-1])
    cg = np.repeat(np.arange(ng), clen)                    # each cell's group
    csrc = np.repeat(gfirst, clen) + (np.arange(ncell) - np.repeat(cptr[:-1], clen))
    cslot = slot[csrc]
    co = cout[csrc].astype(np.int64)
    sq = np.sqrt(gcount.astype(np.float64))
    vals = gsum.reshape(ng, nout, k)[cg, co] + gcount[cg, None] * mu[co]
    vals /= sq[cg, None]
    # rows sorted by their pattern: the sequence of (slot, group size) of their cells
    crow = grow[cg]
    rcount = np.bincount(crow, minlength=nrows)            # cells per row
    maxc = int(rcount.max()) if nrows else 0
    if nrows * maxc > 50_000_000:
        return None, "too many pseudo-units in one row"
    rorder, pat_ptr, rptr, cidx = order_by_pattern(
        rcount, crow, cslot.astype(np.int64) * (int(gcount.max()) + 1) + gcount[cg])
    vals = vals[cidx]
    cslot = np.ascontiguousarray(cslot[cidx], dtype=np.int32)
    Xg = np.ascontiguousarray(vals[:, 1:])
    # the stacked design (the base model's shape; the kernel reads the compact Xg)
    q = prep.X.shape[1]
    Xs = np.zeros((ncell, q))
    co = co[cidx]
    for o in range(nout):
        a, b = model._xoff[o], model._xoff[o + 1]
        r = np.flatnonzero(co == o)
        Xs[np.ix_(r, model._xorder[a:b])] = Xg[np.ix_(r, np.arange(b - a))]
    nl = sl.shape[1]
    load = np.ascontiguousarray(np.repeat(sq[cg][cidx, None], nl, axis=1))
    rprep = SimpleNamespace(
        y=np.ascontiguousarray(vals[:, 0]), X=Xs, slot=cslot, slot_lat=prep.slot_lat, load=load,
        wrow=np.ascontiguousarray(wrow[rorder]), row_ptr=rptr, pat_ptr=pat_ptr, nobs=ncell,
        nrows=nrows, npatterns=len(pat_ptr) - 1, max_row_obs=maxc, nslots=prep.nslots,
        xnames=prep.xnames, meta=prep.meta, levels=prep.levels)
    nt = model.nthreads if ncell >= SERIAL_BELOW else 1
    red = MultiReduced(model, rprep, Xg, (masks, counts, Cs), nt)
    rprep.nobs = nobs            # the optimiser's scale: the full data's
    return red, None


# the Hessian of the Newton iterations from a share of the rows (mfast2)
SUB_MIN_ROWS = 15000     # rows of the grouped data below which the subsample is not used
SUB_ROWS = 5000          # about this many rows in the subsample (its Hessian error, and so
#                          the iterations, depend on this number, not on the share)


def subsample(red, rows=None, min_rows=None):
    """A :class:`MultiReduced` on every k-th row of ``red``'s grouped data (rows sorted by
    pattern: every pattern keeps about its share), their weights scaled by the whole's
    total weight over the kept rows', and the whole within part: the same log-likelihood
    to sampling error, at about ``rows / nrows`` of an evaluation's cost.  Newton's
    iterations take their coefficient and residual columns of the Hessian from it (the
    Phi block, the gradient and the final Hessian stay the whole data's); None below
    ``min_rows`` rows (an evaluation of the whole is cheap then)."""
    rows = SUB_ROWS if rows is None else rows
    min_rows = SUB_MIN_ROWS if min_rows is None else min_rows
    p = red.prep
    nrows = int(p.nrows)
    if nrows < min_rows or not isinstance(red, MultiReduced):
        return None
    k = max(2, nrows // rows)
    keep = np.arange(0, nrows, k)
    rp = np.asarray(p.row_ptr, dtype=np.int64)
    lens = rp[keep + 1] - rp[keep]
    rptr = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lens, out=rptr[1:])
    cells = np.repeat(rp[keep], lens) + (np.arange(int(rptr[-1])) - np.repeat(rptr[:-1], lens))
    # a pattern's kept rows are consecutive: the new pattern pointers
    pat = np.searchsorted(np.asarray(p.pat_ptr, dtype=np.int64), keep, side="right") - 1
    first = np.flatnonzero(np.r_[True, pat[1:] != pat[:-1]])
    pat_ptr = np.append(first, len(keep)).astype(np.int64)
    wrow = np.asarray(p.wrow, dtype=np.float64)
    scale = float(wrow.sum()) / float(wrow[keep].sum())
    sprep = SimpleNamespace(
        y=np.ascontiguousarray(p.y[cells]), X=np.ascontiguousarray(p.X[cells]),
        slot=np.ascontiguousarray(p.slot[cells]), slot_lat=p.slot_lat,
        load=np.ascontiguousarray(p.load[cells]), wrow=np.ascontiguousarray(wrow[keep] * scale),
        row_ptr=rptr, pat_ptr=pat_ptr, nobs=len(cells), nrows=len(keep),
        npatterns=len(pat_ptr) - 1, max_row_obs=int(lens.max()), nslots=p.nslots,
        xnames=p.xnames, meta=p.meta, levels=p.levels)
    within = (red._wmasks, red._wcount, red._wC)
    sub = MultiReduced(red.full, sprep, np.ascontiguousarray(red._Xc[cells]), within, 1)
    sprep.nobs = p.nobs
    return sub
