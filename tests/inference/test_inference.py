"""Inference: robust / cluster-robust / weighted standard errors, REML, Wald
tests, score tests and the test against the saturated model.

References:
* seed_balanced.json key ``inference`` (lavaan 0.6-14 on the wide form; lme4
  1.1-31 REML), copied from the shared reference folder;
* extra/lme4_extra.json key ``reml`` (lme4 1.1-31 REML on every case);
* extra/lavaan_robust_unbalanced.json (extra/make_robust_unbalanced.R: lavaan
  0.6-14 robust.huber.white and robust.cluster errors of the wide SEM of
  ``unbalanced``);
* extra/lavaan_fit_test.json (extra/make_fit_test.R: lavaan 0.6-14 chisq,
  lavTestScore and modindices on seed_balanced and on seed_balanced with cells
  deleted, i.e. with missing data).

Definitions matched (mlsem.inference.vce): ``robust`` is lavaan's
robust.huber.white (observed-information bread, casewise scores of the wide
rows, no small-sample factor); ``cluster`` is lavaan's cluster-robust
sandwich with the G/(G-1) factor; weights are normalised to sum to the number
of top-level units (lavaan's sampling.weights.normalization = "total"); score
tests and modification indices use lavaan's default expected information.
"""
import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

import mlsem
from mlsem import MlsemError
from mlsem.model.scores import chain, kernel_eval, row_scores
from conftest import REF, load_case

SEED = load_case("seed_balanced")
INF = SEED["inference"]
FORMULA = "y ~ x + (1 | k/j)"
# lavaan labels of the wide form -> mlsem parameter names
LAV = {"c": "Intercept", "b_x": "x", "su": "var(k)", "sv": "var(j)", "se": "var(Residual)"}
# lavaan latent names -> mlsem latent names
LAT = {"U": "k", "V1": "j[1]", "V2": "j[2]"}
FIT_TEST = json.load(open(REF / "extra" / "lavaan_fit_test.json"))
LME4_EXTRA = json.load(open(REF / "extra" / "lme4_extra.json"))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def seed_data():
    d = pl.read_parquet(REF / SEED["data"])
    return d.join(pl.DataFrame(INF["weights"]), on="k")


def seed_missing():
    """seed_balanced with cells deleted (the rule of extra/make_fit_test.R)."""
    d = pl.read_parquet(REF / SEED["data"])
    drop = (((pl.col("k") % 5 == 0) & (pl.col("j") == 2) & (pl.col("i") == 2))
            | ((pl.col("k") % 7 == 0) & (pl.col("j") == 1) & (pl.col("i") == 1)))
    return d.filter(~drop)


@pytest.fixture(scope="module")
def seed():
    return seed_data()


def check_block(res, block):
    assert abs(res.loglik - block["loglik"]) < 1e-4
    co = res.coef
    se = dict(zip(res.names, res.std_err))
    for lab, name in LAV.items():
        assert rel(co[name], block["estimates"][lab]) < 1e-4, lab
        assert rel(se[name], block["std_errors"][lab]) < 1e-3, lab


# ---- robust, cluster, weights -------------------------------------------------------
def test_oim(seed):
    check_block(mlsem.fit(seed, FORMULA, vce="oim"), INF["oim"])


def test_robust(seed):
    res = mlsem.fit(seed, FORMULA, vce="robust")
    assert res.vce == "robust"
    check_block(res, INF["robust"])


def test_cluster_region(seed):
    res = mlsem.fit(seed, FORMULA, vce=("cluster", "region"))
    assert res.vce == "cluster(region)"
    check_block(res, INF["cluster_region"])
    # the G/(G-1) factor is what lavaan applies: without it the SEs are sqrt(0.9) smaller
    assert "10 clusters" in res.summary()


def test_weighted(seed):
    res = mlsem.fit(seed, FORMULA, weights="w")
    assert res.vce == "robust"
    check_block(res, INF["weighted"])
    # rescaling the weights changes nothing (normalised to sum to the number of units)
    res2 = mlsem.fit(seed.with_columns(pl.col("w") * 3.7), FORMULA, weights="w")
    assert abs(res2.loglik - res.loglik) < 1e-8
    assert np.allclose(res2.std_err, res.std_err, rtol=1e-6)


def test_unit_weights_equal_unweighted_robust(seed):
    a = mlsem.fit(seed.with_columns(pl.lit(2.0).alias("one")), FORMULA, weights="one")
    b = mlsem.fit(seed, FORMULA, vce="robust")
    assert abs(a.loglik - b.loglik) < 1e-8
    assert np.allclose(a.std_err, b.std_err, rtol=1e-6)


def test_scores_sum_to_gradient_and_match_per_row_kernel():
    """Per-unit scores (vectorised) == the kernel run on one row at a time,
    and they sum to the analytic gradient; random slopes and unbalanced data."""
    case = load_case("unbalanced")
    res = mlsem.fit(REF / case["data"], "y ~ x1 + z + (1 + x1 | k) + (1 | k:j)")
    m = res.model
    psi = res.estimate * 1.01
    S = row_scores(m, psi)
    _, g = m.evaluate(psi)
    assert np.allclose(S.sum(axis=0), g, rtol=1e-10, atol=1e-9)
    _, Phi, Theta = m.matrices(psi)
    resid = m.residuals(psi)
    ones = np.ones(m.prep.nrows)
    for r in (0, 17, m.prep.nrows - 1):
        out = kernel_eval(m, resid, Phi, Theta, wrow=ones, pat_ptr=[r, r + 1])
        assert np.allclose(chain(m, psi, out[1], out[2], out[3]), S[r], rtol=1e-10, atol=1e-10)


def test_scores_dense_path_and_numpy_backend(seed):
    """The per-row fallback (dense kernel, used for non-diagonal Theta) and the
    NumPy oracle give the same scores and robust errors as the factor path."""
    res = mlsem.fit(seed, FORMULA, vce="robust")
    m = res.model
    S = row_scores(m, res.estimate)
    m.dense = True
    try:
        S2 = row_scores(m, res.estimate)
    finally:
        m.dense = False
    assert np.allclose(S, S2, rtol=1e-10, atol=1e-12)
    res_np = mlsem.fit(seed, FORMULA, vce="robust", backend="numpy")
    assert np.allclose(res_np.std_err, res.std_err, rtol=1e-7)


def test_robust_and_cluster_on_unbalanced():
    """Unbalanced data (missing cells in the wide form, a county-level covariate):
    robust and cluster-robust errors equal lavaan's on the wide SEM
    (extra/lavaan_robust_unbalanced.json, made by extra/make_robust_unbalanced.R,
    which first reproduces seed_balanced's robust and cluster references)."""
    case = load_case("unbalanced")
    ref = json.load(open(REF / "extra" / "lavaan_robust_unbalanced.json"))
    names = ref["labels"]                      # lavaan label -> mlsem parameter name
    d = pl.read_parquet(REF / case["data"]).with_columns(((pl.col("k") - 1) // 10).alias("region"))
    oim = mlsem.fit(d, case["formula"], vce="oim")
    rob = mlsem.fit(d, case["formula"], vce="robust")
    clu = mlsem.fit(d, case["formula"], vce=("cluster", "region"))
    assert np.allclose(rob.estimate, oim.estimate)
    for r, key in ((rob, "robust"), (clu, "cluster_region")):
        assert ref[key]["converged"]
        est, se = r.coef, dict(zip(r.names, r.std_err))
        for lab, name in names.items():
            assert rel(est[name], ref[key]["estimates"][lab]) < 1e-4, (key, name)
            assert rel(se[name], ref[key]["std_errors"][lab]) < 1e-3, (key, name, se[name], ref[key]["std_errors"][lab])
    # hand sandwich: A^-1 B A^-1 with B from the per-unit scores
    S = row_scores(rob.model, rob.estimate)
    Ai = np.linalg.inv(rob.info)
    assert np.allclose(rob.cov, Ai @ S.T @ S @ Ai, rtol=1e-8)


def test_weight_and_cluster_errors(seed):
    with pytest.raises(MlsemError, match=r"negative values \(k = 3"):
        mlsem.fit(seed.with_columns(pl.when(pl.col("k") == 3).then(-1.0).otherwise(pl.col("w")).alias("w")),
                  FORMULA, weights="w")
    with pytest.raises(MlsemError, match="weights column 'w' has 1 missing value"):
        mlsem.fit(seed.with_columns(pl.when((pl.col("k") == 4) & (pl.col("i") == 1) & (pl.col("j") == 1))
                                    .then(None).otherwise(pl.col("w")).alias("w")), FORMULA, weights="w")
    with pytest.raises(MlsemError, match="weights column 'w' varies within top-level unit"):
        mlsem.fit(seed.with_columns((pl.col("w") + pl.col("j")).alias("w")), FORMULA, weights="w")
    with pytest.raises(MlsemError, match=r"cluster column 'j' varies within top-level unit\(s\) k = "):
        mlsem.fit(seed, FORMULA, vce=("cluster", "j"))
    with pytest.raises(MlsemError, match="column 'nope' is not in the data"):
        mlsem.fit(seed, FORMULA, vce=("cluster", "nope"))
    with pytest.raises(MlsemError, match="vce='sandwich' is not one of"):
        mlsem.fit(seed, FORMULA, vce="sandwich")
    with pytest.raises(MlsemError, match=r"\('cluster', column\)"):
        mlsem.fit(seed, FORMULA, vce=("clusters", "region"))
    with pytest.raises(MlsemError, match="vce='oim' with weights"):
        mlsem.fit(seed, FORMULA, vce="oim", weights="w")
    with pytest.raises(MlsemError, match="method='reml' gives lme4's standard errors only"):
        mlsem.fit(seed, FORMULA, vce="robust", method="reml")
    with pytest.raises(MlsemError, match="method='bayes' is not one of"):
        mlsem.fit(seed, FORMULA, method="bayes")


# ---- REML ---------------------------------------------------------------------------
def test_reml_seed_inference_block(seed):
    ref = INF["reml"]
    res = mlsem.fit(seed, FORMULA, method="reml")
    assert res.method == "REML" and res.converged
    assert rel(-2.0 * res.loglik, ref["reml_criterion"]) < 1e-4
    co = res.coef
    se = dict(zip(res.names, res.std_err))
    for k, v in ref["fixed"].items():
        assert rel(co[k], v) < 1e-4
        assert rel(se[k], ref["fixed_se"][k]) < 1e-4
    for k, v in {"k": "k", "j:k": "j", "Residual": "Residual"}.items():
        assert rel(co[f"var({v})"], ref["variances"][k]) < 1e-4
    assert "REML" in res.summary()


@pytest.mark.parametrize("case", ["seed_balanced", "unbalanced", "hetero_corr", "pastes",
                                  "egsingle", "medium"])
def test_reml_every_lme4_case(case):
    c = load_case(case)
    ref = LME4_EXTRA[case]["reml"]
    res = mlsem.fit(REF / c["data"], c["formula"], method="reml")
    assert res.converged
    assert rel(-2.0 * res.loglik, ref["reml_criterion"]) < 1e-8
    co = res.coef
    se = dict(zip(res.names, res.std_err))
    for k, v in ref["fixed"].items():
        assert rel(co[k], v) < 1e-4, k
        assert rel(se[k], ref["fixed_se"][k]) < 1e-4, k
    for lv, v in ref["variances"].items():
        assert rel(co[f"var({lv})"], v) < 1e-4, lv


def test_reml_gradient_matches_finite_differences():
    from mlsem.estimate.reml import RemlObjective
    case = load_case("unbalanced")
    res = mlsem.fit(REF / case["data"], case["formula"])
    obj = RemlObjective(res.model)
    psi = res.estimate * 1.05
    _, g, _ = obj.value(psi)
    for i in np.flatnonzero(~obj.fixed):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (obj.value(up, need_grad=False)[0] - obj.value(dn, need_grad=False)[0]) / (2 * h)
        assert abs(fd - g[i]) < 1e-5 * max(1.0, abs(g[i])), res.names[i]


# ---- Wald ---------------------------------------------------------------------------
def test_wald_against_hand_computation(seed):
    res = mlsem.fit(seed, FORMULA, vce="oim")
    b = res.coef
    V = res.vcov
    ix = {n: i for i, n in enumerate(res.names)}
    # one restriction: the square of the z statistic
    w = res.wald("x = 0")
    assert abs(w["chi2"] - (b["x"] / res.std_err[ix["x"]]) ** 2) < 1e-9
    assert w["df"] == 1 and abs(w["p_value"] - stats.chi2.sf(w["chi2"], 1)) < 1e-15
    # two restrictions, written with coefficients and constants
    w = res.wald(["x - 2*Intercept = 2", "var(k) = var(j)"])
    R = np.zeros((2, len(res.names)))
    R[0, ix["x"]], R[0, ix["Intercept"]] = 1.0, -2.0
    R[1, ix["var(k)"]], R[1, ix["var(j)"]] = 1.0, -1.0
    d = R @ res.estimate - np.array([2.0, 0.0])
    cov = V.drop("name").to_numpy()
    chi2 = d @ np.linalg.inv(R @ cov @ R.T) @ d
    assert abs(w["chi2"] - chi2) < 1e-9 * chi2 and w["df"] == 2
    # the Wald test uses the fit's vce
    rob = mlsem.fit(seed, FORMULA, vce="robust")
    assert abs(rob.wald("x = 0")["chi2"] - (b["x"] / rob.std_err[ix["x"]]) ** 2) < 1e-9


def test_wald_errors(seed):
    res = mlsem.fit(seed, FORMULA)
    with pytest.raises(MlsemError, match=r"unknown parameter 'slope'.*parameters: Intercept, x"):
        res.wald("slope = 0")
    with pytest.raises(MlsemError, match="unknown parameter 'var\\(school\\)'"):
        res.wald(["x = 0", "var(school) = var(k)"])
    with pytest.raises(MlsemError, match="is not a restriction"):
        res.wald("x")
    with pytest.raises(MlsemError, match="linearly dependent"):
        res.wald(["x = 0", "2*x = 0"])
    with pytest.raises(MlsemError, match="involves no parameter"):
        res.wald("1 = 1")


def test_aic_bic_vcov(seed):
    res = mlsem.fit(seed, FORMULA)
    assert abs(res.aic - (-2 * res.loglik + 2 * 5)) < 1e-9
    assert abs(res.bic - (-2 * res.loglik + np.log(400) * 5)) < 1e-9
    assert res.vcov.columns == ["name"] + res.names


# ---- score tests ---------------------------------------------------------------------
def _lav_entry(lhs, op, rhs):
    return f"{LAT.get(lhs, lhs)} {op} {LAT.get(rhs, rhs)}".strip()


@pytest.fixture(scope="module")
def seed_scores(seed):
    return mlsem.fit(seed, FORMULA).score_tests()


def test_score_tests_equality_constraints(seed_scores):
    ref = INF["score_tests"]
    t = seed_scores
    joint = t.filter(pl.col("type") == "joint").row(0, named=True)
    assert rel(joint["chi2"], ref["total"]["X2"]) < 1e-3 and joint["df"] == ref["total"]["df"]
    assert rel(joint["p_value"], ref["total"]["p.value"]) < 1e-3
    plab = {p["plabel"]: _lav_entry(p["lhs"], p["op"], p["rhs"]) for p in ref["parameters"]}
    eq = {(r["lhs"], r["rhs"]): r for r in t.filter(pl.col("type") == "equality").iter_rows(named=True)}
    assert len(eq) == len(ref["per_constraint"]) == 10
    for c in ref["per_constraint"]:
        r = eq[(plab[c["lhs"]], plab[c["rhs"]])]
        assert rel(r["chi2"], c["X2"]) < 1e-3, (c["lhs"], c["rhs"])
        label = next(p["label"] for p in ref["parameters"] if p["plabel"] == c["lhs"])
        assert r["param"] == LAV[label]


def test_modification_indices(seed_scores):
    """All of lavaan's top 10: covariances of effects and residuals, loadings,
    regressions on another slot's covariate, on another slot's outcome, and
    of a covariate on an outcome (lavaan's joint model of y and x)."""
    fixed = {(r["lhs"], r["op"], r["rhs"]): r
             for r in seed_scores.filter(pl.col("type") == "fixed").iter_rows(named=True)}
    for m in INF["modindices_top10"]:
        r = fixed[(LAT.get(m["lhs"], m["lhs"]), m["op"], LAT.get(m["rhs"], m["rhs"]))]
        assert rel(r["chi2"], m["mi"]) < 1e-3, m
        assert rel(r["epc"], m["epc"]) < 1e-3, m
    # mlsem also scores loadings on another school's effect (j[1] =~ y2_1, fixed
    # at 0), which lavaan's modindices leaves out of its candidate list
    assert ("j[1]", "=~", "y2_1") in fixed


def test_score_tests_missing_data():
    """lavaan's lavTestScore and modindices with missing cells (FIML)."""
    ref = FIT_TEST["seed_balanced_missing"]
    t = mlsem.fit(seed_missing(), FORMULA, index="i").score_tests()
    joint = t.filter(pl.col("type") == "joint").row(0, named=True)
    assert rel(joint["chi2"], ref["score_total"]["X2"]) < 1e-3
    eq = {(r["lhs"], r["rhs"]): r["chi2"] for r in t.filter(pl.col("type") == "equality").iter_rows(named=True)}

    def conv(s):
        return " ".join(LAT.get(w, w) for w in s.split())
    for u in ref["score_uni"]:
        assert rel(eq[(conv(u["lhs_entry"]), conv(u["rhs_entry"]))], u["X2"]) < 1e-3, u
    fixed = {(r["lhs"], r["op"], r["rhs"]): r for r in t.filter(pl.col("type") == "fixed").iter_rows(named=True)}
    for m in ref["modindices_top20"]:
        r = fixed[(LAT.get(m["lhs"], m["lhs"]), m["op"], LAT.get(m["rhs"], m["rhs"]))]
        assert rel(r["chi2"], m["mi"]) < 1e-3, m
        assert rel(r["epc"], m["epc"]) < 1e-3, m


def test_score_tests_observed_information_option(seed):
    res = mlsem.fit(seed, FORMULA)
    t = res.score_tests(information="observed", fixed=False)
    assert t.filter(pl.col("type") == "joint")["chi2"][0] > 0
    with pytest.raises(MlsemError, match="information='fisher'"):
        res.score_tests(information="fisher")


def test_score_tests_unbalanced_runs():
    case = load_case("unbalanced")
    res = mlsem.fit(REF / case["data"], case["formula"])
    t = res.score_tests(fixed=False)
    # the equality constraints are the relaxed entries that share a parameter
    ntied = {"Intercept": 24, "x1": 24, "z": 24, "var(j)": 4, "var(Residual)": 24}
    counts = dict(t.filter(pl.col("type") == "equality").group_by("param").len().iter_rows())
    assert counts == {k: v - 1 for k, v in ntied.items()}
    joint = t.filter(pl.col("type") == "joint").row(0, named=True)
    assert joint["df"] == t.filter(pl.col("type") == "equality").height
    assert np.isfinite(joint["chi2"]) and joint["chi2"] > 0


# ---- fit against the saturated model ------------------------------------------------------
def test_weights_on_unbalanced_data():
    case = load_case("unbalanced")
    d = pl.read_parquet(REF / case["data"]).with_columns((1.0 + (pl.col("k") % 3)).alias("w"))
    res = mlsem.fit(d, case["formula"], weights="w")
    assert res.converged and np.all(np.isfinite(res.std_err))
    # duplicating every county with weight 2 = weight 2 (pseudo-ML estimates)
    w2 = mlsem.fit(d.with_columns(pl.when(pl.col("k") % 2 == 0).then(2.0).otherwise(1.0).alias("w")),
                   case["formula"], weights="w")
    dup = pl.concat([d, d.filter(pl.col("k") % 2 == 0).with_columns(pl.col("k") + 100000)])
    ref = mlsem.fit(dup, case["formula"])
    assert np.allclose(w2.estimate, ref.estimate, rtol=1e-5)


def test_fit_test_seed(seed):
    ref = FIT_TEST["seed_balanced"]
    ft = mlsem.fit(seed, FORMULA).fit_test()
    assert ft["df"] == ref["df"] == 25      # the seed's chi2(25)
    assert rel(ft["chi2"], ref["chisq"]) < 1e-4
    assert abs(ft["loglik_saturated"] - ref["unrestricted_loglik"]) < 1e-4


def test_fit_test_missing_data_em():
    ref = FIT_TEST["seed_balanced_missing"]
    res = mlsem.fit(seed_missing(), FORMULA, index="i")
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    ft = res.fit_test()
    assert ft["df"] == ref["df"]
    assert rel(ft["chi2"], ref["chisq"]) < 1e-4
    assert abs(ft["loglik_saturated"] - ref["unrestricted_loglik"]) < 1e-4
    assert ft["em_iterations"] > 1


def test_fit_test_refusals(seed):
    case = load_case("unbalanced")
    res = mlsem.fit(REF / case["data"], case["formula"])
    with pytest.raises(MlsemError, match="the saturated model is not identified"):
        res.fit_test()
    with pytest.raises(MlsemError, match="sampling weights"):
        mlsem.fit(seed, FORMULA, weights="w").fit_test()
    with pytest.raises(MlsemError, match="ML fit"):
        mlsem.fit(seed, FORMULA, method="reml").fit_test()
