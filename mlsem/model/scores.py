"""Model layer, second half: the kernel with explicit (resid, Phi, Theta), the
chain rule to parameters, and per-top-unit scores.

``Model.evaluate`` is the optimiser's objective; inference needs the same
kernel on other arguments (a residual that is a design column for REML, a
Phi/Theta outside the model's own parameter table for score tests, a subset of
the patterns for per-unit scores).  :func:`kernel_eval` is that call and
:func:`chain` the map of its outputs to dl/dpsi (the same index arrays as
``Model.evaluate``).  Nothing here runs inside the optimiser's loop.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from . import _oracle
from ..errors import MlsemError
from .multilevel import chain_rule

try:
    from . import _core
except ImportError:  # pragma: no cover
    _core = None


def kernel_eval(model, resid, Phi, Theta, *, wrow=None, pat_ptr=None, dense=None,
                need_grad=True, load=None):
    """Kernel on explicit arguments.

    ``Theta``: (P,) diagonal or (P, P); ``dense`` forces the dense path (any
    Phi, e.g. covariances outside the declared blocks).  ``pat_ptr``: a subset
    of the patterns (indices into the rows: ``[r0, r1]`` is one pattern or one
    row).  Returns (ll, dl/dPhi (M, M), dl/dTheta ((P,) or (P, P)), w per
    observation (weighted)), or ``None`` where Sigma is not positive definite."""
    prep = model.prep
    M, P = Phi.shape[0], model.P
    if dense is None:
        dense = model.dense or Theta.ndim == 2
    if dense and Theta.ndim == 1:
        Theta = np.diag(Theta)
    wrow = prep.wrow if wrow is None else wrow
    subset = pat_ptr is not None
    pat_ptr = prep.pat_ptr if pat_ptr is None else np.ascontiguousarray(pat_ptr, dtype=np.int64)
    load = model._load if load is None else np.ascontiguousarray(load, dtype=np.float64)
    resid = np.ascontiguousarray(resid, dtype=np.float64)
    if model.backend == "numpy":
        r0, r1 = int(pat_ptr[0]), int(pat_ptr[-1])
        rp = prep.row_ptr[r0:r1 + 1]
        o0 = rp[0]
        Th = Theta if Theta.ndim == 2 else np.diag(Theta)
        ll, gphi, gth, wsub = _oracle.loglik(rp - o0, prep.slot[o0:rp[-1]], resid[o0:rp[-1]],
                                             load[o0:rp[-1]], prep.slot_lat, Phi, Th,
                                             wrow[r0:r1], need_grad)
        if ll is None:
            return None
        w = np.zeros(prep.nobs)
        w[o0:rp[-1]] = wsub
        return ll, gphi, (gth if dense else np.diag(gth).copy()), w
    w = np.zeros(prep.nobs)
    ll = np.zeros(1)
    status = np.zeros(1, dtype=np.int32)
    # the model's own layout is checked by the kernel once (Model._layout_ok);
    # a pattern subset is checked every time (O(its observations))
    validate = subset or not getattr(model, "_layout_ok", False)
    gphi = np.zeros((1, M * M))
    Phi = np.ascontiguousarray(Phi, dtype=np.float64)
    if dense:
        gth = np.zeros((1, P * P))
        _core.dense_loglik(pat_ptr, prep.row_ptr, model._slot, resid, load, model._slot_lat,
                           Phi, np.ascontiguousarray(Theta, dtype=np.float64), wrow, w, ll,
                           gphi, gth, status, model._maxn, 1, int(need_grad), validate=validate)
        gth = gth.reshape(P, P)
    else:
        if np.any(Theta <= 0):
            return None
        F = model.factor(Phi)
        if F is None:
            return None
        gth = np.zeros((1, P))
        _core.factor_loglik(pat_ptr, prep.row_ptr, model._slot, resid, load, model._slot_lat,
                            F, model.blk_start, model.blk_end, np.ascontiguousarray(Theta),
                            wrow, w, ll, gphi, gth, status, model._maxn, model._maxm,
                            model._maxc, 1, int(need_grad), validate=validate)
        gth = gth[0]
    if status.any():
        return None
    return float(ll[0]), gphi.reshape(M, M), gth, w


def chain(model, psi, gphi, gth, w):
    """dl/dpsi from the kernel's dl/dPhi, dl/dTheta and w (as Model.evaluate)."""
    xtw = model.prep.X.T @ w if (model.q and w is not None) else None
    return chain_rule(model.table, psi, gphi, gth, xtw)


def row_scores(model, psi, chunk: int = 20000) -> np.ndarray:
    """Unweighted per-top-unit scores dl_r/dpsi, shape (nrows, nparams).

    Per row, dl_r/dSigma = 1/2 (w w' - Sigma^-1): the w w' part is computed
    from the kernel's per-observation w in NumPy (vectorised), the Sigma^-1
    part is constant within a missing pattern and comes from one kernel call
    per pattern at a zero residual.  Models with a structured or
    non-diagonal Theta use one kernel call per row instead."""
    if getattr(model, "nout", None):              # several outcomes (mlsem.model.mscores)
        from .mscores import multi_row_scores
        return multi_row_scores(model, psi)
    t = model.table
    prep = model.prep
    beta, Phi, Theta = model.matrices(psi)
    resid = model.residuals(psi)
    n, npar, M = prep.nrows, t.nparams, model.M
    ones = np.ones(n)
    plain = (not model.dense) and t.theta_func is None
    S = np.zeros((n, npar))
    zero = np.zeros(prep.nobs)
    if not plain:
        for r in range(n):
            out = kernel_eval(model, resid, Phi, Theta, wrow=ones, pat_ptr=[r, r + 1])
            if out is None:
                raise MlsemError("scores: Sigma is not positive definite at the estimates")
            ll, gphi, gth, w = out
            S[r] = chain(model, psi, gphi, gth, w)
        return S
    out = kernel_eval(model, resid, Phi, Theta, wrow=ones)
    if out is None:
        raise MlsemError("scores: Sigma is not positive definite at the estimates")
    w = out[3]
    rowid = np.repeat(np.arange(n), np.diff(prep.row_ptr))
    # mean part: X_r' w_r
    if model.q:
        XW = prep.X * w[:, None]
        per_row = np.add.reduceat(XW, prep.row_ptr[:-1], axis=0)
        Bind = sparse.csr_matrix((np.ones(model.q), (np.arange(model.q), t.beta_param)),
                                 shape=(model.q, npar))
        S += np.asarray(Bind.T.dot(per_row.T).T)
    # theta part: 1/2 w_s^2
    tp_slot = np.full(model.P, -1, dtype=np.int64)
    tp_slot[t.theta_row] = t.theta_param
    S += np.bincount(rowid * npar + tp_slot[prep.slot], weights=0.5 * w * w,
                     minlength=n * npar).reshape(n, npar)
    # phi part: 1/2 (Lambda_r' w_r)(Lambda_r' w_r)'
    if len(t.phi_param):
        Pind = sparse.csr_matrix((np.ones(len(t.phi_param)), (np.arange(len(t.phi_param)), t.phi_param)),
                                 shape=(len(t.phi_param), npar))
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            o0, o1 = prep.row_ptr[c0], prep.row_ptr[c1]
            u = np.zeros((c1 - c0) * M)
            for k in range(prep.slot_lat.shape[1]):
                lat = prep.slot_lat[prep.slot[o0:o1], k]
                ok = lat >= 0
                idx = (rowid[o0:o1][ok] - c0) * M + lat[ok]
                u += np.bincount(idx, weights=prep.load[o0:o1, k][ok] * w[o0:o1][ok],
                                 minlength=(c1 - c0) * M)
            u = u.reshape(c1 - c0, M)
            E = 0.5 * u[:, t.phi_row] * u[:, t.phi_col]
            S[c0:c1] += np.asarray(Pind.T.dot(E.T).T)
    # pattern constants: -1/2 Sigma_o^-1 mapped to psi, one kernel call per pattern
    for p in range(prep.npatterns):
        r0, r1 = int(prep.pat_ptr[p]), int(prep.pat_ptr[p + 1])
        out = kernel_eval(model, zero, Phi, Theta, wrow=ones, pat_ptr=[r0, r1])
        if out is None:
            raise MlsemError("scores: Sigma is not positive definite at the estimates")
        _, gphi, gth, _ = out
        gp = chain(model, psi, gphi, gth, None) / (r1 - r0)
        S[r0:r1] += gp
    return S
