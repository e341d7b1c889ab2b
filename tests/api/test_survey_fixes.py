"""Review fixes on survey fits: invariance to the scale of the top-level
weights, the design df in sem(survey=), the design-adjusted F on survey fits."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import SurveyDesign

FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


@pytest.fixture(scope="module")
def data():
    return mlsem.example_data("unbalanced_weighted")


@pytest.mark.parametrize("weights", [W, {"k": "w_k"}], ids=["all_levels", "top_only"])
def test_fit_invariant_to_scale_of_top_weights(data, weights):
    """w_k times c: same estimates and SEs, loglik = c x loglik(c=1), converged
    (before the fix c=1e-9 gave errors of 1.6e-3 / 4.5e-2 reported as converged
    and c=1e9 did not converge)."""
    def at(c):
        d = data.with_columns((pl.col("w_k") * c).alias("w_k"))
        return mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=weights, scale="size"))
    base = at(1.0)
    assert base.converged
    for c in (1e-9, 1e-6, 1e6, 1e9):
        r = at(c)
        assert r.converged, c
        np.testing.assert_allclose(r.estimate, base.estimate, rtol=1e-6, err_msg=str(c))
        np.testing.assert_allclose(r.std_err, base.std_err, rtol=1e-5, err_msg=str(c))
        assert r.loglik == pytest.approx(c * base.loglik, rel=1e-9), c


def _design(data):
    return data.with_columns(((pl.col("k") - 1) // 50 + 1).alias("stratum"),
                             ((pl.col("k") - 1) // 2 + 1).alias("psu"))


def test_sem_survey_uses_the_design_df():
    """sem(survey=) used normal p-values and intervals (res.df None): now t on
    #PSU - #strata, by hand with scipy.stats.t."""
    import json
    from scipy import stats
    from conftest import REF
    d = pl.read_parquet(REF / "hs_cfa.parquet")
    rng = np.random.default_rng(0)
    d = d.with_columns(pl.Series("w", rng.integers(1, 4, d.height).astype(float)),
                       pl.Series("st", (np.arange(d.height) // 2) % 5),
                       pl.Series("pair", np.arange(d.height) // 2))
    model = json.loads((REF / "hs_cfa.json").read_text())["sem"]["model"]
    res = mlsem.sem(model, d, survey=SurveyDesign(weights={"obs": "w"}, strata="st", psu="pair"))
    dfd = d["pair"].n_unique() - d["st"].n_unique()
    assert res.survey.df == dfd and np.all(res.df == dfd)
    tab = res.params
    b, se = tab["estimate"].to_numpy(), tab["std_err"].to_numpy()
    t = b / se
    np.testing.assert_allclose(tab["p_value"].to_numpy(), 2 * stats.t.sf(np.abs(t), dfd), rtol=1e-10)
    q = stats.t.ppf(0.975, dfd)
    np.testing.assert_allclose(tab["ci_low"].to_numpy(), b - q * se, rtol=1e-10)
    np.testing.assert_allclose(tab["ci_high"].to_numpy(), b + q * se, rtol=1e-10)
    ci = res.confint()
    np.testing.assert_allclose(ci["lower"].to_numpy(), b - q * se, rtol=1e-10)
    s = res.summary()
    assert "P(>|t|)" in s and "P(>|z|)" not in s
    # a loading's p-value in the summary is the t one
    i = next(k for k, n in enumerate(res.names) if "=~" in n and se[k] > 0)
    assert f"{2 * stats.t.sf(abs(t[i]), dfd):>9.3f}" in s


def test_survey_fit_reports_the_design_adjusted_f(data):
    """The summary header, wald_fixed(), to_dict() and wald() report Stata's svy F
    (before: Wald chi2 in the header and wald_fixed, chi2 p-value first in wald)."""
    from scipy import stats
    res = mlsem.fit(_design(data), FORMULA, survey=SurveyDesign(weights=W, strata="stratum",
                                                                psu="psu"))
    d = res.survey.df
    assert d == 150 - 6
    w = res.wald_fixed()
    chi2 = float(res.estimate[1:3] @ np.linalg.solve(res.cov[1:3, 1:3], res.estimate[1:3]))
    assert res.names[1:3] == ["x1", "z"] and w["chi2"] == pytest.approx(chi2, rel=1e-10)
    F = (d - 1) / (2 * d) * chi2
    assert w["F"] == pytest.approx(F, rel=1e-10) and (w["df_num"], w["df_den"]) == (2, d - 1)
    assert w["p_value"] == pytest.approx(stats.f.sf(F, 2, d - 1), rel=1e-10)
    assert w["p_value_chi2"] == pytest.approx(stats.chi2.sf(chi2, 2), rel=1e-10)
    assert res.to_dict()["wald_fixed"]["F"] == pytest.approx(F, rel=1e-10)
    s = res.summary()
    assert f"F(2, {d - 1})" in s and f"{F:>10.2f}" in s and "Prob > F" in s
    assert "chi2" not in s.split("Std. errors")[0]
    t = res.wald(["x1 = 0", "z = 0"])
    assert t["F"] == pytest.approx(F, rel=1e-10)
    assert t["p_value"] == pytest.approx(stats.f.sf(F, 2, d - 1), rel=1e-10)
    assert t["p_value_chi2"] == pytest.approx(stats.chi2.sf(chi2, 2), rel=1e-10)
