"""R's formula spellings that lme4 users write (mlsem.spec.formula, mlsem.data.encode):
``(1 | g) + (0 + x | g)`` as ``(1 + x || g)``; ``I(x^2)`` as R's power (in
Python ``^`` is a bitwise xor: a silent wrong column before); ``factor(x)`` and
``as.factor(x)`` as ``C(x)``.

Reference: the uncorrelated random slope of extra/lme4_extra.json (lme4 1.1-31,
written there as ``||``), refitted here in lme4's other spelling.
"""
import json
import warnings

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import MlsemError
from mlsem.spec.formula import formulaic_text
from mlsem.spec.formula import parse_formula
from conftest import REF, load_case


def test_separate_terms_of_one_level_are_uncorrelated_effects():
    F = parse_formula("y ~ x + (1 | g) + (0 + x | g)")
    assert len(F.random) == 1
    rt = F.random[0]
    assert rt.effects == ("Intercept", "x") and not rt.correlated
    assert parse_formula("y ~ x + (1 + x || g)").random[0].effects == rt.effects
    # nested levels keep their own terms
    F = parse_formula("y ~ x + (1 | k/j) + (0 + x | k)")
    assert [(t.group, t.effects) for t in F.random] == [(("k",), ("Intercept", "x")),
                                                         (("k", "j"), ("Intercept",))]


@pytest.mark.parametrize("formula, match", [
    ("y ~ x + (1 + x | g) + (0 + z | g)", r"correlated effects"),
    ("y ~ x + (1 | g) + (1 | g)", r"'Intercept' of the level 'g' is given twice"),
])
def test_separate_terms_that_are_not_one_uncorrelated_term_are_refused(formula, match):
    with pytest.raises(MlsemError, match=match):
        parse_formula(formula)


def test_lme4_spelling_of_an_uncorrelated_slope_matches_lme4():
    case = load_case("unbalanced")
    ref = json.load(open(REF / "extra" / "lme4_extra.json"))["unbalanced"]["random_slope_uncorrelated"]
    assert ref["formula"] == "y ~ x1 + z + (1 + x1 || k) + (1 | k:j)"
    other = "y ~ x1 + z + (1 | k) + (0 + x1 | k) + (1 | k:j)"
    res = mlsem.fit(REF / case["data"], other)
    assert res.converged
    assert abs(res.loglik - ref["loglik"]) < 1e-4
    assert not any(n.startswith("cov(") for n in res.names)


def test_power_inside_a_call_is_r_power():
    assert formulaic_text("Days + I(Days^2)") == "Days + I(Days**2)"
    assert formulaic_text("log(x^2) + (a + b)^2") == "log(x**2) + (a + b)^2"   # formula power kept
    assert formulaic_text("as.factor(d) * x") == "factor(d) * x"
    d = mlsem.example_data("sleepstudy")
    r = mlsem.fit(d, "Reaction ~ Days + I(Days^2) + (1 | Subject)")
    by_hand = mlsem.fit(d.with_columns((pl.col("Days") ** 2).alias("D2")), "Reaction ~ Days + D2 + (1 | Subject)")
    assert r.loglik == pytest.approx(by_hand.loglik, rel=1e-12)
    np.testing.assert_allclose(r.estimate, by_hand.estimate, rtol=1e-8)


def test_factor_is_c():
    d = mlsem.example_data("sleepstudy")
    a = mlsem.fit(d, "Reaction ~ factor(Days) + (1 | Subject)")
    b = mlsem.fit(d, "Reaction ~ C(Days) + (1 | Subject)")
    c = mlsem.fit(d, "Reaction ~ as.factor(Days) + (1 | Subject)")
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12) == c.loglik
    assert a.names[1] == "factor(Days)[T.1]" and len(a.names) == len(b.names)
    pred = a.predict(d.head(5), random=False)["predicted"].to_numpy()
    np.testing.assert_allclose(pred, b.predict(d.head(5), random=False)["predicted"].to_numpy(), rtol=1e-10)


TRANSFORMED = json.loads((REF / "extra" / "lme4_transformed_outcome.json").read_text())


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_transformed_outcome_matches_lme4(method):
    """``log(Reaction) ~ ...`` (with R's I(Days^2) and lme4's (1 | g) + (0 + x | g) in
    the REML case) against lme4 1.1-31 (extra/make_transformed_outcome.R)."""
    ref = TRANSFORMED[method]
    d = mlsem.example_data("sleepstudy")
    res = mlsem.fit(d, ref["formula"], method=method)
    assert res.converged and res.outcome == "log(Reaction)"
    assert abs(res.loglik - ref["loglik"]) <= 1e-8 * abs(ref["loglik"])
    coef, se = res.coef, dict(zip(res.names, res.std_err))
    for k, v in ref["fixef"].items():
        n = {"(Intercept)": "Intercept", "I(Days^2)": "I(Days ** 2)"}.get(k, k)
        assert abs(coef[n] - v) <= 1e-5 * max(abs(v), 1e-2), n
        assert abs(se[n] - ref["se"][k]) <= 1e-4 * ref["se"][k], n
    by_hand = mlsem.fit(d.with_columns(pl.col("Reaction").log().alias("lr")),
                        ref["formula"].replace("log(Reaction)", "lr"), method=method)
    assert res.loglik == pytest.approx(by_hand.loglik, rel=1e-12)


def test_transformed_outcome_errors():
    d = mlsem.example_data("sleepstudy")
    zero = d.with_columns(pl.when(pl.col("Days") == 3).then(0.0).otherwise(pl.col("Reaction")).alias("Reaction"))
    with pytest.raises(MlsemError, match=r"outcome 'log\(Reaction\)' is not finite .* rows 4, 14"):
        mlsem.fit(zero, "log(Reaction) ~ Days + (1 | Subject)")
    with pytest.raises(MlsemError, match=r"outcome 'Reaction' is also a covariate"):
        mlsem.fit(d, "log(Reaction) ~ Reaction + (1 | Subject)")
    with pytest.raises(MlsemError, match=r"not a column name or a transform"):
        mlsem.fit(d, "Reaction + Days ~ Days + (1 | Subject)")
    # a null input is a missing cell
    miss = d.with_columns(pl.when(pl.col("Days") == 3).then(None).otherwise(pl.col("Reaction")).alias("Reaction"))
    res = mlsem.fit(miss, "log(Reaction) ~ Days + (1 | Subject)")
    assert res.missing_outcome == 18


def test_offset_is_refused_with_the_outcome_transform_it_equals():
    """lme4's ``offset(o)`` is refused with its equivalent, ``I(y - o) ~ ...``, which
    may read a covariate; that fit has y's log-likelihood and the slope less the
    offset's coefficient (an identity: the design is unchanged)."""
    d = mlsem.example_data("sleepstudy")
    with pytest.raises(MlsemError, match=r"offset\(\) is not supported .* 'I\(y - o\)"):
        mlsem.fit(d, "Reaction ~ Days + offset(2 * Days) + (1 | Subject)")
    plain = mlsem.fit(d, "Reaction ~ Days + (1 | Subject)")
    off = mlsem.fit(d, "I(Reaction - 2 * Days) ~ Days + (1 | Subject)")
    assert off.loglik == pytest.approx(plain.loglik, rel=1e-10)
    est, est0 = dict(zip(off.names, off.estimate)), dict(zip(plain.names, plain.estimate))
    assert est["Days"] == pytest.approx(est0["Days"] - 2.0, abs=1e-6)
    assert est["var(Subject)"] == pytest.approx(est0["var(Subject)"], rel=1e-6)
