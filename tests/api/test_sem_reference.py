"""General SEMs against lavaan 0.6-14 (tests/reference/{hs_cfa,hs_cfa_missing,iv_endogenous}.json,
key ``sem``: sem(model, missing = "ml", information = "observed"))."""
import json
import os

import numpy as np
import polars as pl
import pytest

import mlsem
from conftest import REF


def _load(case):
    with open(os.path.join(REF, f"{case}.json")) as f:
        ref = json.load(f)["sem"]
    return ref, pl.read_parquet(os.path.join(REF, f"{case}.parquet"))


@pytest.fixture(scope="module", params=["hs_cfa", "hs_cfa_missing", "iv_endogenous"])
def fitted(request):
    ref, d = _load(request.param)
    return request.param, ref, mlsem.sem(ref["model"], d)


def _rows(res):
    return {(r["lhs"], r["op"], r["rhs"]): r for r in res.sem_rows}


def test_loglik(fitted):
    case, ref, res = fitted
    assert res.converged
    # lavaan's log-likelihood with fixed.x = TRUE is the conditional one (checked on
    # iv_endogenous against the multivariate regression of (y, x) on z, a
    # just-identified model: -2164.2345862633)
    assert abs(res.loglik - ref["loglik"]) < 1e-4


def test_every_parameter_row(fitted):
    case, ref, res = fitted
    rows = _rows(res)
    assert len(rows) == len(ref["params"])
    for p in ref["params"]:
        r = rows[(p["lhs"], p["op"], p["rhs"])]
        assert abs(r["est"] - p["est"]) <= max(1e-4 * abs(p["est"]), 1e-5), p
        if p["se"] > 0:
            assert r["free"]
            assert abs(r["se"] - p["se"]) <= 1e-3 * p["se"], p
        else:
            assert not r["free"], p


def test_npar_and_kernel(fitted):
    case, ref, res = fitted
    assert res.nparams == ref["npar"]
    # Theta diagonal -> the factor kernel; the IV model's phantom latents -> dense
    assert res.kernel == ("dense" if case == "iv_endogenous" else "factor")
    assert res.vce == "oim"


def test_params_table_columns(fitted):
    case, ref, res = fitted
    tab = res.params
    assert tab.columns[:7] == ["name", "estimate", "std_err", "z", "p_value", "ci_low", "ci_high"]
    assert tab.columns[7:] == ["lhs", "op", "rhs", "label"]
    text = res.summary()
    assert "Variances:" in text and "Estimate" in text


def test_iv_fixed_x_joint_loglik():
    ref, d = _load("iv_endogenous")
    res = mlsem.sem(ref["model"], d)
    z = d["z"].to_numpy()
    n = len(z)
    llz = -0.5 * n * (np.log(2 * np.pi) + np.log(z.var()) + 1.0)
    assert res.loglik_fixed_x == pytest.approx(llz, abs=1e-8)
    rows = _rows(res)
    assert rows[("z", "~~", "z")]["est"] == pytest.approx(z.var(), rel=1e-12)
    assert rows[("z", "~1", "")]["est"] == pytest.approx(z.mean(), rel=1e-12)


with open(os.path.join(REF, "extra", "sem_more.json")) as _f:
    MORE = json.load(_f)


@pytest.mark.parametrize("name", sorted(MORE["cases"]))
def test_more_model_shapes_against_lavaan(name):
    """Observed predictors, regressions among latents, observed outcomes of
    latents, mixed latent/observed dependents, labels, linear constraints and a
    defined parameter (tests/reference/extra/make_sem_more.R)."""
    cs = MORE["cases"][name]
    d = pl.read_parquet(os.path.join(REF, f"{cs['data']}.parquet"))
    res = mlsem.sem(cs["model"], d)
    assert res.converged
    assert abs(res.loglik - cs["loglik"]) < 1e-4
    assert res.nparams == cs["npar"]
    rows = _rows(res)
    defined = {x["lhs"]: x for x in res.defined}
    checked = 0
    for p in cs["params"]:
        if p["op"] == "==":
            continue
        r = defined[p["lhs"]] if p["op"] == ":=" else rows[(p["lhs"], p["op"], p["rhs"])]
        assert abs(r["est"] - p["est"]) <= max(1e-4 * abs(p["est"]), 1e-5), p
        if p["se"] > 0:
            assert abs(r["se"] - p["se"]) <= 1e-3 * p["se"], p
        checked += 1
    assert checked == len(rows) + len(defined)


def test_heywood_case_gets_the_negative_variance():
    """lavaan does not bound variances: a just-identified one-factor model whose
    sample covariance needs a negative residual variance (loading^2 = .8*.8/.5)
    is fitted exactly, with a note."""
    rng = np.random.default_rng(1)
    S = np.array([[1, .8, .8], [.8, 1, .5], [.8, .5, 1]])
    Z = rng.standard_normal((500, 3))
    Z -= Z.mean(0)
    Z = Z @ np.linalg.inv(np.linalg.cholesky(np.cov(Z.T, bias=True))).T @ np.linalg.cholesky(S).T
    res = mlsem.sem("f =~ a + b + c", pl.DataFrame({"a": Z[:, 0], "b": Z[:, 1], "c": Z[:, 2]}))
    assert res.converged
    assert res.coef["a~~a"] == pytest.approx(-0.28, abs=1e-7)
    assert res.coef["f~~f"] == pytest.approx(1.28, abs=1e-7)
    n = 500
    saturated = -n / 2 * (3 * np.log(2 * np.pi) + np.linalg.slogdet(S)[1] + 3)
    assert res.loglik == pytest.approx(saturated, abs=1e-8)
    assert any("Heywood" in x for x in res.notes)
