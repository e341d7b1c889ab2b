"""mlsem.fit(..., survey=SurveyDesign(...)): lme4 on the replicated data (issue
17's must-show), the scalings against pre-scaled weights, the top-level-only
design against vce=('cluster', top id), subpopulations."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError, SurveyDesign

from conftest import REF as REFDIR, ROOT

REF = json.loads((REFDIR / "survey_replicated.json").read_text())
FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


@pytest.fixture(scope="module")
def data():
    return mlsem.example_data("unbalanced_weighted")


def _ours(res):
    e = res.coef
    return {"(Intercept)": e["Intercept"], "x1": e["x1"], "z": e["z"], "k": e["var(k)"],
            "j:k": e["var(j)"], "Residual": e["var(Residual)"]}


@pytest.mark.parametrize("key", ["k", "j", "obs", "all"])
def test_replicated_data_lme4(data, key):
    """Integer weights, scale='none' = lme4's ML fit on the replicated data."""
    r = REF["survey"][key]
    w = W if key == "all" else {key: W[key]}
    res = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=w, scale="none"))
    assert res.converged
    assert res.loglik == pytest.approx(r["loglik"], rel=1e-6)
    ours = _ours(res)
    for name, v in {**r["fixed"], **r["variances"]}.items():
        assert ours[name] == pytest.approx(v, rel=1e-5), name
    # the weighted count of observations is the replicated data's
    assert res.survey.weighted_counts[-1] == pytest.approx(r["nobs"])


def _prescaled(data, how):
    """w_j within k and w_i within (k, j), scaled by the documented formulas."""
    def sc(col, by):
        w = pl.col(col).cast(pl.Float64)
        if how == "size":
            return w * pl.len().over(by) / w.sum().over(by)
        return w * w.sum().over(by) / (w * w).sum().over(by)
    schools = data.unique(subset=["k", "j"], keep="first").select("k", "j", "w_j")
    schools = schools.with_columns(sc("w_j", "k").alias("s_j")).select("k", "j", "s_j")
    return data.join(schools, on=["k", "j"]).with_columns(sc("w_i", ["k", "j"]).alias("s_i"))


@pytest.mark.parametrize("how", ["size", "effective"])
def test_scaling_equals_prescaled_weights(data, how):
    pre = _prescaled(data, how)
    a = mlsem.fit(pre, FORMULA, survey=SurveyDesign(weights=W, scale=how))
    b = mlsem.fit(pre, FORMULA, survey=SurveyDesign(
        weights={"k": "w_k", "j": "s_j", "obs": "s_i"}, scale="none"))
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-7)
    np.testing.assert_allclose(a.std_err, b.std_err, rtol=1e-6)
    # and the scaling does something: it differs from the unscaled fit
    c = mlsem.fit(pre, FORMULA, survey=SurveyDesign(weights=W, scale="none"))
    assert abs(c.coef["var(j)"] - a.coef["var(j)"]) > 1e-3


def test_size_scaled_weights_sum_to_unit_sizes(data):
    res = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights={"j": "w_j", "obs": "w_i"},
                                                       scale="size"))
    # sum over schools within a county = its number of schools; pupils likewise
    ws = res.survey.weights
    H = res.model.H
    np.testing.assert_allclose(np.bincount(H.parent[1], weights=ws[1]), np.bincount(H.parent[1]))
    np.testing.assert_allclose(np.bincount(H.obs_unit, weights=ws[2]), np.bincount(H.obs_unit))
    assert res.survey.weighted_counts[1] == pytest.approx(res.levels[1].ngroups)


def test_top_only_design_equals_cluster_vce(data):
    """One stratum, no FPC, PSU = top unit: the linearised covariance is
    vce=('cluster', k) with the same weights (both carry G/(G-1))."""
    d = data.with_columns(pl.col("w_k").cast(pl.Float64).alias("wk"))
    a = mlsem.fit(d, FORMULA, survey=SurveyDesign(weights={"k": "wk"}))
    b = mlsem.fit(d, FORMULA, weights="wk", vce=("cluster", "k"))
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-6)
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-5, atol=1e-10)
    # with lower-level weights the same equality holds against the design with
    # the county as PSU given explicitly
    c = mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=W))
    e = mlsem.fit(d.with_columns(pl.col("k").alias("psu")), FORMULA,
                  survey=SurveyDesign(weights=W, psu="psu"))
    np.testing.assert_allclose(c.cov, e.cov, rtol=1e-10)


def test_unweighted_design_is_ml(data):
    """No weights: the estimates and log-likelihood are ML's."""
    a = mlsem.fit(data, FORMULA, survey=SurveyDesign())
    b = mlsem.fit(data, FORMULA)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-6)


def test_summary_states_the_design(data):
    res = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=W, scale="size"))
    s = res.summary()
    assert "survey design: 1 stratum, 300 PSUs" in s
    assert "design df = 299" in s
    assert "scale='size' within the parent unit" in s
    assert "counts (unweighted / weighted): k 300 / 600" in s
    assert "t tests on design (#PSU - #strata = 299) df" in s
    assert res.params["df"][0] == 299


def test_random_slopes_equal_replicated_fit(data):
    """Slopes at both levels, weights at every level: the fit equals mlsem's
    ML fit on the replicated data (the kernel's likelihood)."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from test_survey_pseudo import replicate
    formula = "y ~ x1 + z + (1 + x1 | k) + (1 | k:j)"
    a = mlsem.fit(data, formula, survey=SurveyDesign(weights=W))
    b = mlsem.fit(replicate(data, ["k", "j", "obs"]), formula)
    assert a.converged and b.converged
    assert a.loglik == pytest.approx(b.loglik, rel=1e-9)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=2e-5, atol=1e-6)


def test_replication_on_shuffled_string_ids_with_missing_outcomes():
    """Another data set (the seed's design, simulated), string ids, rows in random
    order, missing outcomes, global school ids: still the replicated data's fit."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from test_survey_pseudo import replicate
    rng = np.random.default_rng(12)
    d = mlsem.simulate(60, (1, 4), (1, 5), seed=5).rename({"x": "x1"})
    d = d.with_columns(pl.lit(0.0).alias("z"))
    sch = d.select("k", "j").unique()
    d = (d.join(d.select("k").unique().with_columns(pl.Series("w_k", rng.integers(1, 4, d["k"].n_unique()))), on="k")
         .join(sch.with_columns(pl.Series("w_j", rng.integers(1, 3, sch.height))), on=["k", "j"])
         .with_columns(pl.Series("w_i", rng.integers(1, 3, d.height)),
                       pl.when(pl.Series(rng.random(d.height) < 0.08)).then(None).otherwise(pl.col("y")).alias("y")))
    rep = replicate(d, ["k", "j", "obs"])
    formula = "y ~ x1 + (1 | k/j)"
    ref = mlsem.fit(rep, formula)
    s = d.sample(fraction=1.0, shuffle=True, seed=1).with_columns(
        ("c" + pl.col("k").cast(pl.String)).alias("k"),
        (pl.col("k").cast(pl.String) + "-" + pl.col("j").cast(pl.String)).alias("j"))
    got = mlsem.fit(s, formula, survey=SurveyDesign(weights=W))
    assert got.loglik == pytest.approx(ref.loglik, rel=1e-9)
    np.testing.assert_allclose(got.estimate, ref.estimate, rtol=2e-5)
