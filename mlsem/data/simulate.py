"""Deterministic simulation of the seed's design: pupils i in schools j in
counties k, y = b0 + b x + U_k + V_jk + E_ijk."""
from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import MlsemError


def _range(v, name):
    if isinstance(v, (int, np.integer)):
        lo = hi = int(v)
    else:
        try:
            lo, hi = (int(a) for a in v)
        except (TypeError, ValueError):
            raise MlsemError(f"simulate: {name}={v!r} must be an integer or a (min, max) pair") from None
    if lo < 1 or hi < lo:
        raise MlsemError(f"simulate: {name}={v!r} must satisfy 1 <= min <= max")
    return lo, hi


def simulate(counties: int = 100, schools=2, pupils=2, *, intercept: float = 0.0,
             slope: float = 2.0, sd_county: float = 1.0, sd_school: float = 1.0,
             sd_resid: float = 1.0, school_cov=None, x: str = "uniform",
             seed: int = 1, regions: int | None = None) -> pl.DataFrame:
    """Long data with columns k, j, i, x, y (and ``region`` when ``regions``
    is given: counties split into that many contiguous blocks, for ``--by``).

    ``schools`` and ``pupils`` are a count or a (min, max) range drawn
    uniformly per county / per school.  ``school_cov`` (a J x J matrix) gives
    the school effects of slots 1..J a joint covariance instead of
    ``sd_school``; then ``schools`` may not exceed J.  ``x`` is "uniform"
    (0, 1) or "normal".  The same seed gives the same data."""
    if not isinstance(counties, (int, np.integer)) or counties < 1:
        raise MlsemError(f"simulate: counties={counties!r} must be an integer of at least 1")
    for nm, v in (("sd_county", sd_county), ("sd_school", sd_school), ("sd_resid", sd_resid)):
        if not (np.isfinite(v) and v >= 0):
            raise MlsemError(f"simulate: {nm}={v!r} must be a finite number >= 0")
    if regions is not None and (not isinstance(regions, (int, np.integer)) or not 1 <= regions <= counties):
        raise MlsemError(f"simulate: regions={regions!r} must be an integer between 1 and counties={counties}")
    s_lo, s_hi = _range(schools, "schools")
    p_lo, p_hi = _range(pupils, "pupils")
    rng = np.random.default_rng(seed)
    nsch = rng.integers(s_lo, s_hi + 1, size=counties)
    k_of_school = np.repeat(np.arange(1, counties + 1), nsch)
    j_of_school = _within(nsch)
    U = rng.normal(0.0, sd_county, size=counties)
    if school_cov is not None:
        C = np.asarray(school_cov, dtype=float)
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise MlsemError("simulate: school_cov must be a square matrix")
        if s_hi > C.shape[0]:
            raise MlsemError(f"simulate: school_cov is {C.shape[0]}x{C.shape[0]} but counties have up to {s_hi} schools")
        try:
            L = np.linalg.cholesky(C)
        except np.linalg.LinAlgError:
            raise MlsemError("simulate: school_cov is not positive definite") from None
        Vfull = rng.standard_normal((counties, C.shape[0])) @ L.T
        V = Vfull[k_of_school - 1, j_of_school - 1]
    else:
        V = rng.normal(0.0, sd_school, size=len(k_of_school))
    npup = rng.integers(p_lo, p_hi + 1, size=len(k_of_school))
    school = np.repeat(np.arange(len(k_of_school)), npup)
    i = _within(npup)
    n = len(school)
    if x == "uniform":
        xv = rng.uniform(0.0, 1.0, size=n)
    elif x == "normal":
        xv = rng.normal(0.0, 1.0, size=n)
    else:
        raise MlsemError(f"simulate: x={x!r} must be 'uniform' or 'normal'")
    e = rng.normal(0.0, sd_resid, size=n)
    y = intercept + slope * xv + U[k_of_school[school] - 1] + V[school] + e
    out = pl.DataFrame({"k": k_of_school[school].astype(np.int64), "j": j_of_school[school].astype(np.int64),
                        "i": i.astype(np.int64), "x": xv, "y": y})
    if regions is not None:
        # contiguous blocks of counties, as even as possible
        region = (np.arange(counties) * regions) // counties + 1
        out = out.with_columns(pl.Series("region", region[out["k"].to_numpy() - 1].astype(np.int64)))
    return out


def _within(sizes) -> np.ndarray:
    """1..n for each n in ``sizes``, concatenated (vectorised)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.arange(total, dtype=np.int64) - starts + 1


# Data sets shipped with the package (mlsem/datasets/*.parquet): copies of the
# reference cases the tests compare against, so that every documented example
# runs on data a fresh install has.  name -> one line of description.
DATASETS = {
    "seed_balanced": "the seed's design simulated: 100 counties x 2 schools x 2 pupils (k, j, i, x, y)",
    "unbalanced": "300 counties, 1-4 schools, 1-6 pupils; z a county-level covariate (k, j, i, x1, z, y)",
    "hetero_corr": "400 counties, 2 school types whose effects have unequal variances and a correlation",
    "pastes": "lme4's Pastes: strength of paste from 10 batches x 3 casks x 2 assays (batch, cask, strength)",
    "sleepstudy": "lme4's sleepstudy: reaction times (ms) of 18 subjects over 10 days (Reaction, Days, Subject)",
    "exam_factors": "mlmRev's Exam: 4,059 pupils in 65 schools, factor covariates sex, schgend, vr",
    "egsingle": "mlmRev's egsingle: yearly maths scores of 1,721 children in 60 Chicago schools",
    "hs_cfa": "Holzinger-Swineford x1-x9 (lavaan's example data), complete",
    "hs_cfa_missing": "the same with 10% of the cells missing at random",
    "iv_endogenous": "y, x endogenous, z an instrument (lavaan-style example)",
    "multivariate": "two outcomes y1, y2 of pupils in schools in counties; 10% of y2 missing",
    "unbalanced_weighted": "unbalanced with integer conditional weights w_k, w_j, w_i",
}


def example_data(name: str | None = None) -> pl.DataFrame:
    """The embedded example data.

    Without a name: the seed's design, 100 counties x 2 schools x 2 pupils,
    y = 2x + U + V + E (all sd 1), simulated with a fixed seed.  With a name:
    a shipped data set, one of ``mlsem.data.simulate.DATASETS`` (the reference
    cases whose lme4/lavaan estimates the tests compare against), e.g.
    ``mlsem.example_data("sleepstudy")``.
    """
    if name is None:
        return simulate(100, 2, 2, intercept=0.0, slope=2.0, seed=20240101)
    if name not in DATASETS:
        raise MlsemError(f"example_data: no data set {name!r}; the shipped ones are "
                         + ", ".join(sorted(DATASETS)))
    from importlib import resources
    with resources.as_file(resources.files("mlsem") / "datasets" / f"{name}.parquet") as path:
        return pl.read_parquet(path)
