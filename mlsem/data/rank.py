"""Data layer: the columns of a fixed-effect design that are linear combinations of earlier ones.

lme4 drops such columns before fitting ("fixed-effect model matrix is rank
deficient so dropping 1 column / coefficient"), as R's ``lm`` and Stata do:
typically an empty cell of a factor interaction, a covariate constant within
the estimation rows beside the intercept, or one column a multiple of another.
The columns kept are those a left-to-right QR with R's limited pivoting keeps:
column j is dropped when its residual after projecting on the columns before
it has norm below ``tol`` (1e-7, R's ``qr`` default) times its own norm; a
column of zeros is dropped.

Cost: a Gram matrix of the p columns (p(p+1)/2 dot products, no copy of the
data) screens every column; only a column the Gram matrix cannot clear
(relative residual variance below 1e-10) is decided by the QR of the design,
done in chunks of rows (the R factors of the chunks stacked and factored
again), so the memory is O(chunk x p), not O(n x p).
"""
from __future__ import annotations

import numpy as np

TOL = 1e-7
_SCREEN = 1e-10
_CHUNK = 1 << 17


def _dot(a, b, n) -> float:
    """a . b for columns that may be None (a column of ones, never materialised)."""
    if a is None and b is None:
        return float(n)
    if a is None or b is None:
        return float(np.sum(b if a is None else a))
    # (einsum, not BLAS ddot: a threaded BLAS on a busy machine makes one long dot 10x slower)
    return float(np.einsum("i,i->", a, b))


def _gram_residuals(cols, n) -> np.ndarray:
    """Relative residual variances of each column after the ones before it: the
    unpivoted Cholesky of the unit-diagonal Gram matrix, a near-zero pivot
    skipped (a zero column has 0)."""
    p = len(cols)
    G = np.empty((p, p))
    for a in range(p):
        for b in range(a + 1):
            G[a, b] = G[b, a] = _dot(cols[a], cols[b], n)
    d = np.sqrt(np.diag(G))
    C = G / np.outer(np.where(d > 0, d, 1.0), np.where(d > 0, d, 1.0))
    L = np.zeros((p, p))
    res = np.zeros(p)
    for j in range(p):
        if d[j] == 0.0:
            continue
        l = np.zeros(j)
        for i in range(j):
            if L[i, i] > 0.0:
                l[i] = (C[j, i] - l[:i] @ L[i, :i]) / L[i, i]
        res[j] = 1.0 - float(l @ l)
        L[j, :j] = l
        L[j, j] = np.sqrt(res[j]) if res[j] > _SCREEN else 0.0
    return res


def _r_factor(cols, n) -> np.ndarray:
    """R of the QR of the n x p design (R'R = X'X), by QR of row chunks whose R
    factors are stacked and factored again: O(chunk x p) memory."""
    p = len(cols)
    Rs = []
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        block = np.column_stack([np.ones(m) if c is None else c[s:s + m] for c in cols])
        Rs.append(np.linalg.qr(block, mode="r"))
    R = np.linalg.qr(np.vstack(Rs), mode="r") if len(Rs) > 1 else Rs[0]
    if R.shape[0] < p:
        R = np.vstack([R, np.zeros((p - R.shape[0], p))])
    return R


def deficient_columns(X, n: int | None = None) -> list[int]:
    """Indices of the columns of ``X`` (an n x p array, or a list of p
    equal-length 1-d arrays, None standing for a column of ones: give ``n``)
    that are linear combinations of earlier columns."""
    if isinstance(X, list):
        cols = [None if c is None else np.asarray(c, dtype=np.float64) for c in X]
        n = n if n is not None else next((len(c) for c in cols if c is not None), 0)
    else:
        cols, n = [X[:, j] for j in range(X.shape[1])], X.shape[0]
    if not cols or n == 0:
        return []
    if np.all(_gram_residuals(cols, n) > _SCREEN):
        return []
    # decide on R (X c = 0 exactly when R c = 0), keeping columns left to right
    R = _r_factor(cols, n)
    kept, out = [], []
    for j in range(len(cols)):
        norm = np.linalg.norm(R[:, j])
        if norm == 0.0:
            out.append(j)
            continue
        if kept:
            Q, _ = np.linalg.qr(R[:, kept])
            resid = R[:, j] - Q @ (Q.T @ R[:, j])
            if np.linalg.norm(resid) < TOL * norm:
                out.append(j)
                continue
        kept.append(j)
    return out
