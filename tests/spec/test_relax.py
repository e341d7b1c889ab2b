"""Relaxations of the mixed model's constraints (mlsem.spec.relax) against lavaan
0.6-14, nlme 3.1-162 and lme4 1.1-31 on R 4.2.2 (each reference block names its
program), identification, LR tests, unbalanced data and invalid relaxations."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from conftest import REF, load_case

HC = REF / "hetero_corr.parquet"
UB = REF / "unbalanced.parquet"


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def close(a, b, tol=1e-4):
    """Estimates within 1e-4 relative (1e-5 absolute near 0, DESIGN.md section 7)."""
    return rel(a, b) < tol or abs(a - b) < 1e-5


LAVAAN = {"b_x": "x", "c": "Intercept", "se": "var(Residual)", "su": "var(k)",
          "sv1": "var(j[1])", "sv2": "var(j[2])", "c12": "cov(j[1],j[2])"}


# ---- lavaan: the wide SEM with freed constraints ----------------------------------
@pytest.mark.parametrize("variant, formula, effects", [
    ("hetero", "y ~ x + (1 | k/j)", {"j": {"variance": "slot"}}),
    ("unstructured_noU", "y ~ x + (1 | k:j)", {"j": {"variance": "slot", "covariance": "unstructured"}}),
])
def test_lavaan_variants(variant, formula, effects):
    lav = load_case("hetero_corr")["lavaan"][variant]
    res = mlsem.fit(HC, formula, effects=effects, vce="oim")
    assert res.converged and res.identified
    assert abs(res.loglik - lav["loglik"]) < 1e-4
    assert sorted(res.names) == sorted(LAVAAN[k] for k in lav["estimates"])
    se = dict(zip(res.names, res.std_err))
    for k, v in lav["estimates"].items():
        assert close(res.coef[LAVAAN[k]], v), k
    for k, v in lav["std_errors"].items():
        assert rel(se[LAVAAN[k]], v) < 1e-3, k


def test_hetero_corr12_is_not_identified():
    lav = load_case("hetero_corr")["lavaan"]["hetero_corr12"]
    res = mlsem.fit(HC, "y ~ x + (1 | k/j)", vce="oim",
                    effects={"j": {"variance": "slot", "covariance": [(1, 2)]}})
    assert abs(res.loglik - lav["loglik"]) < 1e-4   # the same maximum, reached on a ridge
    assert not res.identified
    assert set(res.confounded) == {"var(k)", "var(j[1])", "var(j[2])", "cov(j[1],j[2])"}
    se = dict(zip(res.names, res.std_err))
    assert np.isnan(se["cov(j[1],j[2])"]) and np.isnan(se["var(k)"])
    assert rel(se["x"], lav["std_errors"]["b_x"]) < 1e-3   # identified parts keep theirs
    text = res.summary()
    assert "NOT identified" in text and "cov(j[1],j[2])" in text and "var(k)" in text


def test_exchangeable_residuals_confounded_with_var_j():
    res = mlsem.fit(HC, "y ~ x + (1 | k/j)", residuals={"correlation": "exchangeable"})
    assert not res.identified
    assert {"var(j)", "corr(Residual)"} <= set(res.confounded)
    assert "var(k)" not in res.confounded and "x" not in res.confounded
    # the same covariance matrices as the standard model: the same maximum
    std = mlsem.fit(HC, "y ~ x + (1 | k/j)")
    assert abs(res.loglik - std.loglik) < 1e-6
    assert "NOT identified" in res.summary()


# ---- nlme: residual structures --------------------------------------------------------
@pytest.mark.parametrize("case_name", ["unbalanced", "hetero_corr"])
def test_nlme_ar1(case_name):
    case = load_case(case_name)
    ref = case["relaxed"]["ar1"]
    res = mlsem.fit(REF / case["data"], case["formula"], index="i",
                    residuals={"correlation": "ar1"})
    assert res.converged and res.identified
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    c = res.coef
    for k, v in ref["fixed"].items():
        assert close(c[k], v), k
    assert close(c["var(k)"], ref["var_k"]) and close(c["var(j)"], ref["var_j"])
    assert close(c["var(Residual)"], ref["var_residual"])
    assert close(c["corr(Residual)"], ref["phi"])
    se = dict(zip(res.names, res.std_err))
    for k, v in ref["fixed_se"].items():
        assert rel(se[k], v) < 1e-3, k


@pytest.mark.parametrize("case_name", ["unbalanced", "hetero_corr"])
def test_nlme_resid_by_j(case_name):
    case = load_case(case_name)
    ref = case["relaxed"]["resid_by_j"]
    res = mlsem.fit(REF / case["data"], case["formula"], residuals={"variance": "j"})
    assert res.converged and res.identified
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    c = res.coef
    for k, v in ref["fixed"].items():
        assert close(c[k], v), k
    assert close(c["var(k)"], ref["var_k"]) and close(c["var(j)"], ref["var_j"])
    assert "var(Residual)" not in c
    for g, ratio in ref["residual_sd_ratio"].items():
        assert close(c[f"var(Residual[{g}])"], ref["var_residual"] * ratio ** 2), g
    se = dict(zip(res.names, res.std_err))
    for k, v in ref["fixed_se"].items():
        assert rel(se[k], v) < 1e-3, k


# ---- lme4: coefficients by slot, random slopes --------------------------------------
@pytest.mark.parametrize("case_name", ["unbalanced", "hetero_corr"])
def test_lme4_slope_by_j(case_name):
    case = load_case(case_name)
    ref = case["relaxed"]["slope_by_j"]
    x = case["covariates"][0]
    res = mlsem.fit(REF / case["data"], case["formula"], coefficients={x: "j"})
    assert res.converged
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    c = res.coef
    se = dict(zip(res.names, res.std_err))
    for k, v in ref["fixed"].items():
        name = "Intercept" if k == "(Intercept)" else k.replace(f"{x}:jf", f"{x}[") + ("]" if ":jf" in k else "")
        assert close(c[name], v), k
        assert rel(se[name], ref["fixed_se"][k]) < 1e-3, k
    assert x not in c
    assert close(c["var(j)"], ref["variances"]["j:k"]) and close(c["var(k)"], ref["variances"]["k"])
    assert close(c["var(Residual)"], ref["variances"]["Residual"])


def _lme4_cov(cov, x):
    out = {}
    for row in cov:
        grp, v1, v2 = row["grp"], row["var1"], row["var2"]
        if grp == "Residual":
            out["var(Residual)"] = row["vcov"]
        elif grp in ("k:j", "k.j"):
            out["var(j)"] = row["vcov"]
        elif v2 is None:
            out["var(k:Intercept)" if v1 == "(Intercept)" else f"var(k:{x})"] = row["vcov"]
        else:
            out[f"cov(k:Intercept,k:{x})"] = row["vcov"]
    return out


@pytest.mark.parametrize("case_name", ["unbalanced", "hetero_corr"])
def test_lme4_random_slope(case_name):
    case = load_case(case_name)
    x = case["covariates"][0]
    ref = case["relaxed"]["random_slope"]
    tight = json.load(open(REF / "extra" / "relaxed_extra.json"))[case_name]["random_slope"]
    res = mlsem.fit(REF / case["data"], ref["formula"])
    assert res.converged
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    assert abs(res.loglik - tight["loglik"]) < 1e-6
    c = res.coef
    for k, v in tight["fixed"].items():
        assert close(c[k], v), k
    for k, v in _lme4_cov(tight["covariance"], x).items():
        assert close(c[k], v), k
    # on hetero_corr the k block is singular (correlation 1): the information is
    # still computed (one-sided differences at the boundary), the fixed effects'
    # standard errors are lme4's
    se = dict(zip(res.names, res.std_err))
    for k, v in tight["fixed_se"].items():
        assert rel(se[k], v) < 1e-3, k


@pytest.mark.parametrize("case_name", ["unbalanced", "hetero_corr"])
def test_lme4_random_slope_uncorrelated(case_name):
    case = load_case(case_name)
    x = case["covariates"][0]
    ref = json.load(open(REF / "extra" / "lme4_extra.json"))[case_name]["random_slope_uncorrelated"]
    res = mlsem.fit(REF / case["data"], ref["formula"])
    assert res.converged
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    assert not any(n.startswith("cov(") for n in res.names)
    c = res.coef
    for k, v in ref["fixed"].items():
        assert close(c[k], v), k
    for k, v in _lme4_cov(ref["covariance"], x).items():
        assert close(c[k], v), k


# ---- LR tests ------------------------------------------------------------------------
def test_lrtest_each_relaxation():
    std = mlsem.fit(HC, "y ~ x + (1 | k/j)")
    het = mlsem.fit(HC, "y ~ x + (1 | k/j)", effects={"j": {"variance": "slot"}})
    t = mlsem.lrtest(std, het)
    assert t.df == 1
    assert abs(t.chi2 - 2 * (het.loglik - std.loglik)) < 1e-9
    from scipy import stats
    assert abs(t.p_value - stats.chi2.sf(t.chi2, 1)) < 1e-12
    assert not t.boundary            # var(j[1]) = var(j[2]) is an interior restriction
    assert "chi2(1)" in str(t)
    # residual variance by slot, slope by slot, AR(1): each one more parameter
    for kw in (dict(residuals={"variance": "j"}), dict(coefficients={"x": "j"}),
               dict(residuals={"correlation": "ar1"}, index="i")):
        r = mlsem.fit(HC, "y ~ x + (1 | k/j)", **kw)
        t = mlsem.lrtest(std, r)
        assert t.df == 1 and t.chi2 >= 0 and 0 < t.p_value <= 1 and not t.boundary
    # a random slope tests a variance at 0: the boundary note and the chi-bar-square p
    slope = mlsem.fit(UB, "y ~ x1 + z + (1 + x1 | k) + (1 | k:j)")
    base = mlsem.fit(UB, "y ~ x1 + z + (1 | k) + (1 | k:j)")
    t = mlsem.lrtest(base, slope)
    assert t.df == 2 and t.boundary
    mix = 0.5 * stats.chi2.sf(t.chi2, 1) + 0.5 * stats.chi2.sf(t.chi2, 2)
    assert abs(t.p_value_boundary - mix) < 1e-12 and t.p_value_boundary < t.p_value
    assert "boundary" in str(t)
    # the order does not matter, a non-nested pair is refused
    assert mlsem.lrtest(slope, base).chi2 == t.chi2
    with pytest.raises(mlsem.MlsemError, match="nested"):
        mlsem.lrtest(std, mlsem.fit(UB, "y ~ x1 + z + (1 | k/j)"))
    with pytest.raises(mlsem.MlsemError, match="same number of parameters"):
        mlsem.lrtest(het, mlsem.fit(HC, "y ~ x + (1 | k/j)", residuals={"variance": "j"}))


# ---- unbalanced data: every relaxation, checked against the dense NumPy oracle --------
RELAXATIONS = [
    dict(effects={"j": {"variance": "slot"}}),
    dict(effects={"j": {"variance": {"low": [1, 2], "high": [3, 4]}}}),
    dict(effects={"j": {"variance": "slot", "covariance": "equal"}}),
    dict(effects={"j": {"covariance": {"a": [1, 2], "b": [3, 4]}}}),
    dict(effects={"j": {"variance": "slot", "covariance": [(1, 2), (3, 4)]}}),
    dict(residuals={"variance": "j"}),
    dict(residuals={"variance": "i"}, index="i"),
    dict(residuals={"correlation": "ar1"}, index="i"),
    dict(residuals={"variance": "j", "correlation": "ar1"}, index="i"),
    dict(coefficients={"x1": "j", "Intercept": "j"}),
]


@pytest.mark.parametrize("kw", RELAXATIONS, ids=lambda kw: json.dumps(kw, default=str)[:60])
def test_relaxations_on_unbalanced_data(kw):
    formula = "y ~ x1 + z + (1 | k/j)"
    if kw.get("effects", {}).get("j", {}).get("covariance") not in (None, "none"):
        formula = "y ~ x1 + z + (1 | k:j)"   # without the county effect: identified
    res = mlsem.fit(UB, formula, **kw)
    std = mlsem.fit(UB, formula)
    assert res.converged
    assert res.loglik >= std.loglik - 1e-6          # a relaxation never fits worse
    assert res.nparams > std.nparams
    # the kernel's likelihood and gradient at the estimate equal the NumPy oracle's
    m = res.model
    ll, g = m.evaluate(res.estimate)
    from mlsem.model.multilevel import Model
    oracle = Model(m.prep, m.table, backend="numpy")
    ll0, g0 = oracle.evaluate(res.estimate)
    assert abs(ll - ll0) < 1e-8 * abs(ll0)
    assert np.allclose(g, g0, rtol=1e-6, atol=1e-6)


def _model(data, formula, index=None, **kw):
    """The Model of a relaxed fit, without fitting it."""
    from mlsem.data.prepare import collect_columns, prepare
    from mlsem.spec.formula import nest_levels, parse_formula
    from mlsem.model.multilevel import Model
    from mlsem.spec.relax import coefficient_design, relax_table
    from mlsem.spec.table import multilevel_table
    F = parse_formula(formula)
    levels = nest_levels(F)
    eff = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    df = collect_columns(data, F.columns + ([index] if index else []), [F.outcome, *F.fixed],
                         [lv[-1] for lv in levels])
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, eff, index=index,
                   design=coefficient_design(kw.get("coefficients"), F, levels))
    table = relax_table(multilevel_table(prep, F, levels), prep, kw.get("effects"),
                        kw.get("residuals"), index)
    return Model(prep, table), Model(prep, table, backend="numpy")


def test_unstructured_residual_correlation_gradient_and_oracle():
    # the first three pupils of each school: three correlations corr(Residual[a],Residual[b])
    d = pl.read_parquet(UB).filter(pl.col("i") <= 3)
    m, oracle = _model(d, "y ~ x1 + z + (1 | k/j)", index="i",
                       residuals={"variance": "j", "correlation": "unstructured"})
    names = m.table.names
    assert [n for n in names if n.startswith("corr")] == [
        "corr(Residual[1],Residual[2])", "corr(Residual[1],Residual[3])", "corr(Residual[2],Residual[3])"]
    assert m.dense
    psi = np.array([0.9, 0.5, -0.2, 1.4, 0.6, 1.0, 1.1, 0.9, 0.95, 0.1, -0.05, 0.2])
    assert [n.split("(")[0] for n in names] == ["Intercept", "x1", "z", "var", "var"] + ["var"] * 4 + ["corr"] * 3
    ll, g = m.evaluate(psi)
    ll0, g0 = oracle.evaluate(psi)
    assert abs(ll - ll0) < 1e-9 * abs(ll0) and np.allclose(g, g0, rtol=1e-8, atol=1e-8)
    for i in range(len(psi)):
        h = 1e-6
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (m.evaluate(up, False)[0] - m.evaluate(dn, False)[0]) / (2 * h)
        assert abs(fd - g[i]) < 1e-4 * max(1.0, abs(g[i])), names[i]
    # a correlation matrix that is not positive definite: the kernel refuses, no NaN
    bad = psi.copy()
    bad[-3:] = [0.99, -0.99, 0.99]
    assert m.evaluate(bad) == (None, None)


def test_names_follow_the_rule():
    res = mlsem.fit(UB, "y ~ x1 + z + (1 | k/j)", effects={"j": {"variance": {"north": [1, 2], "south": [3]}}})
    assert res.names == ["Intercept", "x1", "z", "var(k)", "var(j)", "var(j[north])", "var(j[south])",
                         "var(Residual)"]
    res = mlsem.fit(UB, "y ~ x1 + z + (1 | k:j)", effects={"j": {"variance": "slot", "covariance": "unstructured"}})
    assert "cov(j[1],j[4])" in res.names and "var(j[3])" in res.names


# ---- invalid relaxations ------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(effects={"school": {"variance": "slot"}}), "unknown level 'school'"),
    (dict(effects={"k": {"variance": "slot"}}), "top level"),
    (dict(effects={"j": {"variance": {"a": [1, 9]}}}), "no slot label 9"),
    (dict(effects={"j": {"variance": {"a": [1, 2], "b": [2, 3]}}}), "groups overlap: slot label 2"),
    (dict(effects={"j": {"covariance": [(1, 7)]}}), "no slot label 7"),
    (dict(effects={"j": {"covariance": "toeplitz"}}), "covariance='toeplitz'"),
    (dict(effects={"j": {"varaince": "slot"}}), "unknown option 'varaince'"),
    (dict(effects={"j": {"variance": "type"}}), "variance='type'"),
    (dict(effects={"j": {"variance": {"a": [1], "b": [2]}, "covariance": "unstructured"}}), "variance='slot'"),
    (dict(residuals={"variance": "school"}), "unknown level 'school'"),
    (dict(residuals={"correlation": "ar2"}), "correlation='ar2'"),
    (dict(residuals={"correlation": "ar1"}), "needs an observation order.*index="),
    (dict(residuals={"correlation": "unstructured"}), "needs an observation order"),
    (dict(residuals={"structure": "ar1"}), "unknown option 'structure'"),
    (dict(coefficients={"w": "j"}), "'w' is not a fixed term"),
    (dict(coefficients={"x1": "school"}), "unknown level 'school'"),
])
def test_invalid_relaxations(kw, match):
    with pytest.raises(mlsem.MlsemError, match=match):
        mlsem.fit(UB, "y ~ x1 + z + (1 | k/j)", **kw)


def test_relaxing_a_level_without_or_with_slope_effects_is_refused():
    with pytest.raises(mlsem.MlsemError, match="unknown level 'j'"):
        mlsem.fit(UB, "y ~ x1 + z + (1 | k)", effects={"j": {"variance": "slot"}})
    d = pl.read_parquet(UB).with_columns(s=pl.col("k") % 3)
    with pytest.raises(mlsem.MlsemError, match="random slopes"):
        mlsem.fit(d, "y ~ x1 + z + (1 | k) + (1 + x1 | k:j)", effects={"j": {"variance": "slot"}})


def test_three_levels_and_the_warm_start():
    # classes c of two pupils within a school: slots of c are labelled within their school
    d = pl.read_parquet(UB).with_columns(c=((pl.col("i") - 1) // 2 + 1))
    f = "y ~ x1 + z + (1 | k/j/c)"
    std = mlsem.fit(d, f)
    het = mlsem.fit(d, f, effects={"c": {"variance": "slot"}})
    assert het.converged and het.identified
    assert [n for n in het.names if n not in std.names] == ["var(c[1])", "var(c[2])", "var(c[3])"]
    assert het.loglik >= std.loglik - 1e-6
    # a natural (non-Cholesky) block whose optimum is near the PSD boundary (correlation
    # 0.989; a fit that stopped at 0.99996 had a log-likelihood 0.014 lower): from the
    # mixed model's optimum the fit can only improve on it, it stays
    # positive semi-definite, and it is honest about convergence (a warning and the
    # summary say so exactly when it did not converge) -- whichever way it ends
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = mlsem.fit(d, f, effects={"c": {"covariance": [(1, 2)]}})
    assert pair.loglik > std.loglik + 0.5
    v, c = pair.coef["var(c)"], pair.coef["cov(c[1],c[2])"]
    assert 0 < v and abs(c) <= v * (1 + 1e-6)            # |correlation| <= 1
    assert c / v > 0.9                                   # near the boundary (0.989 here)
    warned = any(issubclass(w.category, mlsem.ConvergenceWarning) for w in caught)
    assert warned == (not pair.converged) == ("did NOT converge" in pair.summary())


def test_ar1_needs_integer_index_values_and_index_names_residual_slots():
    d = pl.read_parquet(UB).with_columns(t=pl.col("i") * 0.5)
    with pytest.raises(mlsem.MlsemError, match="integer values in the index column 't'"):
        mlsem.fit(d, "y ~ x1 + z + (1 | k/j)", index="t", residuals={"correlation": "ar1"})
    with pytest.raises(mlsem.MlsemError, match="unknown level 'i'"):
        mlsem.fit(d, "y ~ x1 + z + (1 | k/j)", residuals={"variance": "i"})   # no index= given


def test_lrtest_hetero_reproduces_the_reference_loglik_difference():
    """LR test of the heteroskedastic relaxation = twice the difference of
    lavaan's `hetero` log-likelihood and the standard model's (lme4's, the same
    model as lavaan's standard wide SEM)."""
    case = load_case("hetero_corr")
    ref_chi2 = 2.0 * (case["lavaan"]["hetero"]["loglik"] - case["lme4"]["loglik"])
    std = mlsem.fit(HC, "y ~ x + (1 | k/j)")
    het = mlsem.fit(HC, "y ~ x + (1 | k/j)", effects={"j": {"variance": "slot"}})
    t = mlsem.lrtest(std, het)
    assert abs(t.chi2 - ref_chi2) < 2e-4
