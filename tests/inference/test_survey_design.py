"""The design-based variance against R's survey package (svyrecvar on the
same scores, strata, PSUs and FPC; tests/reference/extra/make_survey_design.*),
design df, singletons and subpopulations."""
import json
import sys

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import SurveyDesign
from mlsem.data.weights import top_design
from mlsem.inference.design import design_info, linearized, meat, psu_totals

from conftest import REF as REFDIR

REF = json.loads((REFDIR / "extra" / "survey_design.json").read_text())
sys.path.insert(0, str(REFDIR / "extra"))
from make_survey_design import CASES, FORMULA, W, case_fit, design_data  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return design_data()


def _info(ref, case):
    opts = CASES[case]
    t = pl.DataFrame({"k": ref["k"], "stratum": ref["stratum"], "psu": ref["psu"],
                      "fpc": [np.nan if f is None else f for f in ref["fpc"]]})
    d = SurveyDesign(strata="stratum", psu="psu", fpc="fpc" if "fpc" in opts else None,
                     singleton=opts.get("singleton", "fail"))
    return design_info(top_design(t, "k", d), "k", d)


@pytest.mark.parametrize("case", list(CASES))
def test_meat_equals_svyrecvar_on_the_same_scores(case):
    ref = REF[case]
    info = _info(ref, case)
    S = np.array(ref["scores"], dtype=float)
    M = meat(info, psu_totals(info, ref["k"], S))
    Mr = np.array(ref["meat"], dtype=float)
    np.testing.assert_allclose(M, Mr, rtol=1e-9, atol=1e-12 * np.abs(Mr).max())


@pytest.mark.parametrize("case", list(CASES))
def test_fit_reproduces_the_scores_and_covariance(data, case):
    ref = REF[case]
    res = case_fit(case, data)
    assert res.converged
    Mr = np.array(ref["meat"], dtype=float)
    np.testing.assert_allclose(res.survey.meat, Mr, rtol=1e-4, atol=1e-6 * np.abs(Mr).max())
    np.testing.assert_allclose(res.cov, linearized(res.info, Mr), rtol=1e-4,
                               atol=1e-8 * np.abs(res.cov).max())
    info = res.survey.info
    nstrata = 7 if case.startswith("singleton") else 6
    assert (info.npsu, info.nstrata, res.survey.df) == (150, nstrata, 150 - nstrata)
    assert np.all(res.params.filter(pl.col("name") == "x1")["df"].to_numpy() == 150 - nstrata)


def test_fpc_reduces_the_variance(data):
    a = case_fit("no_fpc", data)
    b = case_fit("fpc_count", data)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-12)
    assert np.all(b.std_err < a.std_err)
    # fpc as a count N_h or as the fraction n_h / N_h: the same
    d = data.with_columns((25.0 / pl.col("npop")).alias("f2"))
    c = mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu", fpc="f2"))
    np.testing.assert_allclose(c.cov, b.cov, rtol=1e-9)


def test_subpopulation(data):
    """Estimates of the fit on the subpopulation's rows; standard errors from
    the whole design (PSUs without subpopulation rows count, with 0 scores)."""
    res = case_fit("subpop", data)
    sub = data.filter(pl.col("z") > 0)
    own = mlsem.fit(sub, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu",
                                                     fpc="npop"))
    np.testing.assert_allclose(res.estimate, own.estimate, rtol=1e-8)
    assert res.loglik == pytest.approx(own.loglik, rel=1e-12)
    assert res.survey.df == 144 and own.survey.info.npsu < 150
    assert not np.allclose(res.std_err, own.std_err, rtol=1e-3)
    # the same subpopulation given as a boolean column or a Polars expression
    d2 = data.with_columns((pl.col("z") > 0).alias("in_sub"))
    for sp in ("in_sub", pl.col("z") > 0):
        r2 = mlsem.fit(d2, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu",
                                                       fpc="npop", subpop=sp))
        np.testing.assert_allclose(r2.cov, res.cov, rtol=1e-9)
    assert "subpopulation" in res.summary()
