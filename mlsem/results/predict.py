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
not have is no school); with several outcomes a unit with data has an effect on
every outcome, also on one it has no observed cell of (through the covariance
across outcomes, as nlme's ranef).  Each latent is mapped back to the real ids of its
unit through the data layer's frame (``prep.meta["frame"]``).

Predictions of the outcome (lme4's ``fitted()``, ``residuals()``,
``predict()``): the conditional fit of an observation is x'beta + z'b with
b the BLUPs of its groups (z: 1 for a random intercept, the slope's value
for a random slope); the marginal (population-level) fit is x'beta.  On new
data (``predict(res, newdata)``) the fixed part is encoded with the fit's
formulaic encoding (the same factor levels and transform states) and a
group the fit has not seen contributes 0 (lme4's ``allow.new.levels =
TRUE``).  The standard error of x'beta is sqrt(x' Cov(beta) x).
"""
from __future__ import annotations

import numpy as np
import polars as pl
from scipy import linalg

from ..errors import MlsemError


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


def _model_of(res, what, need_data=True):
    model = getattr(res, "model", None)
    if model is None:
        raise MlsemError(f"{what}: the result carries no model (was it loaded from a file?)")
    if getattr(res, "sem_labels", None) is not None:
        raise MlsemError(f"{what}: predictions are for multilevel fits (mlsem.fit), not for SEMs "
                         "in lavaan syntax (mlsem.sem)")
    if need_data and "frame" not in getattr(model.prep, "meta", {}):
        raise MlsemError(f"{what}: the data of a backend='dask' fit stay on the workers; fit in "
                         "process (the default backend) for predictions")
    return model


def _posterior(res):
    """The BLUPs as a long frame (__rowid, __lat, __slot, mean, sd) and z'b per
    observation (CSR order)."""
    model = _model_of(res, "random_effects")
    prep = model.prep
    psi = np.asarray(res.estimate, dtype=float)
    beta, Phi, Theta = model.matrices(psi)
    if hasattr(model, "theta_dense"):      # several outcomes: R per unit -> the slots' Theta
        Theta = model.theta_dense(Theta)
    resid = model.residuals(psi)
    zb = np.zeros(prep.nobs)
    if prep.nlatent == 0:
        return None, zb
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
        nout = int(getattr(model.table, "nout", 1))
        if nout > 1:
            # several outcomes (latent g * nout + o): a node's effect on an outcome it has no
            # cell of is still defined through the covariance across outcomes (E[u | data])
            lats = np.unique((lats // nout)[:, None] * nout + np.arange(nout)[None, :])
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
        zb[row_ptr[r0]:row_ptr[r1]] = (mean @ Lam.T).ravel()
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        # first slot of each latent in this pattern: the key to its real ids
        first_slot = np.empty(len(lats), dtype=np.int64)
        for g, i in pos.items():
            rows_i, _ = np.nonzero(lat_sl == g)
            if len(rows_i) == 0:       # no cell of this outcome: a sibling outcome's slot
                rows_i, _ = np.nonzero((lat_sl >= 0) & (lat_sl // nout == g // nout))
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
    return long, zb


def random_effects(res) -> pl.DataFrame:
    """Posterior means and standard deviations of every random effect.

    One row per unit of every level that has random effects and per effect:
    ``level`` (the id column naming the level), ``effect`` ("Intercept" or
    the covariate of a random slope; for several outcomes the outcome whose
    random intercept it is), the id columns of the levels down to
    that level (null below it), ``latent`` (the latent's name in the model,
    e.g. ``j[2]`` for the school in slot 2), ``mean`` (the conditional mode
    = BLUP) and ``sd`` (the conditional standard deviation)."""
    model = _model_of(res, "random_effects")
    prep, table = model.prep, model.table
    if prep.nlatent == 0:
        raise MlsemError("random_effects: the model has no random effects")
    long, _ = _posterior(res)
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


# ---- predictions of the outcome ------------------------------------------------------
def _fixed_cov(res, model):
    """(E, C): E (q x f) maps the design's columns to the f fixed-effect
    parameters, C their covariance (f x f) under the fit's vce."""
    bp = np.asarray(model.table.beta_param, dtype=np.int64)
    fp = np.unique(bp)
    E = (bp[:, None] == fp[None, :]).astype(np.float64)
    C = np.asarray(res.cov, dtype=float)[np.ix_(fp, fp)]
    return E, C


def _se(X, E, C):
    A = X @ E
    return np.sqrt(np.clip(np.einsum("ij,jk,ik->i", A, C, A), 0.0, None))


def _estimation_rows(res, model, values: dict) -> pl.DataFrame:
    """``values`` (arrays in CSR order) with the id columns and ``row`` (the
    0-based row of the input data), in the input row order."""
    prep = model.prep
    frame = prep.meta["frame"]
    level_cols = [lv.name for lv in prep.levels]
    outs = prep.meta.get("outcomes") if getattr(model.table, "nout", 1) > 1 else None
    if outs is not None:
        # several outcomes: one row per observed cell, its unit's input row and outcome
        s = frame["__mlsem_row"].cast(pl.Int64).to_numpy()
        nout = len(outs)
        unit_rows = np.asarray(prep.meta["unit_rows"], dtype=np.int64)
        out = frame.select(level_cols).with_columns(
            pl.Series("row", unit_rows[s // nout]),
            pl.Series("outcome", np.asarray(outs, dtype=object)[s % nout].tolist(), dtype=pl.String),
            pl.Series("__o", s % nout))
        out = out.with_columns([pl.Series(k, v) for k, v in values.items()])
        return out.sort("row", "__o").drop("__o")
    out = frame.select(level_cols + [pl.col("__mlsem_row").cast(pl.Int64).alias("row")])
    out = out.with_columns([pl.Series(k, v) for k, v in values.items()])
    return out.sort("row")


def fitted(res) -> pl.DataFrame:
    """Conditional fitted values x'beta + z'b of the estimation rows (lme4's
    ``fitted()``): the id columns, ``row`` (the input row) and ``fitted``."""
    model = _model_of(res, "fitted")
    _, zb = _posterior(res)
    xb = model.prep.y - model.residuals(np.asarray(res.estimate, dtype=float))
    return _estimation_rows(res, model, {"fitted": xb + zb})


def residuals(res, kind: str = "conditional") -> pl.DataFrame:
    """y minus the conditional fit x'beta + z'b (``kind="conditional"``, lme4's
    ``residuals()``) or minus the marginal fit x'beta (``"marginal"``), on the
    estimation rows: the id columns, ``row`` and ``residual``."""
    if kind not in ("conditional", "marginal"):
        raise MlsemError(f"residuals: kind={kind!r} is not 'conditional' or 'marginal'")
    model = _model_of(res, "residuals")
    r = model.residuals(np.asarray(res.estimate, dtype=float))
    if kind == "conditional":
        r = r - _posterior(res)[1]
    return _estimation_rows(res, model, {"residual": r})


def predict(res, newdata=None, random: bool = True, se: bool = False) -> pl.DataFrame:
    """Predicted outcome: x'beta + z'b with the BLUPs b of the groups the fit has
    seen (``random=True``; an unseen group contributes 0), or x'beta
    (``random=False``).  ``se=True`` adds ``se``, the standard error of x'beta,
    sqrt(x' Cov(beta) x).

    Without ``newdata``: the estimation rows (id columns, ``row``,
    ``predicted``).  With ``newdata`` (anything :func:`mlsem.fit` reads): every
    row of it, in its order, with the id columns it has and ``predicted`` (null
    where a covariate is null); factors are encoded with the fit's levels, and
    a level the fit has not seen is an error naming the column and the level."""
    if not isinstance(random, bool) or not isinstance(se, bool):
        raise MlsemError(f"predict: random= and se= take True or False, got {random!r}, {se!r}")
    model = _model_of(res, "predict", need_data=newdata is None or random)
    prep = model.prep
    psi = np.asarray(res.estimate, dtype=float)
    beta = psi[np.asarray(model.table.beta_param, dtype=np.int64)]
    if newdata is None:
        xb = prep.y - model.residuals(psi)
        vals = {"predicted": xb + _posterior(res)[1] if random else xb}
        if se:
            vals["se"] = _se(prep.X, *_fixed_cov(res, model))
        return _estimation_rows(res, model, vals)
    enc = getattr(res, "encoding", None)
    if enc is None:
        raise MlsemError("predict(newdata=): the result carries no formula encoding (fit by "
                         "mlsem.fit in this session)")
    if isinstance(enc, (list, tuple)):
        return _predict_several(res, model, newdata, enc, random, se)
    names = (["Intercept"] if enc.intercept else []) + enc.fixed
    if list(prep.xnames) != names:
        raise MlsemError("predict(newdata=): the fit's fixed part has group-specific coefficients "
                         f"(columns {', '.join(prep.xnames)}); predict on the estimation rows "
                         "(newdata=None) instead")
    level_cols = [lv.name for lv in prep.levels]
    df, ids = _read_newdata(newdata, list(enc.variables), level_cols, random and prep.nlatent)
    rows, X, S = enc.design(df, with_outcome=False)
    pred = X @ beta
    if random and prep.nlatent:
        blups = random_effects(res)
        for col, e, m in _blups_of_rows(df, rows, level_cols, blups):
            pred = pred + (m if e == "Intercept" else m * S[e])
    full = np.full(df.height, np.nan)
    full[rows] = pred
    pred_col = pl.Series("predicted", full, nan_to_null=True)
    out = df.select(ids).with_columns(pred_col) if ids else pl.DataFrame(pred_col)
    if se:
        v = np.full(df.height, np.nan)
        v[rows] = _se(X, *_fixed_cov(res, model))
        out = out.with_columns(pl.Series("se", v, nan_to_null=True))
    return out


def _read_newdata(newdata, need, level_cols, with_ids):
    """(the columns of newdata the prediction reads, the id columns it has); errors
    name a missing covariate, or a missing id column when BLUPs are wanted."""
    from ..data.prepare import scan
    lf = scan(newdata)
    try:
        schema = lf.collect_schema()
    except Exception as exc:
        raise MlsemError(f"predict: cannot read newdata: {exc}") from None
    missing = [c for c in need if c not in schema]
    if missing:
        raise MlsemError(f"predict: newdata has no column {missing[0]!r} (the model reads "
                         f"{', '.join(map(repr, need))})")
    ids = [c for c in level_cols if c in schema]
    if with_ids and len(ids) < len(level_cols):
        absent = [c for c in level_cols if c not in schema]
        raise MlsemError(f"predict: newdata has no id column {absent[0]!r}; give it, or "
                         "predict at the population level with random=False")
    return lf.select(list(dict.fromkeys(ids + need))).collect(), ids


def _blups_of_rows(df, rows, level_cols, blups, effect=None):
    """(level, effect, BLUP of each kept row of df) for every (level, effect) of the
    fit's BLUPs (only ``effect`` if given), joined on the ids of that level; 0 for a
    group the fit has not seen."""
    keys = df.filter(pl.Series(rows)).select(level_cols).with_row_index("__i")
    for d, col in enumerate(level_cols):
        ids_d = level_cols[:d + 1]
        at = blups.filter(pl.col("level") == col)
        effects = [effect] if effect is not None else at["effect"].unique(maintain_order=True).to_list()
        for e in effects:
            b = at.filter(pl.col("effect") == e).select(ids_d + ["mean"])
            if b.height == 0:
                continue
            try:
                k = keys.select(["__i"] + ids_d).with_columns([pl.col(c).cast(b.schema[c]) for c in ids_d])
            except Exception:
                raise MlsemError(f"predict: newdata's id column {col!r} is {keys.schema[col]}, the "
                                 f"fit's is {b.schema[col]}") from None
            yield col, e, k.join(b, on=ids_d, how="left").sort("__i")["mean"].fill_null(0.0).to_numpy()


def _predict_several(res, model, newdata, encs, random, se):
    """predict(newdata) of a several-outcome fit: every row of newdata once per outcome
    (``row``: its 0-based row, ``outcome``), each outcome's own fixed part and, with
    ``random``, the BLUPs of its effects at the groups the fit has seen."""
    prep = model.prep
    t = model.table
    outs = list(t.outcomes)
    psi = np.asarray(res.estimate, dtype=float)
    beta = psi[np.asarray(t.beta_param, dtype=np.int64)]
    level_cols = [lv.name for lv in prep.levels]
    need = list(dict.fromkeys(v for e in encs for v in e.variables))
    df, ids = _read_newdata(newdata, need, level_cols, random and prep.nlatent)
    blups = random_effects(res) if (random and prep.nlatent) else None
    E, C = _fixed_cov(res, model) if se else (None, None)
    parts = []
    for o, (name, enc) in enumerate(zip(outs, encs)):
        rows, X, _ = enc.design(df, with_outcome=False)
        cols = np.asarray(t.beta_cols[o], dtype=np.int64)
        pred = X @ beta[cols] if len(cols) else np.zeros(int(np.sum(rows)))
        if blups is not None:
            for _, e, m in _blups_of_rows(df, rows, level_cols, blups, effect=name):
                pred = pred + m
        full = np.full(df.height, np.nan)
        full[rows] = pred
        part = df.select(ids).with_columns(
            pl.Series("row", np.arange(df.height, dtype=np.int64)),
            pl.lit(name).alias("outcome"), pl.Series("predicted", full, nan_to_null=True))
        if se:
            Xf = np.zeros((int(np.sum(rows)), model.q))
            Xf[:, cols] = X
            v = np.full(df.height, np.nan)
            v[rows] = _se(Xf, E, C)
            part = part.with_columns(pl.Series("se", v, nan_to_null=True))
        parts.append(part.with_columns(pl.lit(o).alias("__o")))
    return pl.concat(parts).sort("row", "__o").drop("__o")
