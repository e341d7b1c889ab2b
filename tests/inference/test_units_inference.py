"""Score tests and profile intervals do not depend on the outcome's units.  Before the
fixes, with y in units 1e5 times smaller (variances ~1e-10) every variance counted as
at its bound of 0 in the score tests (an absolute 1e-7), which changed every statistic,
and the profile intervals of the variances stopped their bracket at an absolute 1e-10
(lower limits off by 0.7%)."""
import numpy as np
import polars as pl
import pytest

import mlsem

FORMULA = "y ~ x + (1 | k/j)"


@pytest.fixture(scope="module")
def fits():
    d = mlsem.example_data()
    return {s: mlsem.fit(d.with_columns(pl.col("y") * s), FORMULA) for s in (1.0, 1e-5, 1e4)}


def test_score_tests_follow_the_units(fits):
    base = fits[1.0].score_tests()["chi2"].to_numpy()
    for s in (1e-5, 1e4):
        got = fits[s].score_tests()["chi2"].to_numpy()
        np.testing.assert_allclose(got, base, rtol=1e-3, atol=1e-9)


def test_profile_intervals_follow_the_units(fits):
    unit = {"Intercept": 1, "x": 1, "var(k)": 2, "var(j)": 2, "var(Residual)": 2}
    base = fits[1.0].confint("profile")
    for s in (1e-5, 1e4):
        ci = fits[s].confint("profile")
        assert ci["name"].to_list() == base["name"].to_list()
        for col in ci.columns[1:3]:
            scale = np.array([s ** unit[n] for n in ci["name"]])
            np.testing.assert_allclose(ci[col].to_numpy() / scale, base[col].to_numpy(), rtol=1e-5)
