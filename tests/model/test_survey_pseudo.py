"""Pseudo-likelihood with weights at every level (mlsem.model.pseudo): equal to
the kernel's likelihood with unit weights, to the replicated data's with
integer weights (value and gradient, at arbitrary parameters), gradients
against central differences."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.data.encode import load
from mlsem.data.prepare import prepare
from mlsem.model.multilevel import Model
from mlsem.model.pseudo import Hierarchy, PseudoModel
from mlsem.spec.formula import effects_of, nest_levels, parse_formula
from mlsem.spec.table import multilevel_table

INTERCEPTS = "y ~ x1 + z + (1 | k/j)"
SLOPES = "y ~ x1 + z + (1 + x1 | k) + (1 + x1 | k:j)"


def build(df, formula):
    F = parse_formula(formula)
    levels = nest_levels(F)
    df2, F, _ = load(df, F, [c for c in df.columns if c.startswith("w_")])
    prep = prepare(df2, F.outcome, list(F.fixed), F.intercept, levels, effects_of(F))
    return df2, prep, multilevel_table(prep, F, levels)


def replicate(df, which):
    """Each weighted unit repeated (new ids), as the lme4 references were made."""
    d = df
    if "k" in which:
        rep = d.select("k", "w_k").unique().with_columns(pl.int_ranges(0, pl.col("w_k")).alias("_c"))
        d = d.join(rep.explode("_c").select("k", "_c"), on="k").with_columns(
            (pl.col("k") * 10 + pl.col("_c")).alias("k")).drop("_c")
    if "j" in which:
        rep = d.select("k", "j", "w_j").unique().with_columns(pl.int_ranges(0, pl.col("w_j")).alias("_c"))
        d = d.join(rep.explode("_c").select("k", "j", "_c"), on=["k", "j"]).with_columns(
            (pl.col("j") * 10 + pl.col("_c")).alias("j")).drop("_c")
    if "obs" in which:
        d = d.with_columns(pl.int_ranges(0, pl.col("w_i")).alias("_c")).explode("_c").drop("_c")
    return d.sort("k", "j", "i")


def pseudo_model(df, formula, which, scale=1.0):
    df2, prep, table = build(df, formula)
    H = Hierarchy(prep, [None] * 3)
    fr = df2[prep.obs_row]
    ws = [None] * 3
    if "k" in which:
        ws[0] = scale * fr["w_k"].to_numpy()[H.starts[0]].astype(float)
    if "j" in which:
        ws[1] = scale * fr["w_j"].to_numpy()[H.starts[1]].astype(float)
    if "obs" in which:
        ws[2] = scale * fr["w_i"].to_numpy().astype(float)
    return PseudoModel(prep, table, ws)


@pytest.fixture(scope="module")
def data():
    return mlsem.example_data("unbalanced_weighted")


def _psi(table, rng):
    out = []
    for p in table.params:
        if p.kind == "fixed":
            out.append(rng.normal(0.5, 0.3))
        elif p.kind == "var":
            out.append(rng.uniform(0.3, 1.5))
        elif p.kind == "cov":
            out.append(rng.uniform(-0.1, 0.1))
        else:
            out.append(rng.uniform(0.6, 1.2))
    return np.array(out)


@pytest.mark.parametrize("formula", [INTERCEPTS, SLOPES])
def test_unit_weights_equal_the_kernel(data, formula):
    _, prep, table = build(data, formula)
    psi = _psi(table, np.random.default_rng(3))
    ll0, g0 = Model(prep, table).evaluate(psi)
    ll1, g1 = PseudoModel(prep, table, [None, None, None]).evaluate(psi)
    assert ll1 == pytest.approx(ll0, rel=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    ll2, g2 = PseudoModel(prep, table, [np.ones(prep.nrows), np.ones(prep.levels[1].ngroups),
                                        np.ones(prep.nobs)]).evaluate(psi)
    assert ll2 == pytest.approx(ll0, rel=1e-12)


@pytest.mark.parametrize("formula", [INTERCEPTS, SLOPES])
@pytest.mark.parametrize("which", [["k"], ["j"], ["obs"], ["k", "j", "obs"]])
def test_integer_weights_are_replicated_data(data, formula, which):
    """Value and gradient at arbitrary parameters, not only at an optimum."""
    rep = replicate(data, which)
    _, prep_r, table_r = build(rep, formula)
    pm = pseudo_model(data, formula, which)
    assert table_r.names == pm.table.names
    rng = np.random.default_rng(7)
    for _ in range(2):
        psi = _psi(pm.table, rng)
        llr, gr = Model(prep_r, table_r).evaluate(psi)
        llp, gp = pm.evaluate(psi)
        assert llp == pytest.approx(llr, rel=1e-12)
        np.testing.assert_allclose(gp, gr, rtol=1e-8, atol=1e-8 * np.abs(gr).max())


@pytest.mark.parametrize("formula", [INTERCEPTS, SLOPES])
def test_gradient_against_differences(data, formula):
    # non-integer weights: no replicated data to compare with
    df = data.with_columns((pl.col("w_k") * 0.7).alias("w_k"), (pl.col("w_j") * 1.3).alias("w_j"),
                           (pl.col("w_i") * 0.45 + 0.1).alias("w_i"))
    pm = pseudo_model(df, formula, ["k", "j", "obs"])
    psi = _psi(pm.table, np.random.default_rng(11))
    _, g = pm.evaluate(psi)
    for i in range(len(psi)):
        h = 1e-5 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (pm.evaluate(up, need_grad=False)[0] - pm.evaluate(dn, need_grad=False)[0]) / (2 * h)
        assert fd == pytest.approx(g[i], rel=1e-6, abs=1e-5)


def test_scores_sum_to_gradient(data):
    pm = pseudo_model(data, INTERCEPTS, ["k", "j", "obs"])
    psi = _psi(pm.table, np.random.default_rng(5))
    S = pm.unit_scores(psi)
    _, g = pm.evaluate(psi)
    np.testing.assert_allclose(pm.H.w[0] @ S, g, rtol=1e-12, atol=1e-9)
    ll_units = pm.unit_loglik(psi)
    assert float(pm.H.w[0] @ ll_units) == pytest.approx(pm.evaluate(psi)[0], rel=1e-13)
    assert S.shape == (pm.prep.nrows, pm.table.nparams)


def test_not_positive_definite_is_none(data):
    pm = pseudo_model(data, INTERCEPTS, ["j"])
    psi = _psi(pm.table, np.random.default_rng(5))
    psi[-1] = -1.0
    assert pm.evaluate(psi) == (None, None)


def _replicate_rows(df, col):
    return df.with_columns(pl.int_ranges(0, pl.col(col)).alias("_c")).explode("_c").drop("_c")


def test_two_level_model_with_observation_weights(data):
    """(1 | k) with pupil weights: the replicated pupils' likelihood."""
    formula = "y ~ x1 + z + (1 | k)"
    df2, prep, table = build(data, formula)
    pm = PseudoModel(prep, table, [None, df2[prep.obs_row]["w_i"].to_numpy().astype(float)])
    _, prep_r, table_r = build(_replicate_rows(data, "w_i"), formula)
    psi = _psi(table, np.random.default_rng(2))
    llr, gr = Model(prep_r, table_r).evaluate(psi)
    llp, gp = pm.evaluate(psi)
    assert llp == pytest.approx(llr, rel=1e-12)
    np.testing.assert_allclose(gp, gr, rtol=1e-8, atol=1e-8 * np.abs(gr).max())


def test_three_levels(data):
    """k / j / c (pairs of pupils) with weights at j, c and the observations."""
    d = data.with_columns(((pl.col("i") + 1) // 2).alias("c"),
                          (1 + (pl.col("i") + 1) // 2 % 2).alias("w_c"))
    formula = "y ~ x1 + (1 | k/j/c)"
    df2, prep, table = build(d, formula)
    fr = df2[prep.obs_row]
    H = Hierarchy(prep, [None] * 4)
    ws = [None, fr["w_j"].to_numpy()[H.starts[1]].astype(float),
          fr["w_c"].to_numpy()[H.starts[2]].astype(float), fr["w_i"].to_numpy().astype(float)]
    pm = PseudoModel(prep, table, ws)
    rep = replicate(d, ["j"])
    rep = rep.join(rep.select("k", "j", "c", "w_c").unique().with_columns(
        pl.int_ranges(0, pl.col("w_c")).alias("_c")).explode("_c").select("k", "j", "c", "_c"),
        on=["k", "j", "c"]).with_columns((pl.col("c") * 10 + pl.col("_c")).alias("c")).drop("_c")
    rep = _replicate_rows(rep, "w_i")
    _, prep_r, table_r = build(rep, formula)
    assert table_r.names == table.names and len(table.names) == 6
    psi = _psi(table, np.random.default_rng(4))
    llr, gr = Model(prep_r, table_r).evaluate(psi)
    llp, gp = pm.evaluate(psi)
    assert llp == pytest.approx(llr, rel=1e-12)
    np.testing.assert_allclose(gp, gr, rtol=1e-8, atol=1e-8 * np.abs(gr).max())


def test_weights_at_a_level_without_random_effect(data):
    """(1 | k) + (1 | k:j:c): level j has no effect of its own but carries weights."""
    d = data.with_columns(((pl.col("i") + 1) // 2).alias("c"))
    formula = "y ~ x1 + (1 | k) + (1 | k:j:c)"
    df2, prep, table = build(d, formula)
    fr = df2[prep.obs_row]
    H = Hierarchy(prep, [None] * 4)
    pm = PseudoModel(prep, table, [None, fr["w_j"].to_numpy()[H.starts[1]].astype(float), None,
                                   fr["w_i"].to_numpy().astype(float)])
    assert pm.e == [1, 0, 1]
    _, prep_r, table_r = build(replicate(d, ["j", "obs"]), formula)
    psi = _psi(table, np.random.default_rng(8))
    llr, gr = Model(prep_r, table_r).evaluate(psi)
    llp, gp = pm.evaluate(psi)
    assert llp == pytest.approx(llr, rel=1e-12)
    np.testing.assert_allclose(gp, gr, rtol=1e-8, atol=1e-8 * np.abs(gr).max())


@pytest.mark.parametrize("which", [[], ["k"], ["j"], ["obs"], ["k", "j", "obs"]])
def test_kernel_equals_numpy_oracle(data, which):
    """Nested random intercepts run on _core.pseudo_intercepts; this module's
    NumPy code is its oracle (value and gradient, non-integer weights too)."""
    from mlsem.model import multilevel
    if multilevel._core is None:
        pytest.skip("the compiled kernel is not built")
    df = data.with_columns((pl.col("w_j") * 1.3).alias("w_j"), (pl.col("w_i") * 0.45 + 0.1).alias("w_i"))
    pm = pseudo_model(df, INTERCEPTS, which)
    assert pm._fast
    rng = np.random.default_rng(21)
    for _ in range(3):
        psi = _psi(pm.table, rng)
        llk, gk = pm.evaluate(psi)
        llo, go, _ = pm.pseudo(psi)
        assert llk == pytest.approx(llo, rel=1e-13)
        np.testing.assert_allclose(gk, go, rtol=1e-10, atol=1e-10 * np.abs(go).max())
    psi[pm.table.names.index("var(k)")] = 0.0            # a variance on its bound
    np.testing.assert_allclose(pm.evaluate(psi)[1], pm.pseudo(psi)[1], rtol=1e-10, atol=1e-8)


def test_kernel_three_levels_and_numpy_backend(data):
    d = data.with_columns(((pl.col("i") + 1) // 2).alias("c"),
                          (1.0 + (pl.col("i") + 1) // 2 % 2).alias("w_c"))
    df2, prep, table = build(d, "y ~ x1 + (1 | k/j/c)")
    fr = df2[prep.obs_row]
    H = Hierarchy(prep, [None] * 4)
    ws = [fr["w_k"].to_numpy()[H.starts[0]].astype(float), fr["w_j"].to_numpy()[H.starts[1]].astype(float),
          fr["w_c"].to_numpy()[H.starts[2]].astype(float), fr["w_i"].to_numpy().astype(float)]
    pm = PseudoModel(prep, table, ws)
    psi = _psi(table, np.random.default_rng(9))
    llo, go, _ = pm.pseudo(psi)
    if pm._fast:
        llk, gk = pm.evaluate(psi)
        assert llk == pytest.approx(llo, rel=1e-13)
        np.testing.assert_allclose(gk, go, rtol=1e-10, atol=1e-10 * np.abs(go).max())
    on_numpy = PseudoModel(prep, table, ws, backend="numpy")
    assert not on_numpy._fast
    assert on_numpy.evaluate(psi)[0] == pytest.approx(llo, rel=1e-13)
