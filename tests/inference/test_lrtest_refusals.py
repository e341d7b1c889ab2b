"""lrtest refuses comparisons that are not likelihood-ratio tests, saying why:
different outcomes or observations (before counting parameters), and REML fits
with different fixed effects (lme4's anova() refits those by ML)."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError


@pytest.fixture(scope="module")
def data():
    d = mlsem.example_data()
    return d.with_columns(pl.Series("z", np.random.default_rng(1).normal(size=d.height)),
                          (2.0 * pl.col("y")).alias("y2"))


def test_different_outcomes_are_named_first(data):
    a = mlsem.fit(data, "y ~ x + (1 | k/j)")
    b = mlsem.fit(data, "y2 ~ x + (1 | k/j)")     # same number of parameters
    with pytest.raises(MlsemError, match=r"not nested: outcome 'y' on 400 observations vs 'y2' on 400"):
        mlsem.lrtest(a, b)


def test_reml_fits_with_different_fixed_effects(data):
    a = mlsem.fit(data, "y ~ x + (1 | k/j)", method="reml")
    b = mlsem.fit(data, "y ~ x + z + (1 | k/j)", method="reml")
    with pytest.raises(MlsemError, match=r"REML fits with different fixed effects .* method='ml'"):
        mlsem.lrtest(a, b)
    # the same fixed effects: a test of the variance part, allowed
    c = mlsem.fit(data, "y ~ x + (x | k) + (1 | k:j)", method="reml")
    assert mlsem.lrtest(a, c).df == 2
    # by ML the fixed effects are tested
    t = mlsem.lrtest(mlsem.fit(data, "y ~ x + (1 | k/j)"), mlsem.fit(data, "y ~ x + z + (1 | k/j)"))
    assert t.df == 1 and 0.0 <= t.p_value <= 1.0
