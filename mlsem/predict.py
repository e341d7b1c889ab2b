"""Empirical Bayes (BLUP) predictions of the random effects of a fitted model.

For one top-level unit (one row of the wide form) with observed slots o, the
latents eta it touches, loadings Lambda_o, residual r_o = y_o - X_o beta and
Sigma_o = Lambda_o Phi Lambda_o' + Theta_o, the posterior of eta given the
data at the estimates is normal with

    mean = Phi Lambda_o' Sigma_o^-1 r_o
    cov  = Phi - Phi Lambda_o' Sigma_o^-1 Lambda_o Phi

(beta, Phi, Theta held at their estimates).  That is lme4's
``ranef(fit, condVar = TRUE)``: the conditional modes and the conditional
variances given the data at the ML estimates.  Rows that share a missing
pattern share Lambda_o and Sigma_o, so the work is one Cholesky per pattern
and one matrix product for all its rows (a one-time pass; NumPy is enough).

Only latents that have data are reported (a school slot that a county does
not have is no school).  Each latent is mapped back to the real ids of its
unit through the data layer's frame (``prep.meta["frame"]``).
"""
from __future__ import annotations

import numpy as np
import polars as pl
from scipy import linalg

from .errors import MlsemError


def _pattern_posterior(Phi_m, Lam, Theta_o, R):
    """Posterior means (rows x m) and covariance (m x m) for one pattern.

    Phi_m (m x m), Lam (n x m), Theta_o (n,) diagonal or (n x n), R (rows x n)."""
    S = Lam @ Phi_m @ Lam.T
    if Theta_o.ndim == 1:
        S[np.diag_indices_from(S)] += Theta_o
    else:
        S += Theta_o
    c = linalg.cho_factor(S, lower=True, check_finite=False)
    PL = Phi_m @ Lam.T                    # m x n  (Phi Lambda')
    K = linalg.cho_solve(c, PL.T, check_finite=False).T  # m x n  (Phi Lambda' Sigma^-1)
    mean = R @ K.T
    cov = Phi_m - K @ PL.T
    return mean, 0.5 * (cov + cov.T)


def predict(res) -> pl.DataFrame:
    """Posterior means and standard deviations of every random effect.

    One row per unit of every level that has random effects and per effect:
    ``level`` (the id column naming the level), ``effect`` ("Intercept" or
    the covariate of a random slope), the id columns of the levels down to
    that level (null below it), ``latent`` (the latent's name in the model,
    e.g. ``j[2]`` for the school in slot 2), ``mean`` (the conditional mode
    = BLUP) and ``sd`` (the conditional standard deviation)."""
    model = getattr(res, "model", None)
    if model is None:
        raise MlsemError("predict: the result carries no model (was it loaded from a file?)")
    prep, table = model.prep, model.table
    if prep.nlatent == 0:
        raise MlsemError("predict: the model has no random effects")
    beta, Phi, Theta = model.matrices(np.asarray(res.estimate, dtype=float))
    resid = model.residuals(np.asarray(res.estimate, dtype=float))
    dense = Theta.ndim == 2
    row_ptr, pat_ptr = prep.row_ptr, prep.pat_ptr
    nl = prep.slot_lat.shape[1]
    out_row, out_lat, out_slot, out_mean, out_sd = [], [], [], [], []
    for p in range(prep.npatterns):
        r0, r1 = int(pat_ptr[p]), int(pat_ptr[p + 1])
        a, b = int(row_ptr[r0]), int(row_ptr[r0 + 1])
        slots = prep.slot[a:b]
        n = b - a
        lat_sl = prep.slot_lat[slots]                       # n x nl
        lats = np.unique(lat_sl[lat_sl >= 0])
        if len(lats) == 0:
            continue
        pos = {int(g): i for i, g in enumerate(lats)}
        Lam = np.zeros((n, len(lats)))
        # loadings are the same for every row of a pattern (random slopes make
        # each row its own pattern)
        for i in range(n):
            for c in range(nl):
                g = lat_sl[i, c]
                if g >= 0:
                    Lam[i, pos[int(g)]] += prep.load[a + i, c]
        Phi_m = Phi[np.ix_(lats, lats)]
        Th = Theta[np.ix_(slots, slots)] if dense else Theta[slots]
        counts = np.diff(row_ptr[r0:r1 + 1])
        if np.any(counts != n):
            raise MlsemError("internal: rows of one pattern differ in their number of observations")
        R = resid[row_ptr[r0]:row_ptr[r1]].reshape(r1 - r0, n)
        mean, cov = _pattern_posterior(Phi_m, Lam, Th, R)
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        # first slot of each latent in this pattern: the key to its real ids
        first_slot = np.empty(len(lats), dtype=np.int64)
        for g, i in pos.items():
            rows_i, _ = np.nonzero(lat_sl == g)
            first_slot[i] = slots[rows_i.min()]
        nr = r1 - r0
        out_row.append(np.repeat(np.arange(r0, r1), len(lats)))
        out_lat.append(np.tile(lats, nr))
        out_slot.append(np.tile(first_slot, nr))
        out_mean.append(mean.ravel())
        out_sd.append(np.tile(sd, nr))
    long = pl.DataFrame({
        "__rowid": np.concatenate(out_row).astype(np.uint32),
        "__lat": np.concatenate(out_lat).astype(np.int64),
        "__slot": np.concatenate(out_slot).astype(np.uint32),
        "mean": np.concatenate(out_mean),
        "sd": np.concatenate(out_sd),
    })
    frame = prep.meta["frame"]
    level_cols = [lv.name for lv in prep.levels]
    keys = frame.select(["__rowid", "__slot"] + level_cols).unique(["__rowid", "__slot"])
    keys = keys.with_columns(pl.col("__rowid").cast(pl.UInt32), pl.col("__slot").cast(pl.UInt32))
    long = long.join(keys, on=["__rowid", "__slot"], how="left")
    terms = prep.latent_term
    lat_level = np.array([d for d, _ in terms], dtype=np.int64)
    lat_eff = [e for _, e in terms]
    info = pl.DataFrame({
        "__lat": np.arange(len(terms), dtype=np.int64),
        "__depth": lat_level,
        "level": [level_cols[d] for d in lat_level],
        "effect": lat_eff,
        "latent": list(table.latent_names) if table.latent_names else list(prep.latent_names),
    })
    long = long.join(info, on="__lat", how="left")
    # ids below the unit's own level are not part of its key
    long = long.with_columns([
        pl.when(pl.col("__depth") >= d).then(pl.col(c)).otherwise(None).alias(c)
        for d, c in enumerate(level_cols)])
    return (long.sort(["__depth"] + level_cols + ["__lat"], nulls_last=True)
            .select(["level", "effect"] + level_cols + ["latent", "mean", "sd"]))
