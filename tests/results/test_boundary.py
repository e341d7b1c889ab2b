"""Boundary (singular) fits: a random-effect covariance block singular at the estimate
is said as such (lme4's "singular fit"), and when it makes the information singular the
summary says why its parameters have no standard errors instead of calling the model
not identified."""
import numpy as np
import polars as pl

import mlsem
from mlsem.results.boundary import singular_blocks


def test_blocks_found():
    names = ["Intercept", "var(k:Intercept)", "cov(k:Intercept,k:t)", "var(k:t)", "var(j)", "var(Residual)"]
    kinds = ["fixed", "var", "cov", "var", "var", "var"]
    # corr -1 at k, var(j) = 0
    est = [1.0, 4.0, -6.0, 9.0, 0.0, 1.0]
    got = singular_blocks(names, kinds, est)
    assert [g[0] for g in got] == ["k", "j"]
    assert "corr(k:Intercept,k:t) = -1.0000" in got[0][2]
    assert set(got[0][1]) == {"var(k:Intercept)", "cov(k:Intercept,k:t)", "var(k:t)"}
    assert got[1][2] == "var(j) = 0"
    # a regular block, a residual variance at 0 is not a random effect
    assert singular_blocks(names, kinds, [1.0, 4.0, -3.0, 9.0, 0.5, 0.0]) == []


def test_several_outcomes_block():
    names = ["y1:Intercept", "var(k:y1)", "cov(k:y1,k:y2)", "var(k:y2)", "var(Residual:y1)"]
    kinds = ["fixed", "var", "cov", "var", "var"]
    assert singular_blocks(names, kinds, [0.0, 1.0, 0.5, 1.0, 1.0]) == []
    got = singular_blocks(names, kinds, [0.0, 1.0, 1.0, 1.0, 1.0])
    assert got and got[0][0] == "k" and "= 1.0000" in got[0][2]


def _uncentred_slope_data():
    rng = np.random.default_rng(11)
    rows = []
    for c in range(80):
        u = rng.normal(0, 3e4)
        for _ in range(rng.integers(4, 25)):
            year = int(rng.integers(1990, 2021))
            inc = rng.lognormal(10, 1)
            y = 2e5 + 1500 * (year - 2000) + 0.8 * inc + u + rng.normal(0, 2e4)
            rows.append(dict(county=c, year=year, income=inc, price=y))
    return pl.DataFrame(rows)


def test_uncentred_slope_is_a_boundary_fit_not_unidentified():
    r = mlsem.fit(_uncentred_slope_data(), "price ~ year + income + (1 + year | county)")
    assert r.converged
    assert [b[0] for b in r.boundary] == ["county"]
    text = r.summary()
    assert "boundary (singular) fit" in text
    assert "NOT identified" not in text
    d = r.to_dict()
    assert d["boundary"][0]["level"] == "county"
