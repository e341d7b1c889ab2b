"""Bad survey input: each a clear MlsemError naming the column and the unit;
combinations that are refused."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError, SurveyDesign

FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


@pytest.fixture(scope="module")
def data():
    d = mlsem.example_data("unbalanced_weighted").with_columns(
        pl.col("w_k", "w_j", "w_i").cast(pl.Float64),
        ((pl.col("k") - 1) // 50 + 1).alias("stratum"), ((pl.col("k") - 1) // 2 + 1).alias("psu"))
    return d


def _set(d, col, value, **where):
    cond = pl.all_horizontal([pl.col(c) == v for c, v in where.items()])
    return d.with_columns(pl.when(cond).then(value).otherwise(pl.col(col)).alias(col))


def _fit(d, **kw):
    kw.setdefault("weights", W)
    return mlsem.fit(d, FORMULA, survey=SurveyDesign(**kw))


@pytest.mark.parametrize("value,word", [(None, "missing"), (0.0, "zero"), (-1.0, "negative"),
                                        (float("inf"), "infinite"), (float("nan"), "missing")])
def test_bad_school_weight(data, value, word):
    d = _set(data, "w_j", pl.lit(value, dtype=pl.Float64), k=8, j=2)
    with pytest.raises(MlsemError, match=rf"'w_j' has an? {word} value at k = 8, j = 2"):
        _fit(d)


@pytest.mark.parametrize("value,word", [(0.0, "zero"), (-2.0, "negative"), (None, "missing")])
def test_bad_pupil_weight(data, value, word):
    d = _set(data, "w_i", pl.lit(value, dtype=pl.Float64), k=12, j=1, i=2)
    with pytest.raises(MlsemError, match=rf"'w_i' has an? {word} value at the observation with "
                                         r"k = 12, j = 1"):
        _fit(d)


def test_bad_county_weight(data):
    d = _set(data, "w_k", pl.lit(-3.0), k=33)
    with pytest.raises(MlsemError, match=r"'w_k' has a negative value at k = 33"):
        _fit(d)


def test_weight_varies_within_its_unit(data):
    d = _set(data, "w_j", pl.lit(5.0), k=4, j=1, i=1)
    with pytest.raises(MlsemError, match=r"'w_j' \(level 'j'\) varies within k = 4, j = 1"):
        _fit(d)
    d = _set(data, "w_k", pl.lit(5.0), k=9, j=1)
    with pytest.raises(MlsemError, match=r"'w_k' \(level 'k'\) varies within k = 9 "):
        _fit(d)


def test_psu_in_two_strata(data):
    d = _set(data, "stratum", pl.lit(99), k=3)     # counties 3 and 4 form PSU 2
    with pytest.raises(MlsemError, match=r"PSU psu = 2 is in two strata \(stratum = 1, 99\)"):
        _fit(d, strata="stratum", psu="psu")


def test_top_unit_in_two_psus(data):
    d = _set(data, "psu", pl.lit(500), k=10, j=1)
    with pytest.raises(MlsemError, match=r"top-level unit k = 10 is in two PSUs"):
        _fit(d, strata="stratum", psu="psu")


def test_singleton_stratum(data):
    d = data.with_columns(pl.when(pl.col("psu") == 150).then(7).otherwise(pl.col("stratum")).alias("stratum"))
    with pytest.raises(MlsemError, match=r"stratum = 7 has a single PSU"):
        _fit(d, strata="stratum", psu="psu")
    # a design with one PSU in all
    with pytest.raises(MlsemError, match=r"single PSU"):
        _fit(data.with_columns(pl.lit(1).alias("one")), psu="one")
    res = _fit(d, strata="stratum", psu="psu", singleton="certainty")
    assert res.survey.df == 150 - 7


def test_fpc_below_sampled_psus(data):
    d = data.with_columns(pl.when(pl.col("stratum") == 3).then(20).otherwise(40).alias("npop"))
    with pytest.raises(MlsemError, match=r"fpc 'npop' = 20 in stratum 3 is below the 25 PSUs"):
        _fit(d, strata="stratum", psu="psu", fpc="npop")
    d = data.with_columns(pl.when(pl.col("k") == 5).then(41).otherwise(40).alias("npop"))
    with pytest.raises(MlsemError, match=r"has more than one value of 'npop'|varies within stratum"):
        _fit(d, strata="stratum", psu="psu", fpc="npop")


def test_design_form_errors(data):
    with pytest.raises(MlsemError, match=r"weights key 'school' is not a grouping column"):
        _fit(data, weights={"school": "w_j"})
    with pytest.raises(MlsemError, match=r"scale='sizes' is not one of"):
        SurveyDesign(weights=W, scale="sizes")
    with pytest.raises(MlsemError, match=r"singleton='drop' is not one of"):
        SurveyDesign(singleton="drop")
    with pytest.raises(MlsemError, match=r"must be a dict"):
        SurveyDesign(weights="w_k")
    with pytest.raises(MlsemError, match=r"column 'nope' is not in the data"):
        _fit(data, weights={"k": "nope"})
    with pytest.raises(MlsemError, match=r"selects no row"):
        _fit(data, subpop="z > 100")
    with pytest.raises(MlsemError, match=r"subpop column 'w_j' must be boolean or 0/1"):
        _fit(data, subpop="w_j")


@pytest.mark.parametrize("kw,msg", [
    (dict(method="reml"), r"method='reml' with survey="),
    (dict(method="adf"), r"method='adf' with survey="),
    (dict(vce="robust"), r"vce='robust' with survey="),
    (dict(weights="w_k"), r"weights= and survey= together"),
    (dict(effects={"j": {"variance": "slot"}}), r"relaxations\) are not supported with survey="),
    (dict(residuals={"correlation": "ar1"}), r"relaxations\) are not supported"),
    (dict(backend="dask"), r"backend='dask' is not supported with survey="),
    (dict(df="satterthwaite"), r"design degrees of freedom"),
])
def test_refused_combinations(data, kw, msg):
    with pytest.raises(MlsemError, match=msg):
        mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=W), **kw)


def test_lrtest_refused(data):
    a = _fit(data)
    b = mlsem.fit(data, "y ~ x1 + (1 | k/j)", survey=SurveyDesign(weights=W))
    with pytest.raises(MlsemError, match=r"lrtest: a fit with survey= maximises a pseudo-likelihood"):
        mlsem.lrtest(b, a)
    assert a.lr_ols == {}
    # Wald tests use the design-based covariance
    w = a.wald("z = 0")
    se = a.std_err[a.names.index("z")]
    assert w["chi2"] == pytest.approx((a.coef["z"] / se) ** 2, rel=1e-10)


def test_profile_and_bootstrap_refused(data):
    a = _fit(data)
    with pytest.raises(MlsemError, match=r"confint\(method='profile'\): a survey fit maximises"):
        a.confint(method="profile")
    with pytest.raises(MlsemError, match=r"bootstrap: the parametric bootstrap simulates from the model"):
        a.bootstrap(n=5)
    with pytest.raises(MlsemError, match=r"bootstrap: the parametric bootstrap"):
        a.confint(method="bootstrap", n=5)
    # Wald intervals: t on the design df for the coefficients
    ci = a.confint()
    from scipy import stats
    i = a.names.index("x1")
    q = stats.t.ppf(0.975, a.survey.df)
    assert ci["lower"][i] == pytest.approx(a.estimate[i] - q * a.std_err[i], rel=1e-12)


def test_wald_adjusted_f(data):
    """Stata's svy test: F = (d - q + 1) / (d q) chi2 on (q, d - q + 1) df."""
    from scipy import stats
    a = _fit(data, strata="stratum", psu="psu")
    w = a.wald(["x1 = 0", "z = 0"])
    d = 150 - 6
    assert w["design_df"] == d and w["df_den"] == d - 1
    assert w["F"] == pytest.approx((d - 1) / (2 * d) * w["chi2"], rel=1e-12)
    assert w["p_value_F"] == pytest.approx(stats.f.sf(w["F"], 2, d - 1), rel=1e-12)


def test_several_outcomes_refused(data):
    with pytest.raises(MlsemError, match=r"survey= with several outcomes"):
        mlsem.fit(data, [FORMULA, "x1 ~ z + (1 | k/j)"], survey=SurveyDesign(weights=W))
    with pytest.raises(MlsemError, match=r"outcomes= needs several outcomes"):
        mlsem.fit(data, FORMULA, outcomes={"k": "independent"}, survey=SurveyDesign(weights=W))
