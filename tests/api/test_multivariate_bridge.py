"""The SEM bridge with several outcomes (issue 15, item 4): the wide data and lavaan syntax
of mlsem.multilevel([f1, f2], d), fitted by mlsem.sem, are the multivariate fit."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import MlsemError

F = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]


@pytest.fixture(scope="module")
def data():
    # 40 counties (46 slots): mlsem.sem on the wide form stays quick
    return mlsem.example_data("multivariate").filter(pl.col("k") <= 40)


@pytest.mark.parametrize("index,outcomes", [(None, None), ("i", {"k": "independent"}),
                                            (None, {"residual": "independent"})])
def test_wide_sem_is_the_multivariate_fit(data, index, outcomes):
    r = mlsem.fit(data, F, index=index, outcomes=outcomes)
    spec = mlsem.multilevel(F, data, index=index, outcomes=outcomes)
    w = spec.to_wide()
    assert w.height == data["k"].n_unique()
    assert {"y1_1_1", "y2_1_1", "x_1_1"} <= set(w.columns)
    s = mlsem.sem(spec.to_syntax(), w)
    assert s.loglik == pytest.approx(r.loglik, rel=1e-9)
    est = dict(zip(s.names, s.estimate))
    for n, v in zip(r.names, r.estimate):
        assert est[spec.sem_name(n)] == pytest.approx(v, rel=1e-5, abs=1e-7), n
    if outcomes and "k" in outcomes:
        assert "L_k_y1 ~~ 0*L_k_y2" in spec.to_syntax()


def test_to_wide_function_and_other_data(data):
    w = mlsem.to_wide(data, F)
    assert w.equals(mlsem.multilevel(F, data).to_wide())
    # a covariate column holds the pupil's value also where one outcome is missing
    d = data.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("y2")).alias("y2"))
    w2 = mlsem.to_wide(d, F)
    assert w2["y2_1_1"][0] is None and w2["x_1_1"][0] == pytest.approx(d["x"][0])
    spec = mlsem.multilevel(F, data)
    with pytest.raises(MlsemError, match="slots or design columns differ"):
        spec.to_wide(mlsem.example_data("multivariate"))
    with pytest.raises(MlsemError, match="outcomes= needs several outcomes"):
        mlsem.multilevel(F[0], data, outcomes={"k": "independent"})
