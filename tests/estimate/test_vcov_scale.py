"""Standard errors do not depend on the units of the data.  Before the fix the condition
of the information was judged on the raw block: with x in units 1e7 times larger and y
1e3 times smaller the fixed-effect block looked singular, its pseudo-inverse gave the
intercept a standard error of 1.5e-15 (instead of 0.167 / 1e3)."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.estimate.optimize import vcov_from_information


def test_vcov_equivariant_under_diagonal_scaling():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(5, 5))
    B = A @ A.T + 5 * np.eye(5)
    d = np.array([1e-6, 1.0, 1e5, 1e9, 3.0])
    V = vcov_from_information(B, [np.arange(2), np.arange(2, 5)])
    Vs = vcov_from_information(B * np.outer(d, d), [np.arange(2), np.arange(2, 5)])
    np.testing.assert_allclose(Vs * np.outer(d, d), V, rtol=1e-10)


def test_singular_block_still_detected_after_scaling():
    """A block that is singular whatever the units (two copies of one column) keeps
    the pseudo-inverse: finite, and the identified direction's variance right."""
    B = np.array([[4.0, 4.0, 0.0], [4.0, 4.0, 0.0], [0.0, 0.0, 2.0]]) * np.outer([1, 1, 1e8], [1, 1, 1e8])
    V = vcov_from_information(B)
    assert np.all(np.isfinite(V))
    assert V[2, 2] == pytest.approx(0.5 / 1e16, rel=1e-10)


def test_standard_errors_follow_the_units():
    d = mlsem.example_data()
    r1 = mlsem.fit(d, "y ~ x + (1 | k/j)")
    d2 = d.with_columns(pl.col("x") * 1e7, pl.col("y") * 1e-3)
    r2 = mlsem.fit(d2, "y ~ x + (1 | k/j)")
    assert r2.converged
    unit = np.array([1e-3, 1e-10, 1e-6, 1e-6, 1e-6])   # Intercept, x, three variances
    np.testing.assert_allclose(r2.std_err, r1.std_err * unit, rtol=1e-4)
    np.testing.assert_allclose(r2.estimate, r1.estimate * unit, rtol=1e-5)
