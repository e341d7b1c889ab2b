"""Model layer, several outcomes: per-top-unit scores for the sandwich (robust and
cluster-robust standard errors, mlsem.inference.vce).

The log-likelihood of a :class:`mlsem.model.multivariate.MultiModel` is a sum over its
top-level units (a county's rows of the CSR layout), so the score of unit r is the
gradient of its own term: the kernel (``_core.mfactor_loglik``) on the one-row pattern
range [r, r + 1], mapped to the parameters by the same chain rule as the objective.
One kernel call per unit (O(the unit's cells) each, after the fit, never inside the
optimiser's loop); the NumPy backend calls the oracle (``_oracle.loglik_blocks``).
"""
from __future__ import annotations

import numpy as np

from . import _oracle
from ..errors import MlsemError
from .multilevel import _core, chain_rule
from .multivariate import subset_inverses


class _UnitEvaluator:
    """(log-likelihood, gradient) of one top-level unit's term at psi."""

    def __init__(self, model, psi):
        self.model = model
        self.psi = np.asarray(psi, dtype=float)
        beta, Phi, R = model.matrices(self.psi)
        sub = subset_inverses(R)
        F = model.factor(Phi) if model.backend != "numpy" else None
        if sub is None or (model.backend != "numpy" and F is None):
            raise MlsemError("scores: Sigma is not positive definite at the estimates")
        self.beta, self.Phi, self.R, self.sub, self.F = beta, Phi, R, sub, F
        prep = model.prep
        self.resid = np.ascontiguousarray(prep.y - prep.X @ beta if model.q else prep.y.copy())
        self.wrow = np.ones(prep.nrows)
        q, M, nout = model.q, model.M, model.nout
        self._ll = np.zeros(1)
        self._gphi = np.zeros((1, M * M))
        self._gth = np.zeros((1, nout * nout))
        self._gbeta = np.zeros((1, max(q, 8)))
        self._status = np.zeros(1, dtype=np.int32)
        self._w = np.zeros(prep.nobs)
        self._pp = np.zeros(2, dtype=np.int64)
        self._bo = np.ascontiguousarray(beta[model._xorder], dtype=float) if q else np.zeros(0)

    def __call__(self, r, need_grad=True):
        m = self.model
        prep = m.prep
        if m.backend == "numpy":
            o0, o1 = prep.row_ptr[r], prep.row_ptr[r + 1]
            rp = np.array([0, o1 - o0], dtype=np.int64)
            ll, gphi, gR, w = _oracle.loglik_blocks(
                rp, prep.slot[o0:o1], self.resid[o0:o1], prep.load[o0:o1], prep.slot_lat,
                self.Phi, self.R, m._sout, m._spup, self.wrow[r:r + 1], need_grad)
            if ll is None:
                raise MlsemError(f"scores: Sigma of unit {r} is not positive definite")
            if not need_grad:
                return ll, None
            xtw = prep.X[o0:o1].T @ w if m.q else None
            return ll, chain_rule(m.table, self.psi, gphi, gR, xtw)
        self._pp[0], self._pp[1] = r, r + 1
        self._ll[:] = 0.0
        self._gphi[:] = 0.0
        self._gth[:] = 0.0
        self._gbeta[:] = 0.0
        self._status[:] = 0
        rinv, rlogdet = self.sub
        _core.mfactor_loglik(self._pp, prep.row_ptr, m._slot, self.resid, m._load, m._slot_lat,
                             self.F, m.blk_start, m.blk_end, m._spup, m._sout, m.nout, rinv,
                             rlogdet, self.wrow, self._w, self._ll, self._gphi, self._gth,
                             self._status, m._maxn, m._maxm, m._maxc, 1, int(need_grad),
                             y=prep.y, X=m._Xc, beta=self._bo, gbeta_t=self._gbeta,
                             unit_load=m._unit_load, xoff=m._xoff, validate=False)
        if self._status.any():
            raise MlsemError(f"scores: Sigma of unit {r} is not positive definite")
        ll = float(self._ll[0])
        if not need_grad:
            return ll, None
        xtw = None
        if m.q:
            xtw = np.zeros(m.q)
            xtw[m._xorder] = self._gbeta[0, :m.q]
        g = chain_rule(m.table, self.psi, self._gphi[0].reshape(m.M, m.M),
                       self._gth[0].reshape(m.nout, m.nout), xtw)
        return ll, g


def multi_row_scores(model, psi) -> np.ndarray:
    """Per-top-unit scores dl_r/dpsi of a several-outcome model, (nrows, nparams)."""
    ev = _UnitEvaluator(model, psi)
    n = model.prep.nrows
    S = np.zeros((n, model.table.nparams))
    for r in range(n):
        S[r] = ev(r)[1]
    return S
