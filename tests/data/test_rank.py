"""Rank-deficient fixed-effect designs (mlsem.data.rank, mlsem.data.encode):
the columns that are linear combinations of earlier ones are dropped, with a
RankDeficiencyWarning and a note in the results, and the rest is fitted, as
lme4 does.

Reference: extra/lme4_rank.json (extra/make_rank.sh: lme4 1.1-31 on
exam_factors): `sex * schgend` (boys' schools have no girls and girls' schools
no boys: lme4 drops two interaction columns) and `standLRT + I(2 * standLRT)`,
ML and REML.
"""
import json
import warnings

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import RankDeficiencyWarning
from mlsem.data.rank import deficient_columns
from conftest import REF, lme4_name

RANK_REF = json.loads((REF / "extra" / "lme4_rank.json").read_text())
FACTORS = ("sex", "schgend", "vr")


def _formulaic_name(name):
    """lme4's name -> formulaic's ("sexM:schgendgirls" -> "sex[T.M]:schgend[T.girls]")."""
    return lme4_name(name, FACTORS)


@pytest.fixture(scope="module")
def exam():
    return pl.read_parquet(REF / "exam_factors.parquet")


@pytest.mark.parametrize("case", sorted(RANK_REF["cases"]))
@pytest.mark.parametrize("method", ["ml", "reml"])
def test_matches_lme4_dropping_the_same_columns(exam, case, method):
    c = RANK_REF["cases"][case]
    ref = c[method]
    with pytest.warns(RankDeficiencyWarning) as rec:
        res = mlsem.fit(exam, c["formula"], method=method)
    names = [ref["dropped"]] if isinstance(ref["dropped"], str) else ref["dropped"]  # (JSON unboxes 1)
    dropped = [_formulaic_name(n) for n in names]
    assert res.encoding.dropped == dropped
    assert all(n in str(rec[0].message) for n in dropped)
    assert any(all(n in note for n in dropped) for note in res.notes)
    assert res.converged and res.identified
    assert abs(res.loglik - ref["loglik"]) <= 1e-8 * abs(ref["loglik"])
    coef, se = res.coef, dict(zip(res.names, res.std_err))
    fixed = [n for n, k in zip(res.names, res.kinds) if k == "fixed"]
    assert fixed == [_formulaic_name(n) for n in ref["fixef"]]
    for k, v in ref["fixef"].items():
        n = _formulaic_name(k)
        assert abs(coef[n] - v) <= 1e-5 * max(1.0, abs(v)), n
        assert abs(se[n] - ref["se"][k]) <= 1e-4 * ref["se"][k], n


def test_predict_and_summary_use_the_kept_columns(exam):
    with pytest.warns(RankDeficiencyWarning):
        res = mlsem.fit(exam, "normexam ~ standLRT + sex * schgend + (1 | school)")
    new = exam.head(20)
    pred = res.predict(new, random=False)["predicted"].to_numpy()
    coef = res.coef
    sexm = (new["sex"] == "M").to_numpy()
    girls = (new["schgend"] == "girls").to_numpy()
    mixed = (new["schgend"] == "mixed").to_numpy()
    by_hand = (coef["Intercept"] + coef["standLRT"] * new["standLRT"].to_numpy()
               + coef["sex[T.M]"] * sexm + coef["schgend[T.girls]"] * girls
               + coef["schgend[T.mixed]"] * mixed)
    np.testing.assert_allclose(pred, by_hand, rtol=1e-12, atol=1e-12)
    assert "dropped from the fixed part" in res.summary()


def test_plain_numeric_columns_and_a_zero_column():
    d = mlsem.example_data()
    d = d.with_columns((2.0 * pl.col("x") - 1.0).alias("x2"), pl.lit(0.0).alias("zero"))
    with pytest.warns(RankDeficiencyWarning, match=r"2 columns \(x2, zero\)"):
        res = mlsem.fit(d, "y ~ x + x2 + zero + (1 | k/j)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)
        base = mlsem.fit(d, "y ~ x + (1 | k/j)")
    assert res.names == base.names
    assert res.loglik == pytest.approx(base.loglik, rel=1e-12)
    np.testing.assert_allclose(res.std_err, base.std_err, rtol=1e-8)
    assert res.identified


def test_several_outcomes_drop_per_outcome(exam):
    noise = np.random.default_rng(5).normal(size=exam.height)
    d = exam.with_columns((pl.col("normexam") * 0.5 + pl.col("standLRT") + pl.Series(noise)).alias("y2"))
    with pytest.warns(RankDeficiencyWarning):
        res = mlsem.fit(d, ["normexam ~ standLRT + I(2 * standLRT) + (1 | school)",
                            "y2 ~ standLRT + (1 | school)"])
    assert res.converged
    assert "normexam:I(2 * standLRT)" not in res.names
    assert "normexam:standLRT" in res.names
    assert any(n.startswith("normexam: I(2 * standLRT) dropped") for n in res.notes)


def test_full_rank_designs_drop_nothing():
    rng = np.random.default_rng(3)
    n = 5000
    x, z = rng.normal(size=n), rng.normal(size=n)
    assert deficient_columns([None, x, z], n) == []
    assert deficient_columns([None, x, x + 1e-5 * z], n) == []       # near, not exactly, collinear
    assert deficient_columns(np.column_stack([np.ones(n), x, 1e6 * z])) == []   # scales differ


def test_deficient_columns_left_to_right():
    rng = np.random.default_rng(4)
    n = 300_000            # more rows than one QR chunk
    x, z = rng.normal(size=n), rng.normal(size=n)
    assert deficient_columns([None, x, 2.0 * x]) == [2]
    assert deficient_columns([None, x, np.zeros(n), z, x + z - 3.0]) == [2, 4]
    assert deficient_columns([None, 5.0 * np.ones(n), x]) == [1]
    assert deficient_columns([x, 1e-9 * x]) == [1]
    # the same dependence hidden by scale: x in units 1e8 larger
    assert deficient_columns([None, 1e8 * x, x + 2.0]) == [2]
