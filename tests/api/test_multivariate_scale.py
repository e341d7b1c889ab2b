"""Several outcomes on very different scales (a time in milliseconds beside a proportion),
a factor in one outcome's formula, string ids, both outcomes partly missing: against nlme
(tests/reference/extra/multivariate_scale.R -> multivariate_scale.json; nlme was fitted on
rescaled outcomes and its values transformed back, because on the raw scales nlme itself
stops early).  Before the fix of vcov_from_information the estimates were right but the
fixed-effect standard errors were 1e4 times too small and the Wald chi2 negative: the
information block looked singular in raw units."""
import json
import os

import numpy as np
import pytest

import mlsem
from mlsem.api.multivariate import covariance_matrix

EXTRA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference", "extra")
FORMULAS = ["rt_ms ~ x + grp + (1 | county/school)", "prop ~ x + (1 | county/school)"]
FIXED = {"d1": "rt_ms:Intercept", "x1": "rt_ms:x", "A1": "rt_ms:grp[T.trtA]",
         "B1": "rt_ms:grp[T.trtB]", "d2": "prop:Intercept", "x2": "prop:x"}


@pytest.fixture(scope="module")
def fitted():
    with open(os.path.join(EXTRA, "multivariate_scale.json")) as f:
        ref = json.load(f)
    return ref, mlsem.fit(os.path.join(EXTRA, "multivariate_scale.csv"), FORMULAS)


def test_estimates_against_nlme(fitted):
    ref, r = fitted
    assert r.converged
    assert r.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    assert r.nobs == ref["nobs_values"]
    est = dict(zip(r.names, r.estimate))
    for rn, mn in FIXED.items():
        assert est[mn] == pytest.approx(ref["fixed"][rn], rel=1e-4, abs=1e-4 * ref["fixed_se"][rn])
    for level, name in (("county", "county"), ("school", "school"), ("residual", "Residual")):
        want = np.array(ref[f"cov_{level}"])
        got = covariance_matrix(r, name)
        # relative to the scale of each entry (sqrt(var_a var_b) for a covariance)
        unit = np.sqrt(np.outer(np.diag(want), np.diag(want)))
        assert np.max(np.abs(got - want) / unit) < 1e-3, level


def test_standard_errors_against_nlme(fitted):
    ref, r = fitted
    se = dict(zip(r.names, r.std_err))
    for rn, mn in FIXED.items():
        assert se[mn] == pytest.approx(ref["fixed_se"][rn], rel=1e-3)


def test_wald_test_is_a_chi2(fitted):
    _, r = fitted
    w = r.wald_fixed()
    assert w["df"] == 4 and w["chi2"] > 0 and 0 <= w["p_value"] <= 1


def _wards(seed=5, n=3000, hosp=60):
    """Blood pressure in Pa (~1e5) beside heart rate in kHz (~0.07): variances 1e12
    apart; covariates partly missing, heart rate 10% missing, no ward effect."""
    import polars as pl
    rng = np.random.default_rng(seed)
    h = rng.integers(0, hosp, n)
    u = rng.normal(size=(hosp, 2))
    sex = rng.choice(["F", "M"], n)
    age = rng.uniform(20, 90, n)
    bp = 1000 * (120 + 0.3 * age + 5 * (sex == "M") + 8 * u[h, 0] + rng.normal(0, 10, n))
    hr = (70 + 0.1 * age + 3 * u[h, 1] + 0.5 * u[h, 0] + rng.normal(0, 8, n)) / 1000
    age[rng.random(n) < 0.05] = np.nan
    hr[rng.random(n) < 0.1] = np.nan
    return pl.DataFrame({"hosp": [f"H{x:03d}" for x in h], "ward": [f"W{x}" for x in rng.integers(0, 4, n)],
                         "sex": sex, "age": age, "bp": bp, "hr": hr}).fill_nan(None)


WARDS = ["bp ~ age + sex + (1 | hosp/ward)", "hr ~ age + (1 | hosp/ward)"]


def test_outcomes_a_million_units_apart():
    """The grouped data's moment start once raised the small outcome's variances to the
    large one's (an eigenvalue floor in raw units): L-BFGS-B stalled 1e10 units away,
    30,000 log-likelihood units below the optimum, and the fit was called converged.
    Now: with no cross-outcome covariance the log-likelihood is the sum of the two
    univariate fits, the full model's is not below it, and rescaling the outcomes moves
    the log-likelihood by the Jacobian only."""
    import warnings
    d = _wards()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uni = sum(mlsem.fit(d, f).loglik for f in WARDS)
        ind = mlsem.fit(d, WARDS, outcomes={"hosp": "independent", "ward": "independent",
                                            "residual": "independent"})
        full = mlsem.fit(d, WARDS)
        d2 = d.with_columns(d["bp"] / 1000, d["hr"] * 1000)
        full2 = mlsem.fit(d2, WARDS)
    assert ind.converged and full.converged and full2.converged
    assert ind.loglik == pytest.approx(uni, abs=1e-6)
    assert full.loglik >= ind.loglik - 1e-6
    n_bp, n_hr = (int(((~d[c].is_null()) & (~d["age"].is_null())).sum()) for c in ("bp", "hr"))
    jac = (n_bp - n_hr) * np.log(1000.0)
    assert full.loglik + jac == pytest.approx(full2.loglik, abs=1e-5)
