"""Satterthwaite and Kenward-Roger df do not depend on the units of a covariate.
Before the fix the (pseudo-)inverse of the variance parameters' information was
thresholded on raw eigenvalues: with Days in units 1e4 times smaller the slope's df was
4,244 instead of 17, with Days 1e5 times larger the intercept's df was 8.8e34 (and inf
for Kenward-Roger).  The unscaled fit's df are checked against lmerTest and pbkrtest in
test_small_sample*.py."""
import numpy as np
import polars as pl
import pytest

import mlsem

FORMULA = "Reaction ~ Days + (1 + Days | Subject)"


@pytest.mark.parametrize("method", ["satterthwaite", "kenward-roger"])
def test_df_invariant_to_covariate_units(method):
    d = mlsem.example_data("sleepstudy")
    base = mlsem.fit(d, FORMULA, method="reml", df=method).params["df"].to_numpy()[:2]
    for s in (1e-4, 1e5):
        got = mlsem.fit(d.with_columns(pl.col("Days") * s), FORMULA, method="reml",
                        df=method).params["df"].to_numpy()[:2]
        np.testing.assert_allclose(got, base, rtol=1e-5)
