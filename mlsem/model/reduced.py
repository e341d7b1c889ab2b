"""Model layer: the same likelihood from one pseudo-observation per group.

Observations of one top-level unit that share their slot's latents (with unit
loadings: random intercepts) and their residual variance parameter have the
same row of Lambda and the same theta.  For such a group of n observations
with residuals e, the orthonormal change of variables (Helmert) into the
scaled sum z = sum(e) / sqrt(n) and n - 1 within-group contrasts splits the
unit's likelihood exactly (Jacobian 1) into

* the likelihood of z, whose loading on the latents is sqrt(n) and whose
  residual variance is theta: one pseudo-observation (y = sum y / sqrt(n),
  X = sum X / sqrt(n), load = sqrt(n)), evaluated by the unchanged kernel;
* -1/2 [(n - 1) log(2 pi theta) + W(beta) / theta], W(beta) the within-group
  sum of squares of y - X beta, a quadratic in beta whose coefficients
  (within-group cross products, summed per residual-variance slot) are
  computed once.

So an evaluation reads one value per group (a school) instead of one per
observation (a pupil): on the nested designs about a tenth of the data, with
the log-likelihood, its gradient and the exact Hessian block of the (co)variances
unchanged (Phi does not enter the within part).  ``reduce_model`` returns the
reduced model, or None (with the reason) where the reduction does not apply:
the dense path (a non-diagonal Theta), loadings other than 1 (random slopes),
or too few observations per group to gain anything.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .multilevel import SERIAL_BELOW, Model, _core, chain_rule

LOG2PI = math.log(2.0 * math.pi)

# reduce only when the groups are at most this share of the observations
MAX_GROUP_SHARE = 0.5
# observations processed at once while summing the within-group cross products
# (bounds the temporaries at 10M rows)
CHUNK = 1 << 20


def why_not_reducible(model) -> str | None:
    """None if ``reduce_model`` applies to ``model``, else the reason."""
    if not isinstance(model, Model) or type(model) is not Model:
        return "not the multilevel model"
    if model.backend != "cython":
        return f"backend {model.backend!r}"
    if model.dense:
        return "Theta is not diagonal (dense path)"
    if not model._unit_load:
        return "loadings other than 1 (random slopes)"
    t = model.table
    if t.theta_func is not None:
        return "Theta is a function of the parameters"
    if model.prep.nrows == 0 or model.prep.nobs == 0:
        return "no data"
    return None


def _group_sums(X, y, start, counts, rep, wg, P):
    """The groups' sums of the columns of Z = [X y] (ng, k), and per slot s (the
    group's representative) the weighted sum over its groups of the within-group
    cross products of Z (P, k, k), in chunks of about CHUNK observations (bounded
    temporaries).  The columns are centred on their overall means first, so that
    the within-group products do not cancel against a large common mean."""
    nobs, q = X.shape
    k = q + 1
    mu = np.empty(k)
    mu[:q] = X.mean(axis=0) if nobs else 0.0
    mu[q] = y.mean() if nobs else 0.0
    sums = np.empty((len(start), k))
    out = np.zeros((P, k, k))
    ng = len(start)
    g0 = 0
    while g0 < ng:
        o0 = start[g0]
        g1 = max(int(np.searchsorted(start, o0 + CHUNK, side="left")), g0 + 1)
        o1 = start[g1] if g1 < ng else nobs
        zc = np.empty((k, o1 - o0))
        zc[:q] = X[o0:o1].T
        zc[q] = y[o0:o1]
        zc -= mu[:, None]
        cnt = counts[g0:g1].astype(np.float64)
        loc = start[g0:g1] - o0
        sc = np.add.reduceat(zc, loc, axis=1)           # (k, groups)
        sums[g0:g1] = (sc + cnt * mu[:, None]).T
        r, w = rep[g0:g1], wg[g0:g1]
        for i in range(k):
            for j in range(i, k):
                wij = np.add.reduceat(zc[i] * zc[j], loc) - sc[i] * sc[j] / cnt
                s = np.bincount(r, weights=wij * w, minlength=P)
                out[:, i, j] += s
                if j != i:
                    out[:, j, i] += s
        g0 = g1
    return sums, out


class ReducedModel(Model):
    """A :class:`Model` on the groups' pseudo-observations plus the within-group
    terms; ``evaluate``, ``phi_hessian`` and the parameter maps are those of the
    full model (same table, same units ``pscale``, ``prep.nobs`` the full
    number of observations for the optimiser's scaling)."""

    def _setup_within(self, Wzz, cnt, q):
        self._Wxx = np.ascontiguousarray(Wzz[:, :q, :q])
        self._Wxy = np.ascontiguousarray(Wzz[:, :q, q])
        self._Wyy = np.ascontiguousarray(Wzz[:, q, q])
        self._wcnt = cnt
        used = (cnt > 0) | (self._Wyy != 0) | np.any(self._Wxx != 0, axis=(1, 2))
        self._wslots = np.flatnonzero(used)

    def _within(self, psi, need_grad):
        """(ll, dl/dpsi) of the within-group part at psi."""
        t = self.table
        s = self._wslots
        th = np.zeros(self.P)
        th[t.theta_row] = psi[t.theta_param]
        th = th[s]
        if np.any(th <= 0):
            return None, None
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        Wxx, Wxy, Wyy, cnt = self._Wxx[s], self._Wxy[s], self._Wyy[s], self._wcnt[s]
        if self.q:
            Wb = Wxx @ beta                      # (ns, q)
            W = Wyy - 2.0 * (Wxy @ beta) + Wb @ beta
        else:
            W = Wyy.copy()
        W = np.maximum(W, 0.0)
        ll = -0.5 * float(np.sum(cnt * (LOG2PI + np.log(th)) + W / th))
        if not need_grad:
            return ll, None
        gth = np.zeros(self.P)
        gth[s] = -0.5 * cnt / th + 0.5 * W / (th * th)
        xtw = ((Wxy - Wb) / th[:, None]).sum(axis=0) if self.q else None
        g = chain_rule(t, psi, np.zeros((self.M, self.M)), gth, xtw)
        return ll, g

    def within_quad(self, psi):
        """The within part's quadratic share of dl/dtheta, sum_s W_s / (2 theta_s^2)
        (one residual variance: the Euler identity of mlsem.estimate.newton)."""
        t = self.table
        s = self._wslots
        th = np.zeros(self.P)
        th[t.theta_row] = psi[t.theta_param]
        th = th[s]
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        W = self._Wyy[s].copy()
        if self.q:
            W += -2.0 * (self._Wxy[s] @ beta) + (self._Wxx[s] @ beta) @ beta
        return float(np.sum(np.maximum(W, 0.0) / (2.0 * th * th)))

    def within_cross(self, psi):
        """d/dbeta of the within part's dl/dtheta (one residual variance):
        -sum_s (Wxy_s - Wxx_s beta) / theta_s^2."""
        t = self.table
        s = self._wslots
        th = np.zeros(self.P)
        th[t.theta_row] = psi[t.theta_param]
        th = th[s]
        beta = psi[t.beta_param]
        r = self._Wxy[s] - self._Wxx[s] @ beta
        return -(r / (th * th)[:, None]).sum(axis=0)

    def _evaluate(self, psi, need_grad, hess=False):
        out = super()._evaluate(psi, need_grad, hess)
        if out is None or out[0] is None:
            return out
        wl, wg = self._within(psi, need_grad)
        if wl is None:
            return None if hess else (None, None)
        if not need_grad:
            return out[0] + wl, None
        if hess:
            return out[0] + wl, out[1] + wg, out[2]
        return out[0] + wl, out[1] + wg

def order_by_pattern(count, item_row, key):
    """Units sorted by their pattern, the sequence of their items' keys (int64).
    ``count``: items per unit; ``item_row``: the unit of each item (items grouped
    by unit, in order).  Returns (order, pat_ptr, ptr, idx): the units' order, the
    pattern pointer over the sorted units, the item pointer of the sorted units and
    the index that gathers the items in that order."""
    nrows, n = len(count), len(key)
    ptr0 = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(count, out=ptr0[1:])
    kmat = np.full((nrows, int(count.max()) if nrows else 0), -1, dtype=np.int64)
    kmat[item_row, np.arange(n) - ptr0[item_row]] = key
    order = np.lexsort(kmat.T[::-1])
    ks = kmat[order]
    newpat = np.ones(nrows, dtype=bool)
    newpat[1:] = np.any(ks[1:] != ks[:-1], axis=1)
    pat_ptr = np.append(np.flatnonzero(newpat), nrows).astype(np.int64)
    c = count[order]
    ptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(c, out=ptr[1:])
    idx = np.arange(n) - np.repeat(ptr[:-1], c) + np.repeat(ptr0[order], c)
    return order, pat_ptr, ptr, idx



def reduce_model(model, patterns=True):
    """(ReducedModel, None) for ``model``, or (None, reason).  ``patterns=False``
    skips sorting the units by pattern (each unit its own pattern: the same
    likelihood, for evaluators that do not share work between units, such as
    mlsem.model.ri2)."""
    why = why_not_reducible(model)
    if why is not None:
        return None, why
    prep, t = model.prep, model.table
    nobs, nrows, P = prep.nobs, prep.nrows, model.P
    row_ptr = np.asarray(prep.row_ptr, dtype=np.int64)
    slot = model._slot
    # slots with the same latents and the same residual-variance parameter
    th_cls = np.full(P, -1, dtype=np.int64)
    th_cls[np.asarray(t.theta_row)] = np.asarray(t.theta_param)
    if np.any(th_cls < 0):
        return None, "a slot without a residual variance parameter"
    key = np.column_stack([np.asarray(prep.slot_lat, dtype=np.int64), th_cls])
    _, code_of_slot = np.unique(key, axis=0, return_inverse=True)
    code_of_slot = np.ascontiguousarray(code_of_slot.ravel(), dtype=np.int64)
    y = np.ascontiguousarray(prep.y, dtype=np.float64)
    X = model._X
    q = X.shape[1]
    wrow = np.ascontiguousarray(prep.wrow, dtype=np.float64)
    if _core is not None:
        # one pass in the kernel (groups, sums, within-group cross products)
        ng = int(_core.group_count(row_ptr, slot, code_of_slot))
        if ng > MAX_GROUP_SHARE * nobs:
            return None, f"{ng:,} groups for {nobs:,} observations: nothing to gain"
        start = np.empty(ng, dtype=np.int64)
        grow = np.empty(ng, dtype=np.int64)
        sz = np.empty((ng, q + 1))
        Wzz = np.zeros((P, q + 1, q + 1))
        _core.group_sums(row_ptr, slot, code_of_slot, X, y, wrow, start, grow, sz, Wzz)
        counts = np.diff(np.append(start, nobs))
        rep = slot[start].astype(np.int64)
        wg = wrow[grow]
    else:
        code = code_of_slot[slot]
        # groups: runs of one code within a unit (observations are sorted by slot)
        new = np.ones(nobs, dtype=bool)
        new[1:] = code[1:] != code[:-1]
        new[row_ptr[:-1][row_ptr[:-1] < nobs]] = True
        start = np.flatnonzero(new)
        ng = len(start)
        if ng > MAX_GROUP_SHARE * nobs:
            return None, f"{ng:,} groups for {nobs:,} observations: nothing to gain"
        counts = np.diff(np.append(start, nobs))
        grow = np.searchsorted(row_ptr, start, side="right") - 1     # each group's unit
        rep = slot[start].astype(np.int64)
        wg = wrow[grow]
        sz, Wzz = _group_sums(X, y, start, counts, rep, wg, P)
    gcount = np.bincount(grow, minlength=nrows)
    maxg = int(gcount.max())
    if nrows * maxg > 50_000_000:
        return None, "too many groups in one unit"
    # pattern of a unit: its groups' (slot, size); units sorted by it
    if patterns:
        order, pat_ptr, rptr, gidx = order_by_pattern(gcount, grow, rep * (int(counts.max()) + 1) + counts)
    else:   # units in their order, each its own pattern
        order = slice(None)
        pat_ptr = np.arange(nrows + 1, dtype=np.int64)
        rptr = np.zeros(nrows + 1, dtype=np.int64)
        np.cumsum(gcount, out=rptr[1:])
        gidx = np.arange(ng)
    sq = np.sqrt(counts.astype(np.float64))
    zr = sz / sq[:, None]
    cnt = np.bincount(rep, weights=wg * (counts - 1), minlength=P)
    nl = prep.slot_lat.shape[1]
    rprep = SimpleNamespace(
        y=np.ascontiguousarray(zr[gidx, q]), X=np.ascontiguousarray(zr[gidx, :q]),
        slot=np.ascontiguousarray(rep[gidx], dtype=np.int32), slot_lat=prep.slot_lat,
        load=np.ascontiguousarray(np.repeat(sq[gidx, None], nl, axis=1)),
        wrow=np.ascontiguousarray(wrow[order]), row_ptr=rptr, pat_ptr=pat_ptr,
        nobs=ng, nrows=nrows, npatterns=len(pat_ptr) - 1, max_row_obs=maxg,
        nslots=prep.nslots, xnames=prep.xnames)
    nt = model.nthreads if ng >= SERIAL_BELOW else 1
    red = ReducedModel(rprep, t, backend=model.backend, nthreads=nt,
                       units=(model.ols, model.pscale))
    red._setup_within(Wzz, cnt, q)
    rprep.nobs = nobs            # the optimiser's scale: the full data's
    return red, None
