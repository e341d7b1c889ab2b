"""Empirical Bayes predictions against lme4's ranef(condVar = TRUE).

lme4's conditional modes are the posterior means of the spherical random
effects mapped back to b, and its ``postVar`` is the conditional variance of
b given y at the ML estimates (beta, theta, sigma held fixed), which is
exactly Phi - Phi Lambda' Sigma^-1 Lambda Phi: the two scales agree, no
rescaling is needed.  Reference: tests/reference/extra/lme4_extra.json
(key ``ranef``; made by make_extra.R with lme4 1.1-31)."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.results.predict import random_effects
from conftest import REF, load_case

EXTRA = json.loads((REF / "extra" / "lme4_extra.json").read_text())
CASES = ["seed_balanced", "unbalanced", "pastes"]


@pytest.fixture(scope="module", params=CASES)
def predicted(request):
    case = load_case(request.param)
    res = mlsem.fit(REF / case["data"], case["formula"])
    return request.param, res, random_effects(res)


def test_matches_lme4_ranef(predicted):
    name, res, pred = predicted
    ext = EXTRA[name]
    top, inner = ext["levels"]
    assert res.converged
    for grp, rows in ext["ranef"]["factors"].items():
        ref = pl.DataFrame(rows)
        if ":" in grp:
            ours = pred.filter(pl.col("level") == inner)
            ref = ref.rename({"top_id": top, "inner_id": inner})
            on = [top, inner]
        else:
            ours = pred.filter(pl.col("level") == top)
            ref = ref.rename({"top_id": top})
            on = [top]
        assert ours.height == ref.height, grp
        m = ours.join(ref, on=on, how="inner")
        assert m.height == ref.height, grp
        assert (m["mean"] - m["mode"]).abs().max() < 1e-4, grp
        assert (m["sd"] - m["cond_sd"]).abs().max() < 1e-4, grp


def test_shape_and_method(predicted):
    name, res, pred = predicted
    top, inner = EXTRA[name]["levels"]
    assert pred.columns == ["level", "effect", top, inner, "latent", "mean", "sd"]
    assert pred.filter(pl.col("level") == top)[inner].null_count() == pred.filter(pl.col("level") == top).height
    assert pred.filter(pl.col("level") == inner)[inner].null_count() == 0
    assert res.random_effects().equals(pred)
    assert mlsem.random_effects(res).equals(pred)
    assert not callable(getattr(mlsem, "predict", None))  # no module-level predict returning BLUPs


def brute_force(res, pred, r):
    """The plain formula on top unit ``r``'s dense covariance, against ``pred``."""
    m = res.model
    prep = m.prep
    beta, Phi, Theta = m.matrices(res.estimate)
    a, b = prep.row_ptr[r], prep.row_ptr[r + 1]
    L = np.zeros((b - a, prep.nlatent))
    for i in range(b - a):
        for c in range(prep.slot_lat.shape[1]):
            g = prep.slot_lat[prep.slot[a + i], c]
            if g >= 0:
                L[i, g] += prep.load[a + i, c]
    S = L @ Phi @ L.T + np.diag(Theta[prep.slot[a:b]])
    resid = prep.y[a:b] - prep.X[a:b] @ beta
    K = Phi @ L.T @ np.linalg.inv(S)
    mean = K @ resid
    cov = Phi - K @ L @ Phi
    top = prep.levels[0].name
    got = pred.filter(pl.col(top) == prep.top_ids[r])
    touched = np.flatnonzero(np.abs(L).sum(axis=0) > 0)
    assert sorted(prep.latent_names.index(n) for n in got["latent"]) == sorted(touched)
    for row in got.iter_rows(named=True):
        g = prep.latent_names.index(row["latent"])
        assert abs(row["mean"] - mean[g]) < 1e-10
        assert abs(row["sd"] - np.sqrt(cov[g, g])) < 1e-10
    return got


def test_against_brute_force_random_slopes():
    """Random slopes: each row its own pattern."""
    res = mlsem.fit(REF / "unbalanced.parquet", "y ~ x1 + z + (1 + x1 || k) + (1 | k:j)")
    pred = random_effects(res)
    for r in (0, 5, 77):
        got = brute_force(res, pred, r)
        assert set(got["effect"]) == {"Intercept", "x1"}


def test_three_levels_and_global_ids():
    """k/j/h with j a global id (unique in the whole data): the rows carry the
    real ids, one row per unit of every level."""
    rng = np.random.default_rng(1)
    rows = []
    for k in range(40):
        for j in range(rng.integers(1, 4)):
            for h in range(rng.integers(1, 3)):
                for i in range(rng.integers(1, 4)):
                    rows.append((k, 100 + 10 * k + j, h + 1, rng.normal()))
    d = pl.DataFrame(rows, schema=["k", "j", "h", "x"], orient="row")
    u = rng.normal(size=40)
    d = d.with_columns((pl.col("x") + pl.Series(u[d["k"].to_numpy()]) + pl.Series(rng.normal(size=d.height))).alias("y"))
    res = mlsem.fit(d, "y ~ x + (1 | k/j/h)")
    pred = random_effects(res)
    counts = dict(pred.group_by("level").len().iter_rows())
    assert counts == {"k": 40, "j": d.select("k", "j").n_unique(), "h": d.select("k", "j", "h").n_unique()}
    units = pred.filter(pl.col("level") == "h").select("k", "j", "h").sort("k", "j", "h")
    assert units.equals(d.select("k", "j", "h").unique().sort("k", "j", "h"))
    assert pred.filter(pl.col("level") == "j")["j"].min() >= 100
    for r in (0, 13, 39):
        brute_force(res, pred, r)
