"""Predictions of a several-outcome fit (issue 15): fitted(), residuals(), predict() on
the estimation rows and on new data, one row per (input row, outcome)."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import MlsemError

F = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]


def _long_outcomes(d):
    return (d.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
            .unpivot(index=["row", "x"], on=["y1", "y2"], variable_name="outcome", value_name="y"))


@pytest.mark.parametrize("index", [None, "i"])
def test_fitted_residuals_and_predict_agree(index):
    d = mlsem.example_data("multivariate")
    # a unit with no usable outcome (dropped) and one with y1 missing only
    d = d.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("x")).alias("x"),
                       pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("y1")).alias("y1"))
    r = mlsem.fit(d, F, index=index)
    f, e, m = r.fitted(), r.residuals(), r.residuals("marginal")
    assert f.height == e.height == m.height == r.nobs
    assert f.columns == ["k", "j", "row", "outcome", "fitted"]
    assert 3 not in f["row"].to_list()
    assert (f.filter(pl.col("row") == 5)["outcome"].to_list() == ["y2"])
    y = _long_outcomes(d)
    j = (f.join(e.select("row", "outcome", "residual"), on=["row", "outcome"])
         .join(m.select("row", "outcome", pl.col("residual").alias("marginal")), on=["row", "outcome"])
         .join(y, on=["row", "outcome"]))
    assert j.height == r.nobs
    np.testing.assert_allclose(j["y"] - j["fitted"], j["residual"], atol=1e-12)
    # the marginal residual from the coefficients by hand; the ids are the input row's
    est = dict(zip(r.names, r.estimate))
    xb = np.where(j["outcome"] == "y1", est["y1:Intercept"] + est["y1:x"] * j["x"],
                  est["y2:Intercept"] + est["y2:x"] * j["x"])
    np.testing.assert_allclose(j["y"] - xb, j["marginal"], atol=1e-10)
    ids = d.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)).select("row", "k", "j")
    assert f.select("row", "k", "j").join(ids, on="row").filter(
        (pl.col("k") != pl.col("k_right")) | (pl.col("j") != pl.col("j_right"))).height == 0
    # predict on the estimation rows and on the data as new data: the fitted values
    assert np.allclose(r.predict()["predicted"], f["fitted"])
    p = r.predict(d, se=True)
    assert p.height == 2 * d.height and p["predicted"].null_count() == 2      # row 3: x null
    jj = f.join(p.select("row", "outcome", "predicted"), on=["row", "outcome"])
    np.testing.assert_allclose(jj["fitted"], jj["predicted"], atol=1e-12)
    # population level: the fixed part only; an unseen county gets no effect
    pop = r.predict(d.head(2), random=False)
    assert pop["predicted"][0] == pytest.approx(est["y1:Intercept"] + est["y1:x"] * d["x"][0])
    new = r.predict(d.head(1).with_columns(pl.lit(10_000).alias("k")))
    assert new["predicted"][1] == pytest.approx(est["y2:Intercept"] + est["y2:x"] * d["x"][0])
    with pytest.raises(MlsemError, match="no id column 'j'"):
        r.predict(d.drop("j"))
