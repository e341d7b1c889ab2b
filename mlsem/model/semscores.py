"""Model layer: per-row scores of a general SEM fitted by FIML (mlsem.sem), for
the Huber-White and cluster-robust sandwich and sampling weights.

For row r with observed variables o, mean mu_r = m0 + T x_r and covariance
Sigma (mlsem.estimate.adf.matrix_derivatives gives their analytic derivatives), the
score of parameter k is

    w_r' (d mu_r / d k)_o + 1/2 [ w_r' (d Sigma / d k)_oo w_r - tr(Sigma_oo^-1 (d Sigma / d k)_oo) ],

w_r = Sigma_oo^-1 (y_o - mu_o): the gradient of the row's Gaussian
log-density (DESIGN.md section 5), unweighted.  Nothing here runs inside the
optimiser's loop.
"""
from __future__ import annotations

import numpy as np

from ..estimate.adf import matrix_derivatives
from ..errors import MlsemError


def sem_row_scores(model, psi) -> np.ndarray:
    """(nrows, nparams) scores in the model's row order (rows sorted by pattern)."""
    d = model.prep
    m, Lt, Sigma, Tot, m0, dSig, dm0, dTot = matrix_derivatives(model, psi)
    nfull = dSig.shape[0]
    S = np.zeros((d.nrows, nfull))
    Y = np.full((d.nrows, model.P), np.nan)
    Y[d.obs_row, d.slot] = d.y
    for p in range(len(d.pat_ptr) - 1):
        r0, r1 = int(d.pat_ptr[p]), int(d.pat_ptr[p + 1])
        o = np.flatnonzero(~np.isnan(Y[r0]))
        Xr = d.X[r0:r1]
        mu = m0[o][None, :] + Xr @ Tot[o].T                         # (n_p, n_o)
        So = Sigma[np.ix_(o, o)]
        try:
            Si = np.linalg.inv(np.linalg.cholesky(So))
        except np.linalg.LinAlgError:
            raise MlsemError("scores: the implied covariance matrix is not positive definite "
                             "at the estimates") from None
        Sinv = Si.T @ Si
        Wm = (Y[r0:r1][:, o] - mu) @ Sinv                            # (n_p, n_o)
        dSo = dSig[:, o][:, :, o]                                    # (nfull, n_o, n_o)
        S[r0:r1] += Wm @ dm0[:, o].T
        if model.q:
            S[r0:r1] += np.einsum("ro,koq,rq->rk", Wm, dTot[:, o, :], Xr, optimize=True)
        S[r0:r1] += 0.5 * np.einsum("ro,kop,rp->rk", Wm, dSo, Wm, optimize=True)
        S[r0:r1] -= 0.5 * np.einsum("op,kpo->k", Sinv, dSo)[None, :]
    return S @ model.table.T
