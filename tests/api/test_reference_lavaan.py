"""The wide-SEM form: lavaan 0.6-14 (sem(missing='ml', fixed.x=TRUE), observed
information) on the same data gives the same likelihood, and with vce='oim'
the same standard errors."""
import numpy as np
import polars as pl
import pytest

import mlsem
from conftest import REF, load_case

LAVAAN_NAMES = {"c": "Intercept", "se": "var(Residual)", "su": "var(k)", "sv": "var(j)"}


def lavaan_to_mlsem(name):
    if name.startswith("b_"):
        return name[2:]
    return LAVAAN_NAMES[name]


def test_oim_matches_lavaan_seed():
    case = load_case("seed_balanced")
    lav = case["lavaan"]["standard"]
    res = mlsem.fit(REF / case["data"], case["formula"], vce="oim")
    assert abs(res.loglik - lav["loglik"]) < 1e-4
    se = dict(zip(res.names, res.std_err))
    for k, v in lav["std_errors"].items():
        assert abs(se[lavaan_to_mlsem(k)] - v) / v < 1e-3, k
    for k, v in lav["estimates"].items():
        assert abs(res.coef[lavaan_to_mlsem(k)] - v) / abs(v) < 1e-4, k


def test_oim_unbalanced_county_covariate():
    # lavaan's own numbers are slightly off on this case (it zero-fills the
    # covariates of missing slots; reference README): lme4's likelihood is the
    # target, and the oim convention must not change the estimates.
    case = load_case("unbalanced")
    res = mlsem.fit(REF / case["data"], case["formula"], vce="oim")
    mixed = mlsem.fit(REF / case["data"], case["formula"])
    assert abs(res.loglik - case["lme4"]["loglik"]) < 1e-4
    assert np.allclose(res.estimate, mixed.estimate, rtol=1e-10, atol=0)
    # oim and the mixed convention differ (0.2279 vs 0.2356 in the seed)
    assert not np.allclose(res.std_err, mixed.std_err, rtol=1e-4)


def wide_loglik(long, formula_cov, coef, top="k", mid="j", obs="i"):
    """The likelihood of the wide SEM, computed the dumb way: pivot to one row
    per county (the seed's double reshape wide), build the full Sigma =
    Lambda Phi Lambda' + s_e I over all slots, and evaluate each row's
    observed part with a dense multivariate normal."""
    long = long.with_columns((pl.col(mid).cast(pl.String) + "_" + pl.col(obs).cast(pl.String)).alias("slot"))
    y = long.pivot(on="slot", index=top, values="y").sort(top)
    x = long.pivot(on="slot", index=top, values=formula_cov).sort(top)
    slots = [c for c in y.columns if c != top]
    Y = y.select(slots).to_numpy()
    Xw = x.select(slots).to_numpy()
    mids = [s.split("_")[0] for s in slots]
    P = len(slots)
    lam_j = np.array([[1.0 if m == u else 0.0 for u in sorted(set(mids))] for m in mids])
    Sigma = coef["var(k)"] * np.ones((P, P)) + coef["var(j)"] * lam_j @ lam_j.T + coef["var(Residual)"] * np.eye(P)
    ll = 0.0
    for r in range(Y.shape[0]):
        o = ~np.isnan(Y[r])
        e = Y[r, o] - coef["Intercept"] - coef[formula_cov] * Xw[r, o]
        S = Sigma[np.ix_(o, o)]
        _, logdet = np.linalg.slogdet(S)
        ll += -0.5 * (o.sum() * np.log(2 * np.pi) + logdet + e @ np.linalg.solve(S, e))
    return ll


@pytest.mark.parametrize("case_name", ["seed_balanced", "hetero_corr"])
def test_multilevel_and_wide_sem_likelihood_are_the_same_number(case_name):
    case = load_case(case_name)
    res = mlsem.fit(REF / case["data"], case["formula"])
    long = pl.read_parquet(REF / case["data"])
    ll_wide = wide_loglik(long, "x", res.coef)
    assert abs(ll_wide - res.loglik) < 1e-8
    if "standard" in case.get("lavaan", {}):
        assert abs(ll_wide - case["lavaan"]["standard"]["loglik"]) < 1e-4
