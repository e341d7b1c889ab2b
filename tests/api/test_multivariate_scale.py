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
