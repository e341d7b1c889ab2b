"""Review fixes of the ADF / GMM work (issue 16), against lavaan 0.6-14.

Reference: extra/gmmfix.json (extra/make_gmmfix.sh: make_gmmfix.py writes the
data, gmmfix_multilevel.parquet, and the wide forms; make_gmmfix.R fits them
by lavaan with fixed.x = TRUE).
"""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError
from conftest import REF, load_case

FIX = json.load(open(REF / "extra" / "gmmfix.json"))
GMM = json.load(open(REF / "extra" / "gmm.json"))
HS_MODEL = GMM["hs_cfa"]["model"]
FORMULAS = {"normal_x": "y ~ x + (1 | k/j)", "two_covariates": "y ~ x + x2 + (1 | k/j)",
            "county_covariate": "y ~ x + z + (1 | k/j)", "six_slots": "y ~ x + (1 | k/j)"}
LAV = {"var_k": "var(k)", "var_j": "var(j)", "var_Residual": "var(Residual)"}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def cases():
    d = pl.read_parquet(REF / "gmmfix_multilevel.parquet")
    return {c: d.filter(pl.col("case") == c).drop("case") for c in FORMULAS}


@pytest.fixture(scope="module")
def hs():
    return pl.read_parquet(REF / "hs_cfa.parquet")


def _lav_name(lab):
    return LAV.get(lab, lab[2:] if lab.startswith("b_") else None)


# ---- 1: the covariate columns of the multilevel wide form -----------------------------------
@pytest.mark.parametrize("case", list(FORMULAS))
def test_multilevel_adf_covariates(cases, case):
    """Normal x, a second covariate, a county-level covariate: the slot intercepts
    (constant columns) are never kept as covariates; ADF = lavaan WLS."""
    ref = FIX["multilevel"][case]["wls"]
    res = mlsem.fit(cases[case], FORMULAS[case], method="adf", index="i")
    assert res.converged
    co, se = res.coef, dict(zip(res.names, res.std_err))
    n = 0
    for lab, v in ref["estimates"].items():
        name = _lav_name(lab)
        if name in co:
            assert abs(co[name] - v) <= max(1e-5 * abs(v), 1e-6), name   # lavaan's convergence
            assert rel(se[name], ref["std_errors"][lab]) < 1e-5, name
            n += 1
    assert n == res.nparams
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]


@pytest.mark.parametrize("case", ["normal_x", "two_covariates", "county_covariate"])
def test_multilevel_scaled_test_covariates(cases, case):
    """The scaled test of a robust multilevel fit uses the same covariate layout."""
    ref = FIX["multilevel"][case]["mlm"]
    ft = mlsem.fit(cases[case], FORMULAS[case], vce="robust", index="i").fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-5 and ft["df"] == ref["df"]
    assert rel(ft["chi2_scaled"], ref["chisq_scaled"]) < 1e-5
    assert rel(ft["scaling_factor"], ref["scaling_factor"]) < 1e-5


# ---- 2: summary() rows and := parameters carry the robust covariance ---------------------------
@pytest.fixture(scope="module")
def seed_wide():
    seed = load_case("seed_balanced")
    long = pl.read_parquet(REF / seed["data"])
    return mlsem.to_wide(long, "y ~ x + (1 | k/j)", index="i").join(
        pl.DataFrame(seed["inference"]["weights"]), on="k")


MED_KW = {"robust": {"vce": "robust"}, "cluster": {"vce": ("cluster", "region")},
          "weighted": {"weights": "w"}}


@pytest.mark.parametrize("key", list(MED_KW))
def test_sem_robust_summary_and_defined(seed_wide, key):
    ref = FIX["mediation"][key]
    res = mlsem.sem(FIX["mediation"]["model"], seed_wide, **MED_KW[key])
    se = dict(zip(res.names, res.std_err))
    rows = {r["label"]: r for r in res.sem_rows if r["label"]}
    for lab in ("a", "b", "c"):
        assert rel(se[lab], ref["std_errors"][lab]) < 1e-5, lab
        assert rel(rows[lab]["se"], ref["std_errors"][lab]) < 1e-5, lab     # summary()'s rows
    for d in res.defined:
        assert rel(d["est"], ref["estimates"][d["label"]]) < 1e-5, d["label"]
        assert rel(d["se"], ref["std_errors"][d["label"]]) < 1e-5, d["label"]
    assert len(res.defined) == 2
    text = res.summary()
    assert f"{ref['std_errors']['ab']:.3f}" in text.split("Defined Parameters")[1].splitlines()[2]


# ---- 9: an SEM fit with a variance at its bound --------------------------------------------------
@pytest.mark.parametrize("vce", ["oim", "robust"])
def test_sem_small_sample_bound(hs, vce):
    """hs_cfa's first 50 rows: the optimiser's bound handling (once an
    AttributeError on SemModel.free_plain) ends at lavaan's optimum."""
    ref = FIX["hs_head50"]["ml"]
    res = mlsem.sem(HS_MODEL, hs.head(50), vce=vce)
    assert res.converged
    assert abs(res.loglik - ref["loglik"]) < 1e-6
    for row in res.params.iter_rows(named=True):
        k = f"{row['lhs']}~1" if row["op"] == "~1" else f"{row['lhs']}{row['op']}{row['rhs']}"
        assert abs(row["estimate"] - ref["estimates"][k]) < 1e-4, k


# ---- 3: ADF does not depend on the units of the variables ---------------------------------------
def test_adf_rescaled_variables(hs):
    """x1 in hundredths and x9 in tens: Gamma's singularity test and the
    convergence test are unit-free, so chi-square and standardised results
    are those of the original data (lavaan WLS: 83.31858)."""
    import warnings
    ref = GMM["hs_cfa"]["wls"]
    base = mlsem.sem(HS_MODEL, hs, method="adf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = mlsem.sem(HS_MODEL, hs.with_columns(pl.col("x1") * 100.0, pl.col("x9") * 0.1), method="adf")
    assert res.converged
    assert rel(res.fit_test()["chi2"], ref["chisq"]) < 1e-7
    assert rel(res.fit_test()["chi2"], base.fit_test()["chi2"]) < 1e-9
    # the loadings of x1's factor scale by 1/100 against x1's marker, x9's by 0.1
    co, cb = res.coef, base.coef
    assert rel(co["visual=~x2"], cb["visual=~x2"] / 100.0) < 1e-6
    assert rel(co["speed=~x9"], cb["speed=~x9"] * 0.1) < 1e-6


# ---- 4: the scaled test needs Gamma, not its inverse ----------------------------------------------
def test_scaled_test_fewer_units_than_moments(hs, cases):
    """hs_cfa's last 50 rows (54 moments): lavaan's MLM gives the scaled test."""
    ref = FIX["hs_tail50"]["mlm"]
    ft = mlsem.sem(HS_MODEL, hs.tail(50), vce="robust").fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-5 and ft["df"] == ref["df"]
    assert rel(ft["chi2_scaled"], ref["chisq_scaled"]) < 1e-5
    assert rel(ft["scaling_factor"], ref["scaling_factor"]) < 1e-5
    assert "scaled_note" not in ft
    # an ML fit whose scaled test is not available is not told to use method='ml'
    ft = mlsem.fit(cases["normal_x"], FORMULAS["normal_x"], vce="robust", index="i",
                   residuals={"correlation": "ar1"}).fit_test()
    assert np.isnan(ft["chi2_scaled"])
    assert "the scaled test" in ft["scaled_note"] and "method='ml'" not in ft["scaled_note"]


# ---- 5: fit_test() of a weighted SEM fit ----------------------------------------------------------
def test_sem_weighted_fit_test(seed_wide, hs):
    ref = FIX["mediation"]["weighted"]
    res = mlsem.sem(FIX["mediation"]["model"], seed_wide, weights="w")
    assert abs(res.loglik - ref["loglik"]) < 1e-6
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]
    assert rel(ft["p_value"], ref["pvalue"]) < 1e-5
    assert "sampling weights" in ft["test"] and "MLR" in ft["scaled_note"]
    # the unweighted fits of the same model: lavaan's chisq too
    for key in ("robust", "cluster"):
        ft = mlsem.sem(FIX["mediation"]["model"], seed_wide, **MED_KW[key]).fit_test()
        assert rel(ft["chi2"], FIX["mediation"][key]["chisq"]) < 1e-6
    # missing cells with weights: refused clearly
    hsm = pl.read_parquet(REF / "hs_cfa_missing.parquet").with_columns(
        (1.0 + (pl.int_range(pl.len()) % 3)).alias("w"))
    with pytest.raises(MlsemError, match="sampling weights.*complete data.*missing"):
        mlsem.sem(HS_MODEL, hsm, weights="w").fit_test()


# ---- 6: one set of weight checks for mlsem.fit and mlsem.sem --------------------------------------
def test_weight_checks_shared(seed_wide):
    from mlsem.inference.vce import check_weights
    model = FIX["mediation"]["model"]
    long = load_case("seed_balanced")
    long = pl.read_parquet(REF / long["data"])
    neg = seed_wide.with_columns(pl.when(pl.col("k") == 3).then(-1.0).otherwise(pl.col("w")).alias("w"))
    with pytest.raises(MlsemError, match=r"weights column 'w' has negative values \(rows 3\)"):
        mlsem.sem(model, neg, weights="w")
    with pytest.raises(MlsemError, match=r"weights column 'w' has negative values \(k = 3\)"):
        mlsem.fit(long.join(neg.select("k", "w"), on="k"), "y ~ x + (1 | k/j)", weights="w")
    with pytest.raises(MlsemError, match="weights column 'w' has missing values"):
        mlsem.sem(model, seed_wide.with_columns(pl.when(pl.col("k") == 2).then(None)
                                                .otherwise(pl.col("w")).alias("w")), weights="w")
    with pytest.raises(MlsemError, match="weights column 'w' sums to 0"):
        mlsem.sem(model, seed_wide.with_columns(pl.lit(0.0).alias("w")), weights="w")
    with pytest.raises(MlsemError, match="non-finite"):
        check_weights(np.array([1.0, np.inf]), "w", str)
