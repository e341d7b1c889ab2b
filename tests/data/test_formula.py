"""The fixed part of the formula through formulaic (mlsem.data.encode), and
predictions of the outcome (fitted, residuals, predict).

References:
- exam_factors.json, sleepstudy.json (lme4 1.1-31; copied from the shared
  reference folder): three factor covariates, ML and REML;
- extra/lme4_formula.json (extra/make_formula.sh: lme4 1.1-31 on
  exam_factors): an interaction with a poly() term and a random slope on a
  transform, with lme4's fitted(), predict(newdata, allow.new.levels = TRUE),
  predict(re.form = NA) and sqrt(x' vcov x);
- real/*.json (extra/make_real.R: lme4 on Chem97, Oats, Hsb82, Oxboys): I()
  and an interaction on 31k rows, a factor that is also a grouping level,
  factors with a random slope, poly();
- direct constructions: the same model with the dummy and transformed columns
  made by hand with Polars and fitted with plain column names must give the
  same design matrix and log-likelihood.
"""
import json
import math
import warnings

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import ConvergenceWarning, MlsemError
from conftest import REF, lme4_name, load_case

FORMULA_REF = json.loads((REF / "extra" / "lme4_formula.json").read_text())


# ---- lme4 references --------------------------------------------------------------
def check_lme4(res, block, factors, vc_names, *, reml=False):
    if reml:
        crit = -2.0 * res.loglik
        assert abs(crit - block["reml_criterion"]) <= max(1e-4, 1e-7 * abs(block["reml_criterion"]))
    else:
        assert abs(res.loglik - block["loglik"]) <= max(1e-4, 1e-7 * abs(block["loglik"]))
    coef, se = res.coef, dict(zip(res.names, res.std_err))
    for k, v in block["fixef"].items():
        n = lme4_name(k, factors)
        assert abs(coef[n] - v) < 1e-4, n
        assert abs(se[n] - block["se"][k]) <= 1e-3 * block["se"][k], n
    vcs = block["vc"]
    if isinstance(vcs, dict):   # column form
        vcs = [dict(zip(vcs, row)) for row in zip(*vcs.values())]
    for row in vcs:
        key = (row["grp"], row["var1"] or "", row["var2"] if isinstance(row.get("var2"), str) else "")
        name = vc_names[key]
        assert abs(coef[name] - row["vcov"]) <= 1e-3 * max(abs(row["vcov"]), 1e-2), name


EXAM_VC = {("school", "(Intercept)", ""): "var(school)", ("Residual", "", ""): "var(Residual)"}


@pytest.fixture(scope="module")
def exam():
    return pl.read_parquet(REF / "exam_factors.parquet")


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_exam_factors_matches_lme4(exam, method):
    case = load_case("exam_factors")
    res = mlsem.fit(exam, case["formula"], method=method)
    assert res.converged
    assert res.names[:7] == ["Intercept", "standLRT", "sex[T.M]", "schgend[T.girls]",
                             "schgend[T.mixed]", "vr[T.mid 50%]", "vr[T.top 25%]"]
    check_lme4(res, case[method], ["sex", "schgend", "vr"], EXAM_VC, reml=method == "reml")


SLEEP_VC = {("Subject", "(Intercept)", ""): "var(Subject:Intercept)",
            ("Subject", "Days", ""): "var(Subject:Days)",
            ("Subject", "(Intercept)", "Days"): "cov(Subject:Intercept,Subject:Days)",
            ("Residual", "", ""): "var(Residual)"}


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_sleepstudy_through_the_formula_path(method):
    case = load_case("sleepstudy")
    data = pl.read_parquet(REF / "sleepstudy.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = mlsem.fit(data, "Reaction ~ Days + (1 + Days | Subject)", method=method)
    assert res.converged
    check_lme4(res, case[method], [], SLEEP_VC, reml=method == "reml")


NEWDATA = FORMULA_REF["newdata"]


def newdata_of(exam):
    nd = exam.head(12).with_row_index("__r")
    moved = [r - 1 for r in NEWDATA["school_9999"]]
    nd = nd.with_columns(
        pl.when(pl.col("__r").is_in(moved)).then(9999).otherwise(pl.col("school")).alias("school"),
        pl.when(pl.col("__r") == NEWDATA["sex_M"] - 1).then(pl.lit("M")).otherwise(pl.col("sex")).alias("sex"))
    return nd.drop("__r")


@pytest.mark.parametrize("case", ["interaction_poly", "slope_transform"])
def test_lme4_interaction_poly_slope_transform_and_predictions(exam, case):
    c = FORMULA_REF["cases"][case]
    ref = c["ml"]
    res = mlsem.fit(exam, c["formula"])
    assert res.converged
    vc = {("school", "(Intercept)", ""): "var(school)", ("Residual", "", ""): "var(Residual)"}
    if case == "slope_transform":
        vc = {("school", "(Intercept)", ""): "var(school:Intercept)",
              ("school", "log(standLRT + 4)", ""): "var(school:log(standLRT + 4))",
              ("school", "(Intercept)", "log(standLRT + 4)"):
                  "cov(school:Intercept,school:log(standLRT + 4))",
              ("Residual", "", ""): "var(Residual)"}
    names = {k: lme4_name(k, ["sex", "vr"]).replace("poly(standLRT, 2)1", "poly(standLRT, 2)[1]")
             .replace("poly(standLRT, 2)2", "poly(standLRT, 2)[2]") for k in ref["fixef"]}
    coef = res.coef
    for k, v in ref["fixef"].items():
        assert abs(coef[names[k]] - v) < 1e-4, k
    assert abs(res.loglik - ref["loglik"]) <= max(1e-4, 1e-7 * abs(ref["loglik"]))
    for row in ref["vc"]:
        key = (row["grp"], row["var1"] or "", row["var2"] if isinstance(row.get("var2"), str) else "")
        assert abs(coef[vc[key]] - row["vcov"]) <= 1e-3 * abs(row["vcov"]), key
    # lme4's fitted(): x'beta + z'b at the BLUPs, in the data's row order
    fit = res.fitted()
    assert fit["row"].to_list() == list(range(exam.height))
    assert np.max(np.abs(fit["fitted"].to_numpy() - np.array(ref["fitted"]))) < 1e-5
    # predict(newdata, allow.new.levels = TRUE): a new school is at the population level
    nd = newdata_of(exam)
    pred = res.predict(nd)
    assert pred.columns == ["school", "predicted"]
    assert np.max(np.abs(pred["predicted"].to_numpy() - np.array(ref["predict_newdata"]))) < 1e-5
    pop = res.predict(nd, random=False, se=True)
    assert np.max(np.abs(pop["predicted"].to_numpy() - np.array(ref["predict_newdata_population"]))) < 1e-6
    # sqrt(x' Cov(beta) x) on the estimation rows against lme4's vcov
    se = res.predict(se=True)["se"].to_numpy()[:12]
    assert np.max(np.abs(se / np.array(ref["se_fixed_first12"]) - 1)) < 1e-3


REAL = {"chem97": ["gender"], "oats": ["Variety"], "hsb82": ["sector", "sx", "minrty"],
        "oxboys": []}


@pytest.mark.parametrize("name, method", [(n, m) for n in REAL for m in ("ml", "reml")])
def test_real_data_factors_interactions(name, method):
    """Chem97: I() and a factor-by-numeric interaction on 31k rows; Oats:
    Variety is a fixed factor and the inner grouping level; Hsb82: three factors,
    a numeric interaction and a correlated random slope; Oxboys: poly(age, 2)
    with a random slope on age."""
    case = json.loads((REF / "real" / f"{name}.json").read_text())
    data = pl.read_parquet(REF / "real" / f"{name}.parquet")
    res = mlsem.fit(data, case["formula"], method=method)
    assert res.converged
    block = case[method]
    block = dict(block, fixef={k.replace("poly(age, 2)1", "poly(age, 2)[1]").replace("poly(age, 2)2", "poly(age, 2)[2]"): v
                               for k, v in block["fixef"].items()},
                 se={k.replace("poly(age, 2)1", "poly(age, 2)[1]").replace("poly(age, 2)2", "poly(age, 2)[2]"): v
                     for k, v in block["se"].items()})
    levels = case["levels"] if isinstance(case["levels"], list) else [case["levels"]]
    top = levels[0]
    vc = {("Residual", "", ""): "var(Residual)", (top, "(Intercept)", ""): f"var({top})"}
    if len(levels) > 1:
        vc[(f"{levels[1]}:{top}", "(Intercept)", "")] = f"var({levels[1]})"
    slope = {"hsb82": "cses", "oxboys": "age"}.get(name)
    if slope:
        vc.update({(top, "(Intercept)", ""): f"var({top}:Intercept)",
                   (top, slope, ""): f"var({top}:{slope})",
                   (top, "(Intercept)", slope): f"cov({top}:Intercept,{top}:{slope})"})
    check_lme4(res, block, REAL[name], vc, reml=method == "reml")


# ---- direct constructions (no R needed) ------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    d = mlsem.example_data()
    rng = np.random.default_rng(7)
    n = d.height
    g = rng.choice(["a", "b", "c"], n)
    b = rng.random(n) < 0.4
    m = rng.integers(1, 4, n)
    x2 = rng.normal(5.0, 2.0, n)
    eff = {"a": 0.0, "b": 0.7, "c": -0.4}
    y = (d["y"].to_numpy() + np.vectorize(eff.get)(g) + 0.5 * b + 0.3 * m
         + 0.2 * d["x"].to_numpy() * (g == "b") + 0.1 * x2)
    return d.with_columns(pl.Series("g", g), pl.Series("b", b), pl.Series("m", m),
                          pl.Series("x2", x2), pl.Series("y", y))


def same_fit(data, formula, hand, hand_formula, **kw):
    """``formula`` on ``data`` and ``hand_formula`` on ``hand`` (plain columns):
    the same design (up to column names) and log-likelihood."""
    a = mlsem.fit(data, formula, **kw)
    b = mlsem.fit(hand, hand_formula, **kw)
    assert a.converged and b.converged
    np.testing.assert_allclose(a.model.prep.X, b.model.prep.X, rtol=1e-12, atol=1e-12)
    assert abs(a.loglik - b.loglik) < 1e-8
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-6, atol=1e-8)
    return a, b


def dummies(d, col, levels):
    return [(pl.col(col) == lv).cast(pl.Float64).alias(f"{col}_{lv}") for lv in levels]


def test_interaction_against_hand_made_columns(sim):
    hand = sim.with_columns(dummies(sim, "g", ["b", "c"])).with_columns(
        (pl.col("x") * pl.col("g_b")).alias("x_g_b"), (pl.col("x") * pl.col("g_c")).alias("x_g_c"))
    a, _ = same_fit(sim, "y ~ x*g + (1 | k/j)", hand, "y ~ x + g_b + g_c + x_g_b + x_g_c + (1 | k/j)")
    assert a.names[:6] == ["Intercept", "x", "g[T.b]", "g[T.c]", "x:g[T.b]", "x:g[T.c]"]
    b = mlsem.fit(sim, "y ~ x + g + x:g + (1 | k/j)")
    assert b.names == a.names and abs(b.loglik - a.loglik) < 1e-8


def test_transforms_against_hand_made_columns(sim):
    x2 = sim["x2"].to_numpy()
    hand = sim.with_columns((pl.col("x") ** 2).alias("xsq"), (pl.col("x2")).log().alias("lx2"),
                            pl.Series("cx2", x2 - x2.mean()),
                            pl.Series("sx", (sim["x"].to_numpy() - sim["x"].mean()) / sim["x"].std()))
    a, _ = same_fit(sim, "y ~ I(x**2) + log(x2) + center(x2) + scale(x) + (1 | k/j)", hand,
                    "y ~ xsq + lx2 + cx2 + sx + (1 | k/j)")
    assert a.names[:5] == ["Intercept", "I(x ** 2)", "log(x2)", "center(x2)", "scale(x)"]


def test_poly_spans_x_and_its_square(sim):
    """poly(x, 2) is an orthogonal basis of (x, x^2): the same fit; its columns
    are orthonormal and centred, as R's (lme4's scaling is checked in
    test_lme4_interaction_poly_slope_transform_and_predictions)."""
    a = mlsem.fit(sim, "y ~ poly(x2, 2) + (1 | k/j)")
    b = mlsem.fit(sim, "y ~ x2 + I(x2**2) + (1 | k/j)")
    assert abs(a.loglik - b.loglik) < 1e-7
    P = a.model.prep.X[:, 1:]
    np.testing.assert_allclose(P.T @ P, np.eye(2), atol=1e-10)
    np.testing.assert_allclose(P.sum(axis=0), 0.0, atol=1e-10)


def test_reference_level_and_no_intercept(sim):
    hand = sim.with_columns(dummies(sim, "g", ["a", "b", "c"]))
    a, _ = same_fit(sim, "y ~ x + C(g, contr.treatment(base='c')) + (1 | k/j)", hand,
                    "y ~ x + g_a + g_b + (1 | k/j)")
    assert a.names[2:4] == ["C(g, contr.treatment(base='c'))[T.a]", "C(g, contr.treatment(base='c'))[T.b]"]
    for f in ("y ~ 0 + g + x + (1 | k/j)", "y ~ g + x - 1 + (1 | k/j)"):
        a, _ = same_fit(sim, f, hand, "y ~ 0 + g_a + g_b + g_c + x + (1 | k/j)")
        assert a.names[:4] == ["g[a]", "g[b]", "g[c]", "x"]


def test_boolean_integer_enum_and_categorical(sim):
    hand = sim.with_columns(pl.col("b").cast(pl.Float64).alias("bt"), *dummies(sim, "m", [2, 3]))
    a, _ = same_fit(sim, "y ~ x + b + m + (1 | k/j)", hand, "y ~ x + bt + m + (1 | k/j)")
    assert a.names[:4] == ["Intercept", "x", "b[T.True]", "m"]          # an integer stays numeric
    a, _ = same_fit(sim, "y ~ x + C(m) + (1 | k/j)", hand, "y ~ x + m_2 + m_3 + (1 | k/j)")
    assert a.names[2:4] == ["C(m)[T.2]", "C(m)[T.3]"]
    # Categorical: sorted levels; Enum: its declared order (as an R factor's levels)
    cat = sim.with_columns(pl.col("g").cast(pl.Categorical))
    assert mlsem.fit(cat, "y ~ g + (1 | k/j)").names[:3] == ["Intercept", "g[T.b]", "g[T.c]"]
    enum = sim.with_columns(pl.col("g").cast(pl.Enum(["c", "a", "b"])))
    hand = sim.with_columns(dummies(sim, "g", ["a", "b"]))
    a, _ = same_fit(enum, "y ~ g + (1 | k/j)", hand, "y ~ g_a + g_b + (1 | k/j)")
    assert a.names[:3] == ["Intercept", "g[T.a]", "g[T.b]"]


def test_string_ids_and_a_factor_in_fixed_part_and_grouping(sim):
    s = sim.with_columns(pl.format("county-{}", pl.col("k")).alias("k"),
                         pl.format("school-{}", pl.col("j")).alias("j"))
    a = mlsem.fit(sim, "y ~ x + g + (1 | k/j)")
    b = mlsem.fit(s, "y ~ x + g + (1 | k/j)")
    assert abs(a.loglik - b.loglik) < 1e-8
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-6)
    # j (school 1 or 2 of a county) as a fixed factor and as the inner grouping level
    c = mlsem.fit(s, "y ~ x + j + (1 | k/j)")
    assert "j[T.school-2]" in c.names and c.converged
    re = c.random_effects()
    assert re.filter(pl.col("level") == "j")["j"].dtype == pl.String


def test_missing_covariate_dropped_and_counted(sim):
    rng = np.random.default_rng(3)
    n = sim.height
    gm = rng.random(n) < 0.05
    xm = rng.random(n) < 0.05
    ym = rng.random(n) < 0.05
    d = sim.with_columns(pl.when(pl.Series(gm)).then(None).otherwise(pl.col("g")).alias("g"),
                         pl.when(pl.Series(xm)).then(None).otherwise(pl.col("x2")).alias("x2"),
                         pl.when(pl.Series(ym)).then(None).otherwise(pl.col("y")).alias("y"))
    res = mlsem.fit(d, "y ~ g + log(x2) + (1 | k/j)")
    drop = gm | xm
    assert res.dropped_covariate == int(drop.sum())
    assert res.missing_outcome == int((ym & ~drop).sum())
    assert f"{int(drop.sum())}" in res.summary()
    ref = mlsem.fit(d.filter(~pl.Series(drop) & pl.col("y").is_not_null()), "y ~ g + log(x2) + (1 | k/j)")
    assert abs(res.loglik - ref.loglik) < 1e-8
    # a covariate only a random slope reads counts too
    res = mlsem.fit(d, "y ~ g + (1 + log(x2) | k)")
    assert res.dropped_covariate == int(drop.sum())


def test_random_slope_on_a_transform(sim):
    hand = sim.with_columns(pl.col("x2").log().alias("lx2"))
    a = mlsem.fit(sim, "y ~ x + (1 + log(x2) | k)")
    b = mlsem.fit(hand, "y ~ x + (1 + lx2 | k)")
    assert abs(a.loglik - b.loglik) < 1e-8
    assert "var(k:log(x2))" in a.names
    np.testing.assert_array_equal(a.model.prep.load, b.model.prep.load)


def test_bad_formulas_and_data_are_refused(sim):
    with pytest.raises(MlsemError, match=r"random slope 'g' reads 'g', which is String"):
        mlsem.fit(sim, "y ~ x + (1 + g | k)")
    with pytest.raises(MlsemError, match=r"column 'g' has one level \('a'\)"):
        mlsem.fit(sim.with_columns(pl.lit("a").alias("g")), "y ~ g + (1 | k/j)")
    with pytest.raises(MlsemError, match=r"design column .log\(x - 10\). is not finite"):
        mlsem.fit(sim, "y ~ log(x - 10) + (1 | k/j)")
    with pytest.raises(MlsemError, match=r"column 'dt' is Date"):
        mlsem.fit(sim.with_columns(pl.date(2020, 1, 1).alias("dt")), "y ~ dt + (1 | k/j)")
    with pytest.raises(MlsemError, match=r"outcome 'y' is also a covariate"):
        mlsem.fit(sim, "y ~ I(y**2) + (1 | k/j)")


# ---- predictions -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_sim(sim):
    return mlsem.fit(sim, "y ~ x*g + (1 + x | k) + (1 | k:j)")


def test_fitted_residuals_predict_on_the_estimation_rows(fitted_sim, sim):
    res = fitted_sim
    prep = res.model.prep
    beta, Phi, Theta = res.model.matrices(res.estimate)
    # x'beta + z'b with the BLUPs of random_effects(), joined by the ids
    re = res.random_effects()
    ku = re.filter((pl.col("level") == "k") & (pl.col("effect") == "Intercept")).select("k", pl.col("mean").alias("uk"))
    ks = re.filter((pl.col("level") == "k") & (pl.col("effect") == "x")).select("k", pl.col("mean").alias("sk"))
    vj = re.filter(pl.col("level") == "j").select("k", "j", pl.col("mean").alias("vj"))
    X = np.asarray(res.model.prep.X)
    order = np.argsort(prep.obs_row)
    d = sim.with_columns(pl.Series("xb", (X @ beta)[order])).join(ku, on="k", how="left") \
        .join(ks, on="k", how="left").join(vj, on=["k", "j"], how="left")
    want = (d["xb"] + d["uk"] + d["sk"] * d["x"] + d["vj"]).to_numpy()
    fit = res.fitted()
    assert fit.columns == ["k", "j", "row", "fitted"]
    np.testing.assert_allclose(fit["fitted"].to_numpy(), want, atol=1e-10)
    r = res.residuals()
    np.testing.assert_allclose(r["residual"].to_numpy(), sim["y"].to_numpy() - want, atol=1e-10)
    rm = res.residuals(kind="marginal")
    np.testing.assert_allclose(rm["residual"].to_numpy(), sim["y"].to_numpy() - d["xb"].to_numpy(), atol=1e-10)
    assert res.predict()["predicted"].equals(fit["fitted"].rename("predicted"))
    # predicting on the estimation data itself gives the fitted values
    p = res.predict(sim, se=True)
    np.testing.assert_allclose(p["predicted"].to_numpy(), want, atol=1e-10)
    np.testing.assert_allclose(p["se"].to_numpy(), res.predict(se=True)["se"].to_numpy(), atol=1e-12)
    with pytest.raises(MlsemError, match="kind='bogus'"):
        res.residuals(kind="bogus")


def test_predict_newdata_unseen_groups_levels_and_missing(fitted_sim, sim):
    res = fitted_sim
    nd = sim.head(6).with_columns(pl.Series("k", [1, 1, 10**6, 10**6, 2, 2]),
                                  pl.Series("x", [0.1, None, 0.3, 0.4, 0.5, 0.6]))
    p = res.predict(nd)
    pop = res.predict(nd, random=False)
    assert p["predicted"][1] is None and pop["predicted"][1] is None      # a null covariate
    assert p["predicted"][2] == pytest.approx(pop["predicted"][2])      # an unseen county: population level
    assert p["predicted"][0] != pytest.approx(pop["predicted"][0])
    bad = sim.head(3).with_columns(pl.Series("g", ["a", "zz", "b"]))
    with pytest.raises(MlsemError, match=r"column 'g' has the level 'zz', which the model was not fitted with"):
        res.predict(bad)
    with pytest.raises(MlsemError, match=r"newdata has no column 'g'"):
        res.predict(sim.drop("g"))
    with pytest.raises(MlsemError, match=r"no id column 'j'.*random=False"):
        res.predict(sim.drop("j"))
    assert res.predict(sim.drop("j", "k"), random=False).height == sim.height


def test_stateful_transforms_keep_their_training_state_in_predict(sim):
    res = mlsem.fit(sim, "y ~ center(x2) + (1 | k/j)")
    nd = sim.head(4)
    b = res.coef
    mean = sim["x2"].mean()
    want = b["Intercept"] + b["center(x2)"] * (nd["x2"].to_numpy() - mean)
    np.testing.assert_allclose(res.predict(nd, random=False)["predicted"].to_numpy(), want, rtol=1e-12)


def test_predict_refuses_group_specific_coefficients_on_newdata(sim):
    res = mlsem.fit(sim, "y ~ x + g + (1 | k/j)", coefficients={"g[T.b]": "j"})
    assert "g[T.b][1]" in res.names
    hand = sim.with_columns(dummies(sim, "g", ["b", "c"]))
    ref = mlsem.fit(hand, "y ~ x + g_b + g_c + (1 | k/j)", coefficients={"g_b": "j"})
    assert abs(res.loglik - ref.loglik) < 1e-8
    assert res.predict().height == sim.height
    with pytest.raises(MlsemError, match="group-specific coefficients"):
        res.predict(sim)


# ---- inference options, SEM bridge, CLI -------------------------------------------------
def test_inference_options_accept_formula_names(sim):
    region = sim.with_columns(((pl.col("k") - 1) // 10).alias("region"), pl.lit(1.0).alias("w"))
    for kw in ({"vce": "robust"}, {"vce": ("cluster", "region")}, {"weights": "w"}, {"method": "reml"}):
        res = mlsem.fit(region, "y ~ x*g + b + (1 | k/j)", **kw)
        assert res.converged and "x:g[T.b]" in res.names, kw
    w = res.wald(["g[T.b] = 0", "x:g[T.b] - x:g[T.c] = 0"])
    assert w["df"] == 2 and w["chi2"] > 0
    st = mlsem.fit(sim, "y ~ x*g + (1 | k/j)").score_tests()
    assert st.height > 0


def test_sem_bridge_round_trip_with_bracketed_names(sim):
    f = "y ~ x*g + b + (1 | k/j)"
    spec = mlsem.multilevel(f, sim)
    syntax = spec.to_syntax()
    wide = spec.to_wide()
    # sanitised: every character outside [A-Za-z0-9_.] becomes '_'
    assert "x_g_T.b_1_1" in wide.columns and "b_T.True_1_1" in wide.columns
    assert "b_x_g_T.b" in syntax
    s = mlsem.sem(syntax, wide)
    r = mlsem.fit(sim, f)
    assert abs(s.loglik - r.loglik) < 1e-6


def test_cli_fit_and_predict_with_formulas(sim, tmp_path):
    from mlsem.cli.main import main
    sim.write_parquet(tmp_path / "d.parquet")
    nd = sim.head(5).with_columns(pl.Series("k", [1, 2, 3, 4, 10**6]))
    nd.write_parquet(tmp_path / "new.parquet")
    f = "y ~ x*g + log(x2) + (1 | k/j)"
    assert main(["fit", str(tmp_path / "d.parquet"), "-f", f, "--out", str(tmp_path / "r.parquet"), "-q"]) == 0
    tab = pl.read_parquet(tmp_path / "r.parquet")
    assert "x:g[T.b]" in tab["name"].to_list()
    assert main(["predict", str(tmp_path / "d.parquet"), "-f", f, "--newdata", str(tmp_path / "new.parquet"),
                 "--se", "--out", str(tmp_path / "p.parquet"), "-q"]) == 0
    p = pl.read_parquet(tmp_path / "p.parquet")
    want = mlsem.fit(sim, f).predict(nd, se=True)
    assert p.columns == ["k", "j", "predicted", "se"]
    np.testing.assert_allclose(p["predicted"].to_numpy(), want["predicted"].to_numpy(), rtol=1e-10)
    assert main(["predict", str(tmp_path / "d.parquet"), "-f", f, "--population",
                 "--out", str(tmp_path / "q.parquet"), "-q"]) == 0
    assert pl.read_parquet(tmp_path / "q.parquet").height == sim.height
    assert main(["ranef", str(tmp_path / "d.parquet"), "-f", f, "--out", str(tmp_path / "e.parquet"), "-q"]) == 0
    assert pl.read_parquet(tmp_path / "e.parquet").columns[:2] == ["level", "effect"]
    bad = sim.head(3).with_columns(pl.lit("zz").alias("g"))
    bad.write_parquet(tmp_path / "bad.parquet")
    assert main(["predict", str(tmp_path / "d.parquet"), "-f", f, "--newdata", str(tmp_path / "bad.parquet"),
                 "--out", str(tmp_path / "b.parquet"), "-q"]) == 2
    assert not (tmp_path / "b.parquet").exists()


def test_plain_numeric_formula_needs_no_formulaic():
    """A fixed part of numeric columns is the data's own columns: formulaic (and
    pandas) are not even imported, so the first fit pays nothing for them."""
    import subprocess
    import sys
    code = ("import sys, mlsem; r = mlsem.fit(mlsem.example_data(), 'y ~ x + (1 + x | k) + (1 | k:j)'); "
            "r.predict(mlsem.example_data().head(3), se=True); "
            "print('formulaic' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
