"""The expected (Fisher) information of a general SEM's FIML log-likelihood,
summed over the missing-data patterns: for a row r with observed variables O
(Sigma_O, its mean mu_r,O, weight w_r)

    I_kl = sum_r w_r [ dmu_r,O/dk' Sigma_O^-1 dmu_r,O/dl
                       + 1/2 tr(Sigma_O^-1 dSigma_O/dk Sigma_O^-1 dSigma_O/dl) ].

The derivatives of Sigma and of the row means come from central differences of
the model-implied moments (:meth:`SemModel.implied`, no pass over the data;
exact for the parameters that enter linearly or quadratically, the usual
case).  Patterns of the same size are stacked, so that the work is a few
batched NumPy calls per size, not per pattern.

Used by :mod:`mlsem.estimate.semscoring` (Fisher scoring from the start, the
Newton polish then finishes); the standard errors stay the observed
information's, exact here (:func:`observed_information`) where Sigma and the
means are linear in psi.
"""
from __future__ import annotations

import numpy as np

try:
    from . import _core
except ImportError:  # pragma: no cover
    _core = None

# central-difference step, relative to max(|psi|, 0.1 x the parameter's unit)
STEP = 1e-5


class PatternGroups:
    """The data's missing-data patterns grouped by their number of observed
    variables: per group the observed slots (n_g, m), the patterns' weights
    and the rows with their pattern's position in the group."""

    def __init__(self, d):
        pat_ptr, row_ptr, slot = d.pat_ptr, d.row_ptr, d.slot
        npat = len(pat_ptr) - 1
        first = pat_ptr[:-1]
        size = (row_ptr[first + 1] - row_ptr[first]).astype(np.int64)
        wpat = np.add.reduceat(d.wrow, first) if npat else np.zeros(0)
        pat_of_row = np.repeat(np.arange(npat), np.diff(pat_ptr))
        self.groups = []
        for m in np.unique(size):
            pats = np.flatnonzero(size == m)
            idx = slot[row_ptr[first[pats]][:, None] + np.arange(m)[None, :]].astype(np.int64)
            local = np.full(npat, -1, dtype=np.int64)
            local[pats] = np.arange(len(pats))
            rows = np.flatnonzero(local[pat_of_row] >= 0)
            self.groups.append((idx, wpat[pats], rows, local[pat_of_row[rows]], d.wrow[rows]))


def implied_derivatives(model, psi):
    """(Sigma, dSigma (k, P, P), dMU (k, nrows, P)) at psi; None where the
    implied moments are not defined (I - B singular)."""
    k = len(psi)
    base = model.implied(psi)
    if base is None:
        return None
    unit = np.asarray(model.pscale, dtype=float)
    dS = np.empty((k, model.P, model.P))
    dM = np.empty((k,) + base[5].shape)
    for i in range(k):
        h = STEP * max(abs(psi[i]), 0.1 * unit[i])
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        a, b = model.implied(up), model.implied(dn)
        if a is None or b is None:
            return None
        dS[i] = (a[3] - b[3]) / (2 * h)
        dM[i] = (a[5] - b[5]) / (2 * h)
    return base[3], dS, dM


def _derivatives(model, psi):
    """implied_derivatives, with dSigma and dMU computed once per model where
    they do not depend on psi (no free loading or regression among latents:
    Sigma and the means are then linear in the parameters); the parameters
    that move Sigma and those that move the means."""
    if model._lam_free:
        got = implied_derivatives(model, psi)
        if got is None:
            return None
        Sigma, dS, dM = got
        cov = np.flatnonzero(np.any(dS != 0, axis=(1, 2)))
        mean = np.flatnonzero(np.any(dM != 0, axis=(1, 2)))
        return Sigma, dS[cov], cov, dM[mean], mean
    cached = getattr(model, "_seminfo_derivs", None)
    if cached is None:
        got = implied_derivatives(model, psi)
        if got is None:
            return None
        _, dS, dM = got
        cov = np.flatnonzero(np.any(dS != 0, axis=(1, 2)))
        mean = np.flatnonzero(np.any(dM != 0, axis=(1, 2)))
        cached = model._seminfo_derivs = (np.ascontiguousarray(dS[cov]), cov, np.ascontiguousarray(dM[mean]), mean)
    m = model.matrices(psi)
    Lt = m["lambda"]                     # B fixed at 0 here (no free regression among latents) ...
    if np.any(m["beta"] != 0):           # ... or fixed at nonzero values
        Lt = Lt @ np.linalg.inv(np.eye(model.M) - m["beta"])
    Sigma = Lt @ m["psi"] @ Lt.T + m["theta"]
    return (Sigma,) + cached


def expected_information(model, psi) -> np.ndarray | None:
    """The expected information (k x k) at psi; None where the implied moments
    are not defined or a pattern's Sigma_O is not positive definite.  The
    kernel (``_core.sem_expected_info``) unless the model's backend is
    "numpy" (then :func:`expected_information_numpy`, the oracle)."""
    if getattr(model, "backend", "numpy") == "numpy" or _core is None:
        return expected_information_numpy(model, psi)
    got = _derivatives(model, psi)
    if got is None:
        return None
    Sigma, dS, cov, dM, mean = got
    d = model.prep
    Ic = np.zeros((len(cov), len(cov)))
    Im = np.zeros((len(mean), len(mean)))
    if _core.sem_expected_info(d.pat_ptr, d.row_ptr, model._slot, np.ascontiguousarray(Sigma),
                               dS, dM, d.wrow, Ic, Im):
        return None
    return _assemble(len(psi), cov, Ic, mean, Im)


def _assemble(k, cov, Ic, mean, Im):
    info = np.zeros((k, k))
    info[np.ix_(cov, cov)] += Ic
    info[np.ix_(mean, mean)] += Im
    return 0.5 * (info + info.T)


def expected_information_numpy(model, psi) -> np.ndarray | None:
    """The NumPy version of :func:`expected_information` (patterns of one size
    stacked; the kernel's oracle)."""
    got = _derivatives(model, psi)
    if got is None:
        return None
    Sigma, dS, cov, dM, mean = got
    groups = getattr(model, "_pattern_groups", None)
    if groups is None:
        groups = model._pattern_groups = PatternGroups(model.prep)
    kc, km = len(cov), len(mean)
    Ic = np.zeros((kc, kc))
    Im = np.zeros((km, km))
    for idx, wpat, rows, local, wrow in groups.groups:
        ii, jj = idx[:, :, None], idx[:, None, :]
        S = Sigma[ii, jj]
        try:
            np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            return None
        Sinv = np.linalg.inv(S)                                    # (n_g, m, m)
        if kc:
            A = np.matmul(Sinv[None], dS[:, ii, jj])               # (kc, n_g, m, m)
            Aw = (A * wpat[None, :, None, None]).reshape(kc, -1)
            Ic += 0.5 * Aw @ np.swapaxes(A, 2, 3).reshape(kc, -1).T
        if km:
            D = dM[:, rows[:, None], idx[local]].transpose(1, 2, 0)    # (R, m, km)
            SD = np.matmul(Sinv[local], D)                             # (R, m, km)
            Im += (D * wrow[:, None, None]).reshape(-1, km).T @ SD.reshape(-1, km)
    return _assemble(len(psi), cov, Ic, mean, Im)


# ---- the exact observed information (models linear in psi) -----------------------------
def _row_means(model, m):
    """The model-implied means per data row (nrows x P) from the matrices ``m``
    (no free loading or regression among latents: Lt = Lambda (I - B)^-1 with B fixed)."""
    Lt = m["lambda"]
    if np.any(m["beta"] != 0):
        Lt = Lt @ np.linalg.inv(np.eye(model.M) - m["beta"])
    X = model.prep.X
    MU = m["nu"] + X @ m["gy"].T
    if model._mean_lat:
        MU = MU + (m["alpha"] + X @ m["geta"].T) @ Lt.T
    return MU


def linear_in_psi(model) -> bool:
    """True where Sigma and the row means are linear in the parameters (no free
    loading or regression among latents), so that the observed information is
    exact from the first derivatives alone (:func:`observed_information`)."""
    return not model._lam_free


def observed_information(model, psi) -> np.ndarray | None:
    """The observed information -d2l/dpsi2 at psi, exact (no differencing of the
    gradient), for models linear in psi (:func:`linear_in_psi`; else None: the
    caller differences the gradient).  Per row r with observed variables O,
    residual e_r, s_r = Sigma_O^-1 e_r, and row mean derivatives D_k:

        I_kl = sum_r w_r [ (dSigma_k s_r)' Sigma_O^-1 (dSigma_l s_r)
                           + D_k' Sigma_O^-1 D_l
                           + (dSigma_k s_r)' Sigma_O^-1 D_l + (k <-> l) ]
               - sum_r w_r 1/2 tr(Sigma_O^-1 dSigma_k Sigma_O^-1 dSigma_l)

    (the second derivatives of Sigma and the means vanish).  None also where a
    pattern's Sigma_O is not positive definite.  The kernel
    (``_core.sem_observed_info``) unless the model's backend is "numpy"
    (:func:`observed_information_numpy`, the oracle)."""
    if not linear_in_psi(model):
        return None
    if getattr(model, "backend", "numpy") == "numpy" or _core is None:
        return observed_information_numpy(model, psi)
    got = _derivatives(model, psi)
    if got is None:
        return None
    Sigma, dS, cov, dM, mean = got
    d = model.prep
    resid = d.y - _row_means(model, model.matrices(psi))[d.obs_row, d.slot]
    Ic = np.zeros((len(cov), len(cov)))
    Im = np.zeros((len(mean), len(mean)))
    Icm = np.zeros((len(cov), len(mean)))
    if _core.sem_observed_info(d.pat_ptr, d.row_ptr, model._slot, np.ascontiguousarray(Sigma), dS, dM,
                               np.ascontiguousarray(resid), d.wrow, Ic, Im, Icm):
        return None
    return _assemble_observed(len(psi), cov, Ic, mean, Im, Icm)


def _assemble_observed(k, cov, Ic, mean, Im, Icm):
    info = np.zeros((k, k))
    info[np.ix_(cov, cov)] += Ic
    info[np.ix_(mean, mean)] += Im
    info[np.ix_(cov, mean)] += Icm
    info[np.ix_(mean, cov)] += Icm.T
    return 0.5 * (info + info.T)


def observed_information_numpy(model, psi) -> np.ndarray | None:
    """The NumPy version of :func:`observed_information` (patterns of one size
    stacked; the kernel's oracle)."""
    if not linear_in_psi(model):
        return None
    got = _derivatives(model, psi)
    if got is None:
        return None
    Sigma, dS, cov, dM, mean = got
    d = model.prep
    resid = d.y - _row_means(model, model.matrices(psi))[d.obs_row, d.slot]
    groups = getattr(model, "_pattern_groups", None)
    if groups is None:
        groups = model._pattern_groups = PatternGroups(d)
    kc, km = len(cov), len(mean)
    Ic = np.zeros((kc, kc))
    Im = np.zeros((km, km))
    Icm = np.zeros((kc, km))
    for idx, wpat, rows, local, wrow in groups.groups:
        ii, jj = idx[:, :, None], idx[:, None, :]
        m = idx.shape[1]
        try:
            np.linalg.cholesky(Sigma[ii, jj])
        except np.linalg.LinAlgError:
            return None
        Sinv = np.linalg.inv(Sigma[ii, jj])                        # (n_g, m, m)
        Sr = Sinv[local]                                           # (R, m, m)
        e = resid[d.row_ptr[rows][:, None] + np.arange(m)[None, :]]
        s = np.einsum("rab,rb->ra", Sr, e)                         # (R, m)
        if kc:
            G = dS[:, ii, jj]                                      # (kc, n_g, m, m)
            A = np.matmul(Sinv[None], G)
            Ic -= 0.5 * np.einsum("kgab,lgba,g->kl", A, A, wpat)
            V = np.einsum("krab,rb->kra", G[:, local], s)          # (kc, R, m)
            SV = np.einsum("rab,krb->kra", Sr, V)
            Ic += np.einsum("kra,lra,r->kl", V, SV, wrow)
        if km:
            D = dM[:, rows[:, None], idx[local]]                   # (km, R, m)
            SD = np.einsum("rab,krb->kra", Sr, D)
            Im += np.einsum("kra,lra,r->kl", D, SD, wrow)
            if kc:
                Icm += np.einsum("kra,lra,r->kl", V, SD, wrow)
    return _assemble_observed(len(psi), cov, Ic, mean, Im, Icm)
