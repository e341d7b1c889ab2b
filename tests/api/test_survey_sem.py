"""Survey designs through mlsem.sem (wide data: the rows are the units);
res.scores() and res.hessian(); what a survey fit refuses."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError, SurveyDesign

from conftest import REF
FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


@pytest.fixture(scope="module")
def hs():
    d = pl.read_parquet(REF / "hs_cfa.parquet")
    rng = np.random.default_rng(0)
    d = d.with_columns(pl.Series("w", rng.integers(1, 4, d.height).astype(float)),
                       pl.Series("rid", np.arange(d.height)),
                       pl.Series("st", (np.arange(d.height) // 2) % 5),
                       pl.Series("st_bad", np.arange(d.height) % 5),
                       pl.Series("pair", np.arange(d.height) // 2))
    model = json.loads((REF / "hs_cfa.json").read_text())["sem"]["model"]
    return d, model


def test_sem_replicated_rows_and_cluster(hs):
    d, model = hs
    a = mlsem.sem(model, d, survey=SurveyDesign(weights={"obs": "w"}))
    rep = d.with_columns(pl.int_ranges(0, pl.col("w").cast(pl.Int64)).alias("_c")).explode("_c")
    b = mlsem.sem(model, rep)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-6, atol=1e-8)
    c = mlsem.sem(model, d, weights="w", vce=("cluster", "rid"))
    np.testing.assert_allclose(a.cov, c.cov, rtol=1e-5)
    assert a.vce == "linearized" and "survey design: 1 stratum, 301 PSUs (the rows)" in a.summary()
    assert "Akaike" not in a.summary()


def test_sem_design_and_subpop(hs):
    d, model = hs
    a = mlsem.sem(model, d, survey=SurveyDesign(weights={"obs": "w"}, strata="st", psu="pair",
                                                subpop="x1 > 4"))
    own = mlsem.sem(model, d.filter(pl.col("x1") > 4), survey=SurveyDesign(weights={"obs": "w"}))
    np.testing.assert_allclose(a.estimate, own.estimate, rtol=1e-6, atol=1e-8)
    assert a.survey.info.npsu == 151 and a.survey.df == 151 - 5
    with pytest.raises(MlsemError, match=r"PSU pair = 0 is in two strata \(st_bad = 0, 1\)"):
        mlsem.sem(model, d, survey=SurveyDesign(strata="st_bad", psu="pair"))


def test_sem_refusals(hs):
    d, model = hs
    with pytest.raises(MlsemError, match=r"one weight"):
        mlsem.sem(model, d, survey=SurveyDesign(weights={"k": "w", "obs": "w"}))
    with pytest.raises(MlsemError, match=r"method='adf' with survey="):
        mlsem.sem(model, d, method="adf", survey=SurveyDesign(weights={"obs": "w"}))
    with pytest.raises(MlsemError, match=r"vce='robust' with survey="):
        mlsem.sem(model, d, vce="robust", survey=SurveyDesign(weights={"obs": "w"}))
    a = mlsem.sem(model, d, survey=SurveyDesign(weights={"obs": "w"}))
    with pytest.raises(MlsemError, match=r"pseudo-likelihood"):
        a.fit_test()
    with pytest.raises(MlsemError, match=r"AIC"):
        a.aic


@pytest.fixture(scope="module")
def fitted():
    d = mlsem.example_data("unbalanced_weighted").with_columns(
        ((pl.col("k") - 1) // 50 + 1).alias("stratum"), ((pl.col("k") - 1) // 2 + 1).alias("psu"))
    return d, mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu"))


def test_scores_and_hessian(fitted):
    d, res = fitted
    sc = res.scores()
    assert sc.columns[:2] == ["stratum", "psu"] and sc.height == 150
    Z = sc.select(res.names).to_numpy()
    np.testing.assert_allclose(Z.sum(axis=0), 0.0, atol=1e-3)      # the gradient at the estimates
    un = res.scores(by="unit")
    assert un.columns[:4] == ["k", "stratum", "psu", "weight"] and un.height == 300
    np.testing.assert_allclose(un.group_by("psu").agg(pl.col(res.names).sum()).sort("psu")
                               .select(res.names).to_numpy(), Z, rtol=1e-10, atol=1e-12)
    H = res.hessian()
    assert H.columns == ["name"] + res.names
    Hm = H.select(res.names).to_numpy()
    # the linearised covariance by hand from the two
    st = sc["stratum"].to_numpy()
    M = np.zeros((len(res.names),) * 2)
    for h in np.unique(st):
        z = Z[st == h]
        n = len(z)
        M += n / (n - 1) * (z - z.mean(0)).T @ (z - z.mean(0))
    Hi = np.linalg.inv(Hm)
    np.testing.assert_allclose(Hi @ M @ Hi, res.cov, rtol=1e-8, atol=1e-14)
    with pytest.raises(MlsemError, match=r"by is 'psu' or 'unit'"):
        res.scores(by="school")
    plain = mlsem.fit(d, FORMULA)
    with pytest.raises(MlsemError, match=r"survey="):
        plain.scores()


def test_survey_fit_refuses_aic_bic_score_tests(fitted):
    _, res = fitted
    for f in (lambda: res.aic, lambda: res.bic, lambda: res.score_tests()):
        with pytest.raises(MlsemError, match=r"pseudo-likelihood"):
            f()
    js = res.to_dict()
    assert js["aic"] is None and js["survey"]["design_df"] == 144
    assert "pseudo" in res.summary().splitlines()[0].lower()
