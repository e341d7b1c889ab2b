"""ADF / GMM estimation, the Satorra-Bentler scaled test, and the SEM side's
inference options (vce="robust", ("cluster", col), weights=, fit_test()).

References:
* extra/gmm.json: lavaan 0.6.14's estimator = "WLS" (``wls``) and "MLM"
  (``mlm``) on the wide form of seed_balanced (variants ``standard`` and
  ``hetero``, each with its lavaan ``model``) and on hs_cfa (copied from the
  shared reference folder, key ``gmm``);
* seed_balanced.json key ``inference``: lavaan's robust / cluster / weighted
  FIML fits of the seed's wide form;
* extra/gmm_extra.json (extra/make_gmm_extra.R): lavaan's robust.huber.white
  and cluster-robust FIML fits of hs_cfa and hs_cfa_missing, with chisq / df.
"""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError
from mlsem.estimate.adf import (AdfObjective, Moments, MultilevelMoments, robust_sem_vcov,
                       sigma_and_jacobian)
from mlsem.api.bridge import multilevel
from mlsem.model.semscores import sem_row_scores
from conftest import REF, load_case

GMM = json.load(open(REF / "extra" / "gmm.json"))
EXTRA = json.load(open(REF / "extra" / "gmm_extra.json"))
SEED = load_case("seed_balanced")
INF = SEED["inference"]
FORMULA = "y ~ x + (1 | k/j)"
HS_MODEL = GMM["hs_cfa"]["model"]
# lavaan labels of the wide form -> mlsem.fit's parameter names
LAV = {"c": "Intercept", "b_x": "x", "su": "var(k)", "se": "var(Residual)"}
LAV_SV = {"standard": {"sv": "var(j)"}, "hetero": {"sv1": "var(j[1])", "sv2": "var(j[2])"}}
HETERO = {"j": {"variance": "slot"}}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def close(a, b, tol, atol=1e-5):
    return abs(a - b) <= max(tol * abs(b), atol)


@pytest.fixture(scope="module")
def seed_long():
    return pl.read_parquet(REF / SEED["data"])


@pytest.fixture(scope="module")
def wide(seed_long):
    w = mlsem.to_wide(seed_long, FORMULA, index="i")
    return w.join(pl.DataFrame(INF["weights"]), on="k")


@pytest.fixture(scope="module")
def hs():
    return pl.read_parquet(REF / "hs_cfa.parquet")


@pytest.fixture(scope="module")
def hs_missing():
    return pl.read_parquet(REF / "hs_cfa_missing.parquet")


def sem_key(row):
    if row["label"]:
        return row["label"]
    return f"{row['lhs']}~1" if row["op"] == "~1" else f"{row['lhs']}{row['op']}{row['rhs']}"


def check_sem(res, block, est_tol=1e-4, se_tol=1e-5, se=True):
    """Every free parameter of an SEM fit against a lavaan block keyed by label
    or 'lhs op rhs'."""
    n = 0
    for row in res.params.iter_rows(named=True):
        k = sem_key(row)
        assert close(row["estimate"], block["estimates"][k], est_tol), (k, row["estimate"])
        if se:
            assert rel(row["std_err"], block["std_errors"][k]) < se_tol, (k, row["std_err"])
        n += 1
    assert n == res.nparams > 0


# ---- ADF against lavaan's estimator = "WLS" ---------------------------------------------
@pytest.mark.parametrize("variant", ["standard", "hetero"])
def test_adf_seed_wide_form(wide, variant):
    ref = GMM["seed_balanced"][variant]
    res = mlsem.sem(ref["model"], wide, method="adf")
    assert res.method == "ADF" and res.vce == "adf" and res.converged
    check_sem(res, ref["wls"])
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["wls"]["chisq"]) < 1e-6
    assert ft["df"] == ref["wls"]["df"]
    assert rel(ft["p_value"], ref["wls"]["pvalue"]) < 1e-5
    # "gmm" is the same estimator
    res2 = mlsem.sem(ref["model"], wide, method="gmm")
    assert np.allclose(res2.estimate, res.estimate, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["standard", "hetero"])
def test_adf_multilevel_fit(seed_long, variant):
    """mlsem.fit(method='adf') fits the wide form with the multilevel table."""
    ref = GMM["seed_balanced"][variant]["wls"]
    res = mlsem.fit(seed_long, FORMULA, method="adf", index="i",
                    effects=HETERO if variant == "hetero" else None)
    assert res.method == "ADF"
    co, se = res.coef, dict(zip(res.names, res.std_err))
    for lab, name in {**LAV, **LAV_SV[variant]}.items():
        assert close(co[name], ref["estimates"][lab], 1e-4), name
        assert rel(se[name], ref["std_errors"][lab]) < 1e-5, name
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]
    assert "ADF (GMM)" in res.summary() and "F_min" in res.summary()
    assert res.to_dict()["adf"]["df"] == ref["df"]


def test_adf_hs_cfa(hs):
    ref = GMM["hs_cfa"]["wls"]
    res = mlsem.sem(HS_MODEL, hs, method="adf")
    check_sem(res, ref)
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"] == 24
    assert "ADF" in res.summary()


# ---- the gradient and the Jacobian against finite differences ------------------------------
def _fd_check(obj, psi, h=1e-6):
    f, g, D = obj.value_grad(psi)
    gn = np.zeros_like(psi)
    Dn = np.zeros_like(D)
    for k in range(len(psi)):
        e = np.zeros_like(psi)
        e[k] = h * max(1.0, abs(psi[k]))
        gn[k] = (obj.value(psi + e) - obj.value(psi - e)) / (2 * e[k])
        Dn[:, k] = (obj.fn(psi + e, False)[0] - obj.fn(psi - e, False)[0]) / (2 * e[k])
    assert np.allclose(D, Dn, rtol=1e-6, atol=1e-7 * max(1.0, np.abs(D).max()))
    assert np.allclose(g, gn, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(g).max()))
    return g


def _sem_objective(model_text, data):
    from mlsem.api.semfit import _wide_arrays
    from mlsem.data.prepare import scan
    from mlsem.data.wide import prepare_wide
    from mlsem.model.sem import SemModel
    from mlsem.spec.lavaan import parse
    from mlsem.spec.semtable import build_table
    lf = scan(data)
    table = build_table(parse(model_text), lf.collect_schema().names())
    Y, X = _wide_arrays(lf, table.observed, table.covariates, data)
    mom = Moments(Y, X, table.observed + table.covariates)
    m = SemModel(table, prepare_wide(table, Y, X), backend="numpy", Y=Y)
    return AdfObjective.for_sem(m, mom), m


def test_adf_gradient_matches_finite_differences(hs, wide):
    rng = np.random.default_rng(7)
    for text, data in [(HS_MODEL, hs), (GMM["seed_balanced"]["hetero"]["model"], wide)]:
        obj, m = _sem_objective(text, data)
        psi = m.start_values() * (1 + 0.1 * rng.standard_normal(m.ntau))
        g = _fd_check(obj, psi)
        assert np.abs(g).max() > 1e-3          # away from the minimum: the check has teeth


def test_adf_gradient_every_matrix():
    """A structural model with free loadings, a latent regression (B), a latent
    intercept, an observed covariate of a latent (Gamma_eta) and of an observed
    variable (Gamma_y): every branch of the analytic Jacobian."""
    rng = np.random.default_rng(3)
    n = 400
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)
    f1 = 0.5 * z1 + rng.standard_normal(n)
    f2 = 0.7 * f1 + rng.standard_normal(n)
    d = {f"y{i}": (1 + 0.2 * i) * (f1 if i <= 3 else f2) + rng.standard_normal(n) for i in range(1, 7)}
    d["y6"] = d["y6"] + 0.4 * z2
    data = pl.DataFrame({**d, "z1": z1, "z2": z2})
    text = ("f1 =~ y1 + y2 + y3\n f2 =~ y4 + y5 + y6\n f2 ~ f1\n f1 ~ z1\n y6 ~ z2\n"
            " y1 ~~ y4\n f2 ~ 1\n y4 ~ 0*1")
    obj, m = _sem_objective(text, data)
    mats = {mat for mat in ("lambda", "beta", "psi", "theta", "nu", "alpha", "gy", "geta")
            if len(m.idx[mat][0])}
    assert mats == {"lambda", "beta", "psi", "theta", "nu", "alpha", "gy", "geta"}
    psi = m.start_values() + 0.05 * rng.standard_normal(m.ntau)
    _fd_check(obj, psi)
    res = mlsem.sem(text, data, method="adf")
    assert res.converged and np.abs(res.opt.gradient_norm) < 1e-6


def test_multilevel_moments_jacobian(seed_long):
    spec = multilevel(FORMULA, seed_long, index="i")
    from mlsem.spec.relax import relax_table
    table = relax_table(spec.multilevel_table, spec.prep, HETERO, None, "i")
    mm = MultilevelMoments(spec.prep, table)
    obj = AdfObjective(mm, mm.mom)
    psi = np.array([0.1, 2.0, 1.0, 1.5, 0.7, 1.2])[:table.nparams]
    _fd_check(obj, psi)


# ---- Satorra-Bentler (lavaan's MLM) ------------------------------------------------------------
@pytest.mark.parametrize("variant", ["standard", "hetero"])
def test_scaled_test_seed(wide, seed_long, variant):
    ref = GMM["seed_balanced"][variant]["mlm"]
    fits = [mlsem.sem(GMM["seed_balanced"][variant]["model"], wide, vce="robust"),
            mlsem.fit(seed_long, FORMULA, vce="robust", index="i",
                      effects=HETERO if variant == "hetero" else None)]
    for res in fits:
        ft = res.fit_test()
        assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]
        assert rel(ft["chi2_scaled"], ref["chisq_scaled"]) < 1e-5
        assert rel(ft["scaling_factor"], ref["scaling_factor"]) < 1e-5
        assert "Huber-White" in ft["scaled_test"]
    # without vce="robust" there is no scaled statistic
    assert "chi2_scaled" not in mlsem.fit(seed_long, FORMULA, index="i").fit_test()


def test_scaled_test_hs_cfa_and_mlm_standard_errors(hs, wide):
    ref = GMM["hs_cfa"]["mlm"]
    res = mlsem.sem(HS_MODEL, hs, vce="robust")
    ft = res.fit_test()
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]
    assert rel(ft["chi2_scaled"], ref["chisq_scaled"]) < 1e-5
    # MLM's own standard errors (robust.sem: expected-information bread)
    for text, data, block in [(HS_MODEL, hs, ref),
                              (GMM["seed_balanced"]["standard"]["model"], wide,
                               GMM["seed_balanced"]["standard"]["mlm"])]:
        fit = mlsem.sem(text, data)
        t = fit.model.table
        mom = Moments(fit.model.Y, fit.model.prep.X, t.observed + t.covariates, unbiased=False)
        _, D, C = sigma_and_jacobian(fit.model, fit.estimate, mom)
        se = np.sqrt(np.diag(robust_sem_vcov(C, D, mom)))
        for row, s in zip(fit.params.iter_rows(named=True), se):
            assert close(row["estimate"], block["estimates"][sem_key(row)], 1e-4)
            assert rel(s, block["std_errors"][sem_key(row)]) < 1e-5, sem_key(row)


def test_scaled_test_refused_on_missing_cells(hs_missing):
    ft = mlsem.sem(HS_MODEL, hs_missing, vce="robust").fit_test()
    assert np.isnan(ft["chi2_scaled"]) and "Yuan-Bentler" in ft["scaled_note"]
    ref = EXTRA["hs_cfa_missing"]["robust"]
    assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]


# ---- SEM fits: fit_test, robust, cluster, weights -----------------------------------------------
def test_sem_fit_test(hs, hs_missing):
    for data, case in [(hs, "hs_cfa"), (hs_missing, "hs_cfa_missing")]:
        ref = EXTRA[case]["robust"]
        res = mlsem.sem(HS_MODEL, data)
        ft = res.fit_test()
        assert abs(res.loglik - ref["loglik"]) < 1e-4
        assert rel(ft["chi2"], ref["chisq"]) < 1e-6 and ft["df"] == ref["df"]
        assert "chi2_scaled" not in ft


@pytest.mark.parametrize("key,kw", [("oim", {}), ("robust", {"vce": "robust"}),
                                    ("cluster_region", {"vce": ("cluster", "region")}),
                                    ("weighted", {"weights": "w"})])
def test_sem_inference_options_seed(wide, key, kw):
    res = mlsem.sem(GMM["seed_balanced"]["standard"]["model"], wide, **kw)
    block = INF[key]
    assert abs(res.loglik - block["loglik"]) < 1e-4
    co, se = res.coef, dict(zip(res.names, res.std_err))
    for lab in block["estimates"]:
        assert rel(co[lab], block["estimates"][lab]) < 1e-4, lab
        assert rel(se[lab], block["std_errors"][lab]) < 1e-5, lab
    if key == "cluster_region":
        assert res.vce == "cluster(region)" and "10 clusters" in res.summary()
        ft = res.fit_test()
        assert "chi2_scaled" not in ft and "cluster-robust" in ft["scaled_note"]
    if key == "weighted":
        assert res.vce == "robust"
        # the weighted saturated model (lavaan's values: test_adf_fixes.py)
        ft = res.fit_test()
        assert "sampling weights" in ft["test"] and ft["df"] == 25 and "chi2_scaled" not in ft


@pytest.mark.parametrize("case", ["hs_cfa", "hs_cfa_missing"])
def test_sem_robust_and_cluster_hs(hs, hs_missing, case):
    data = (hs if case == "hs_cfa" else hs_missing).with_row_index("row").with_columns(
        ((pl.col("row") // 5) + 1).alias("school"))
    for key, kw in [("robust", {"vce": "robust"}), ("cluster_school", {"vce": ("cluster", "school")})]:
        res = mlsem.sem(HS_MODEL, data, **kw)
        check_sem(res, EXTRA[case][key])


def test_sem_scores_sum_to_gradient(hs_missing):
    res = mlsem.sem(HS_MODEL, hs_missing)
    m = res.model
    psi = res.estimate * 1.05
    S = sem_row_scores(m, psi)
    ll, g = m.evaluate(psi)
    assert np.allclose(S.sum(axis=0), g, rtol=1e-7, atol=1e-7 * np.abs(g).max())


# ---- bad input --------------------------------------------------------------------------------------
def test_adf_refuses_missing_cells(hs_missing):
    case = load_case("unbalanced")
    with pytest.raises(MlsemError, match="needs complete data.*method='ml'"):
        mlsem.fit(REF / case["data"], case["formula"], method="adf")
    with pytest.raises(MlsemError, match="needs complete data: column 'x1'.*FIML"):
        mlsem.sem(HS_MODEL, hs_missing, method="adf")


def test_adf_refuses_too_few_units(hs):
    # 9 means + 45 (co)variances = 54 moments
    with pytest.raises(MlsemError, match="more units than moments: 54 unit.*54 sample moments.*method='ml'"):
        mlsem.sem(HS_MODEL, hs.head(54), method="adf")
    assert mlsem.sem(HS_MODEL, hs.head(80), method="adf").nobs == 80


def test_adf_refuses_singular_weight_matrix(hs, wide):
    with pytest.raises(MlsemError, match="column 'x3' is constant.*singular"):
        mlsem.sem(HS_MODEL, hs.with_columns(pl.lit(1.0).alias("x3")), method="adf")
    with pytest.raises(MlsemError, match="column 'x1_2' is constant"):
        mlsem.sem(GMM["seed_balanced"]["standard"]["model"], wide.with_columns(pl.lit(0.5).alias("x1_2")),
                  method="adf")
    # a variable that is an exact copy of another: Gamma is singular
    with pytest.raises(MlsemError, match="Gamma\\) is singular"):
        mlsem.sem(HS_MODEL, hs.with_columns(pl.col("x1").alias("x2")), method="adf")


def test_option_refusals(wide, seed_long):
    model = GMM["seed_balanced"]["standard"]["model"]
    with pytest.raises(MlsemError, match="vce='robust'.*not available"):
        mlsem.sem(model, wide, method="adf", vce="robust")
    with pytest.raises(MlsemError, match="weights="):
        mlsem.sem(model, wide, method="adf", weights="w")
    with pytest.raises(MlsemError, match="cannot be combined"):
        mlsem.fit(seed_long, FORMULA, method="adf", vce="robust")
    with pytest.raises(MlsemError, match="vce='oim' with weights"):
        mlsem.sem(model, wide, vce="oim", weights="w")
    with pytest.raises(MlsemError, match="vce='mixed' is the multilevel convention"):
        mlsem.sem(model, wide, vce="mixed")
    with pytest.raises(MlsemError, match="method='reml'"):
        mlsem.sem(model, wide, method="reml")
    with pytest.raises(MlsemError, match="column 'nope'"):
        mlsem.sem(model, wide, vce=("cluster", "nope"))
    with pytest.raises(MlsemError, match="no likelihood"):
        mlsem.lrtest(mlsem.fit(seed_long, FORMULA, method="adf"), mlsem.fit(seed_long, FORMULA))
    with pytest.raises(MlsemError, match="structured residual covariance"):
        mlsem.fit(seed_long, FORMULA, method="adf", index="i", residuals={"correlation": "ar1"})


def test_cli_method_adf(tmp_path, seed_long, wide):
    from mlsem.cli.main import main
    data = tmp_path / "seed.parquet"
    seed_long.write_parquet(data)
    rc = main(["fit", str(data), "-f", FORMULA, "--method", "adf", "--index", "i",
               "--out", str(tmp_path / "r.parquet"), "--json", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    rec = json.load(open(tmp_path / "r.json"))
    ref = GMM["seed_balanced"]["standard"]["wls"]
    assert rec["method"].upper() == "ADF" and rel(rec["tests"]["adf_vs_saturated"]["chi2"], ref["chisq"]) < 1e-6
    tab = pl.read_parquet(tmp_path / "r.parquet")
    assert rel(tab.filter(pl.col("name") == "x")["estimate"][0], ref["estimates"]["b_x"]) < 1e-4
    wide.write_parquet(tmp_path / "wide.parquet")
    (tmp_path / "m.lav").write_text(GMM["seed_balanced"]["standard"]["model"])
    rc = main(["fit", str(tmp_path / "wide.parquet"), "--syntax", str(tmp_path / "m.lav"), "--vce", "robust",
               "--out", str(tmp_path / "r2.parquet"), "-q"])
    assert rc == 0
    tab = pl.read_parquet(tmp_path / "r2.parquet")
    assert rel(tab.filter(pl.col("name") == "b_x")["std_err"][0], INF["robust"]["std_errors"]["b_x"]) < 1e-5


def test_adf_coefficient_relaxation_equals_sem_syntax(seed_long, wide):
    """coefficients={"x": "j"} by ADF through mlsem.fit = the same SEM written by hand."""
    res = mlsem.fit(seed_long, FORMULA, index="i", method="adf", coefficients={"x": "j"})
    text = GMM["seed_balanced"]["standard"]["model"]
    for s in ("1_1", "1_2", "2_1", "2_2"):
        text = text.replace(f"y{s} ~ b_x*x{s}", f"y{s} ~ b{s[0]}*x{s}")
    sem = mlsem.sem(text, wide, method="adf")
    a, b = res.coef, sem.coef
    pairs = {"Intercept": "c", "x[1]": "b1", "x[2]": "b2", "var(k)": "su", "var(j)": "sv",
             "var(Residual)": "se"}
    for n, lab in pairs.items():
        assert a[n] == pytest.approx(b[lab], rel=1e-6)
    assert res.fit_test()["chi2"] == pytest.approx(sem.fit_test()["chi2"], rel=1e-8)
    assert res.fit_test()["df"] == 24
