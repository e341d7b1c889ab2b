"""Several outcomes (issue 15): the block-diagonal Theta kernel against the NumPy
oracle and finite differences, nlme's multivariate reference, the independence
restriction against the separate univariate fits, missing cells, refusals."""
import json
import os

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.data.multivariate import load_multi, prepare_multi
from mlsem.errors import MlsemError
from mlsem.model import _oracle
from mlsem.model.multilevel import _core
from mlsem.model.multivariate import MultiModel, subset_inverses
from mlsem.spec.multivariate import check_structures, multivariate_table, parse_formulas

HERE = os.path.dirname(os.path.dirname(__file__))
FORMULAS = ["y1 ~ x + (1 | k/j)", "y2 ~ x + z + (1 | k/j)"]


def random_data(seed, counties=12, max_schools=3, max_pupils=4, nout=2, miss=0.25):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(counties):
        zk = rng.normal()
        for j in range(rng.integers(1, max_schools + 1)):
            for i in range(rng.integers(1, max_pupils + 1)):
                x = rng.normal()
                ys = [rng.normal() + 0.5 * x + 0.3 * zk for _ in range(nout)]
                ys = [None if rng.uniform() < miss else v for v in ys]
                rows.append((k, j + 1, i + 1, x, zk, *ys))
    names = ["k", "j", "i", "x", "z"] + [f"y{o + 1}" for o in range(nout)]
    return pl.DataFrame(rows, schema=names, orient="row")


def build(df, formulas, outcomes=None, index="i"):
    Fs, levels = parse_formulas(formulas)
    frame, encs = load_multi(df, Fs, levels, index=index)
    prep = prepare_multi(frame, Fs, encs, levels, index=index)
    table = multivariate_table(prep, [F.outcome for F in Fs],
                               check_structures(outcomes, [lv[-1] for lv in levels]))
    return prep, table


def random_psi(model, rng):
    t = model.table
    psi = np.zeros(t.nparams)
    for i, p in enumerate(t.params):
        if p.kind in ("var", "resid"):
            psi[i] = rng.uniform(0.5, 2.0)
        elif p.kind in ("cov", "rcov"):
            psi[i] = rng.uniform(-0.3, 0.3)
        else:
            psi[i] = rng.normal(0, 0.3)
    return psi


# ---- kernel ------------------------------------------------------------------------------

@pytest.mark.skipif(_core is None, reason="compiled kernel not built")
@pytest.mark.parametrize("barrow", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_block_kernel_equals_oracle(seed, barrow):
    """mfactor_loglik == the dense oracle with Theta = block_theta(R): log-likelihood,
    dl/dPhi, dl/dR and w, with row weights, 1 or 2 threads, 2 or 3 outcomes (missing
    cells make every subset of outcomes appear)."""
    rng = np.random.default_rng(seed)
    nout = 2 + seed % 2
    df = random_data(seed, counties=6 + seed, nout=nout)
    fs = [f"y{o + 1} ~ x + (1 | k/j)" for o in range(nout)]
    prep, tab = build(df, fs)
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    M, nout = prep.nlatent, tab.nout
    resid = rng.normal(size=prep.nobs)
    m = MultiModel(prep, tab, backend="cython", nthreads=1 + seed % 2)
    _, Phi, R = m.matrices(random_psi(m, rng))     # (the level's block shared by its nodes)
    F = m.factor(Phi)
    rinv, rlogdet = subset_inverses(R)
    nt = m._nt
    w = np.zeros(prep.nobs)
    ll = np.zeros(nt)
    gphi = np.zeros((nt, M * M))
    gR = np.zeros((nt, nout * nout))
    st = np.zeros(nt, dtype=np.int32)
    old = _core.set_block_arrowhead(barrow)
    try:
        _core.mfactor_loglik(prep.pat_ptr, prep.row_ptr, m._slot, resid.copy(), m._load,
                             m._slot_lat, F, m.blk_start, m.blk_end, m._spup, m._sout, nout, rinv,
                             rlogdet, prep.wrow, w, ll, gphi, gR, st, m._maxn, m._maxm, m._maxc,
                             nt, 1, unit_load=m._unit_load)
    finally:
        _core.set_block_arrowhead(old)
    assert not st.any()
    ll2, gphi2, gR2, w2 = _oracle.loglik_blocks(prep.row_ptr, prep.slot, resid, prep.load,
                                                prep.slot_lat, Phi, R, m._sout, m._spup, prep.wrow)
    assert ll.sum() == pytest.approx(ll2, rel=1e-11)
    # the block-arrowhead path computes dl/dPhi within a node's block only (where Phi has
    # parameters); across nodes it leaves 0
    node = prep.latent_node
    inside = node[:, None] == node[None, :]
    g1 = gphi.sum(0).reshape(M, M)
    np.testing.assert_allclose(g1[inside], gphi2[inside], rtol=1e-8, atol=1e-10)
    if not barrow:
        np.testing.assert_allclose(g1, gphi2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gR.sum(0).reshape(nout, nout), gR2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w, w2, rtol=1e-8, atol=1e-12)


def test_oracle_block_theta_gradient_is_dl_dR():
    """The oracle's dl/dR against finite differences of its log-likelihood in R."""
    rng = np.random.default_rng(4)
    prep, tab = build(random_data(4, counties=5), ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"])
    M = prep.nlatent
    Phi = np.eye(M) * 0.7
    R = np.array([[1.2, 0.4], [0.4, 0.9]])
    resid = rng.normal(size=prep.nobs)
    sout, spup = prep.meta["sout"], prep.meta["spup"]
    args = (prep.row_ptr, prep.slot, resid, prep.load, prep.slot_lat, Phi)
    _, _, gR, _ = _oracle.loglik_blocks(*args, R, sout, spup, prep.wrow)
    for a in range(2):
        for b in range(a + 1):
            h = 1e-6
            E = np.zeros((2, 2))
            E[a, b] = E[b, a] = h           # a symmetric step: both entries of a covariance
            up, dn = R + E, R - E
            fd = (_oracle.loglik_blocks(*args, up, sout, spup, prep.wrow, False)[0]
                  - _oracle.loglik_blocks(*args, dn, sout, spup, prep.wrow, False)[0]) / (2 * h)
            an = gR[a, b] + (gR[b, a] if a != b else 0.0)
            assert an == pytest.approx(fd, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("outcomes", [None, {"k": "independent", "residual": "independent"}])
def test_gradient_equals_finite_differences(backend, outcomes):
    if backend == "cython" and _core is None:
        pytest.skip("compiled kernel not built")
    rng = np.random.default_rng(42)
    prep, tab = build(random_data(1, counties=10), FORMULAS, outcomes)
    m = MultiModel(prep, tab, backend=backend)
    psi = random_psi(m, rng)
    _, g = m.evaluate(psi)
    for i in range(len(psi)):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (m.evaluate(up, need_grad=False)[0] - m.evaluate(dn, need_grad=False)[0]) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-5), tab.names[i]


@pytest.mark.skipif(_core is None, reason="compiled kernel not built")
def test_kernel_model_equals_oracle_model():
    rng = np.random.default_rng(9)
    prep, tab = build(random_data(9, counties=15, nout=3),
                      ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)", "y3 ~ 1 + (1 | k/j)"])
    a = MultiModel(prep, tab, backend="cython", nthreads=2)
    b = MultiModel(prep, tab, backend="numpy")
    psi = random_psi(a, rng)
    la, ga = a.evaluate(psi)
    lb, gb = b.evaluate(psi)
    assert la == pytest.approx(lb, rel=1e-11)
    np.testing.assert_allclose(ga, gb, rtol=1e-8, atol=1e-9)


def test_non_positive_definite_R_fails_cleanly():
    prep, tab = build(random_data(2), FORMULAS)
    m = MultiModel(prep, tab)
    psi = random_psi(m, np.random.default_rng(0))
    psi[tab.index("cov(Residual:y1,Residual:y2)")] = 10.0
    assert m.evaluate(psi) == (None, None)


# ---- the reference (nlme) -------------------------------------------------------------------

def _ref():
    with open(os.path.join(HERE, "reference", "multivariate.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mv_fit():
    d = mlsem.example_data("multivariate")
    return mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i")


def test_nlme_reference(mv_fit):
    ref = _ref()["multivariate"]
    r = mv_fit
    assert r.converged
    assert r.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    est = dict(zip(r.names, r.estimate))
    se = dict(zip(r.names, r.std_err))
    fixed = {"outcomey1": "y1:Intercept", "outcomey2": "y2:Intercept",
             "outcomey1:x": "y1:x", "outcomey2:x": "y2:x"}
    for rn, mn in fixed.items():
        assert est[mn] == pytest.approx(ref["fixed"][rn], rel=1e-4, abs=1e-5), mn
        assert se[mn] == pytest.approx(ref["fixed_se"][rn], rel=1e-3), mn
    from mlsem.api.multivariate import covariance_matrix
    for key, lv in (("cov_k", "k"), ("cov_j", "j"), ("cov_residual", "Residual")):
        np.testing.assert_allclose(covariance_matrix(r, lv), np.array(ref[key]), rtol=1e-3)
    assert r.nobs == ref["nobs_values"]
    assert "y2 267" in " ".join(r.notes)


def test_names_and_correlations(mv_fit):
    assert mv_fit.names == [
        "y1:Intercept", "y1:x", "y2:Intercept", "y2:x", "var(k:y1)", "cov(k:y1,k:y2)",
        "var(k:y2)", "var(j:y1)", "cov(j:y1,j:y2)", "var(j:y2)", "var(Residual:y1)",
        "cov(Residual:y1,Residual:y2)", "var(Residual:y2)"]
    from mlsem.api.multivariate import correlations
    c = correlations(mv_fit)
    ref = _ref()["multivariate"]
    rk = np.array(ref["cov_k"])
    assert c["corr(k:y1,k:y2)"] == pytest.approx(rk[0, 1] / np.sqrt(rk[0, 0] * rk[1, 1]), rel=1e-3)
    assert "corr(Residual:y1,Residual:y2)" in mv_fit.summary()


def test_independent_equals_sum_of_univariate_fits(mv_fit):
    """Every cross-outcome covariance 0: the log-likelihood is the sum of the two
    univariate fits' (each on its own observed cells), the estimates theirs; the LR
    test of the restriction is one call."""
    d = mlsem.example_data("multivariate")
    ind = mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i",
                    outcomes={"k": "independent", "j": "independent", "residual": "independent"})
    u1 = mlsem.fit(d, "y1 ~ x + (1 | k/j)", index="i")
    u2 = mlsem.fit(d, "y2 ~ x + (1 | k/j)", index="i")
    assert ind.loglik == pytest.approx(u1.loglik + u2.loglik, rel=1e-9)
    e = dict(zip(ind.names, ind.estimate))
    assert e["y2:x"] == pytest.approx(dict(zip(u2.names, u2.estimate))["x"], rel=1e-4)
    assert e["var(j:y1)"] == pytest.approx(dict(zip(u1.names, u1.estimate))["var(j)"], rel=1e-3)
    lr = mlsem.lrtest(ind, mv_fit)
    assert lr.df == 3
    assert lr.chi2 == pytest.approx(2 * (mv_fit.loglik - ind.loglik), rel=1e-9)
    assert lr.chi2 > 100 and lr.p_value < 1e-20
    assert set(lr.new_params) == {"cov(k:y1,k:y2)", "cov(j:y1,j:y2)",
                                  "cov(Residual:y1,Residual:y2)"}
    # one level at a time
    k_only = mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i",
                       outcomes={"k": "independent"})
    assert "cov(k:y1,k:y2)" not in k_only.names and "cov(j:y1,j:y2)" in k_only.names
    assert mlsem.lrtest(k_only, mv_fit).df == 1


# ---- data handling ------------------------------------------------------------------------

def test_missing_covariate_makes_that_cell_missing():
    df = random_data(3, counties=30, miss=0.1)
    z = df["z"].to_numpy().copy()
    z[:7] = np.nan
    df = df.with_columns(pl.Series("z", z, nan_to_null=True))
    # a unit with y1 missing and z missing has no usable outcome
    prep, tab = build(df, FORMULAS)
    y1 = df["y1"].is_not_null().to_numpy()
    y2 = df["y2"].is_not_null().to_numpy() & df["z"].is_not_null().to_numpy()
    assert prep.nobs == int(y1.sum() + y2.sum())
    assert prep.meta["dropped_units"] == int((~y1 & ~y2).sum())
    # the missing cells are counted among the kept units, the dropped units apart
    kept = y1 | y2
    assert prep.meta["cells_missing"] == {"y1": int((~y1 & kept).sum()), "y2": int((~y2 & kept).sum())}
    assert prep.missing_outcome == int((~y1 & kept).sum() + (~y2 & kept).sum())
    res = mlsem.fit(df, FORMULAS, index="i")
    nd = int((~kept).sum())
    assert nd > 0
    assert res.converged and (f"{nd} unit(s) with no usable outcome dropped; "
                              f"{res.missing_outcome} missing cell(s) among the kept ones") in " ".join(res.notes)
    assert res.nobs + res.missing_outcome == 2 * int(kept.sum())


def test_row_order_without_index_is_the_units():
    df = random_data(5, counties=20)
    a = mlsem.fit(df, FORMULAS, index="i")
    b = mlsem.fit(df.sample(fraction=1.0, shuffle=True, seed=1).sort(["k", "j", "i"]), FORMULAS)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10)


def test_factors_in_one_formula():
    df = random_data(6, counties=25)
    df = df.with_columns(pl.when(pl.col("x") > 0).then(pl.lit("hi")).otherwise(pl.lit("lo"))
                         .alias("g"))
    r = mlsem.fit(df, ["y1 ~ g + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i")
    assert "y1:g[T.lo]" in r.names and "y2:x" in r.names and r.converged


@pytest.mark.parametrize("kw,msg", [
    ({"method": "reml"}, "method='reml'"),
    ({"df": "satterthwaite"}, "df="),
    ({"effects": {"j": {"variance": "slot"}}}, "effects="),
    ({"outcomes": {"school": "independent"}}, "not a level"),
    ({"outcomes": {"k": "diagonal"}}, "not one of"),
])
def test_refusals(kw, msg):
    df = random_data(1)
    with pytest.raises(MlsemError, match=msg):
        mlsem.fit(df, FORMULAS, **kw)


def test_formula_checks():
    df = random_data(1)
    with pytest.raises(MlsemError, match="same grouping"):
        mlsem.fit(df, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k)"])
    with pytest.raises(MlsemError, match="random slopes"):
        mlsem.fit(df, ["y1 ~ x + (1 + x | k)", "y2 ~ x + (1 + x | k)"])
    with pytest.raises(MlsemError, match="two formulas"):
        mlsem.fit(df, ["y1 ~ x + (1 | k)", "y1 ~ z + (1 | k)"])
    with pytest.raises(MlsemError, match="outcomes= needs several"):
        mlsem.fit(df, "y1 ~ x + (1 | k)", outcomes={"k": "independent"})


def test_random_effects_per_outcome():
    """Independent outcomes: each outcome's BLUPs are its univariate fit's."""
    d = mlsem.example_data("multivariate")
    ind = mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i",
                    outcomes={"k": "independent", "j": "independent", "residual": "independent"})
    re = ind.random_effects()
    assert set(re["effect"].unique()) == {"y1", "y2"}
    u2 = mlsem.fit(d, "y2 ~ x + (1 | k/j)", index="i").random_effects()
    key = ["level", "k", "j"]
    got = re.filter(pl.col("effect") == "y2").with_columns(pl.col("j").fill_null(-1)).sort(key)
    want = u2.with_columns(pl.col("j").fill_null(-1)).sort(key)
    # a node without a y2 cell: under independence its y2 effect is the prior (mean 0, sd
    # the standard deviation of its level); the univariate fit does not list it
    extra = got.join(want, on=key, how="anti")
    assert extra.height > 0
    assert np.allclose(extra["mean"], 0.0, atol=1e-12)
    est = dict(zip(ind.names, ind.estimate))
    for row in extra.iter_rows(named=True):
        assert row["sd"] == pytest.approx(np.sqrt(est[f"var({row['level']}:y2)"]), rel=1e-9)
    got = got.join(want.select(key), on=key, how="semi").sort(key)
    assert got.height == want.height
    np.testing.assert_allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(got["sd"].to_numpy(), want["sd"].to_numpy(), rtol=2e-3)
    # predictions with several outcomes: tests/results/test_multivariate_predict.py
    assert ind.predict().height == ind.nobs


@pytest.mark.parametrize("backend,barrow", [("cython", True), ("cython", False), ("numpy", True)])
@pytest.mark.parametrize("outcomes", [None, {"j": "independent"}])
def test_phi_hessian_equals_differences_of_the_gradient(backend, barrow, outcomes):
    """The kernel's exact d2l/dPhi2 block (block-arrowhead and general paths, the oracle)
    against central differences of the analytic gradient."""
    if backend == "cython" and _core is None:
        pytest.skip("compiled kernel not built")
    rng = np.random.default_rng(5)
    prep, tab = build(random_data(7, counties=9, nout=2), FORMULAS, outcomes)
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    m = MultiModel(prep, tab, backend=backend, nthreads=2)
    psi = random_psi(m, rng)
    old = _core.set_block_arrowhead(barrow) if _core is not None else None
    try:
        ll, g, H = m.phi_hessian(psi)
        hp = m.hess_params
        assert len(hp) == sum(p.kind in ("var", "cov") for p in tab.params)
        for a, i in enumerate(hp):
            h = 1e-5 * max(1.0, abs(psi[i]))
            up, dn = psi.copy(), psi.copy()
            up[i] += h
            dn[i] -= h
            fd = (m.evaluate(up)[1] - m.evaluate(dn)[1]) / (2 * h)
            np.testing.assert_allclose(H[:, a], fd[hp], rtol=1e-5, atol=1e-5)
    finally:
        if old is not None:
            _core.set_block_arrowhead(old)


def test_inference_that_carries_over_and_refusals(mv_fit, tmp_path):
    """Wald tests (generic on the estimates and their covariance), OIM errors, export;
    what needs the univariate machinery is refused by name."""
    w = mv_fit.wald(["y1:x = y2:x"])
    se = dict(zip(mv_fit.names, mv_fit.std_err))
    est = dict(zip(mv_fit.names, mv_fit.estimate))
    cov = mv_fit.vcov
    i, j = mv_fit.names.index("y1:x"), mv_fit.names.index("y2:x")
    C = mv_fit.cov
    z2 = (est["y1:x"] - est["y2:x"]) ** 2 / (C[i, i] + C[j, j] - 2 * C[i, j])
    assert w["chi2"] == pytest.approx(z2, rel=1e-9) and cov.height == len(mv_fit.names)
    d = mlsem.example_data("multivariate")
    oim = mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i", vce="oim")
    assert oim.loglik == pytest.approx(mv_fit.loglik, rel=1e-10)
    assert dict(zip(oim.names, oim.std_err))["y1:x"] == pytest.approx(se["y1:x"], rel=0.05)
    rind = mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], index="i",
                     outcomes={"residual": "independent"})
    mv_fit.to_json(tmp_path / "f.json")
    mv_fit.to_parquet(tmp_path / "f.parquet")
    for call, msg in ((lambda: mv_fit.fit_test(), "fit_test"),
                      (lambda: mv_fit.confint(method="profile"), "profile"),
                      (lambda: mv_fit.bootstrap(n=5), "bootstrap"),
                      (lambda: mlsem.lrtest(rind, mv_fit, bootstrap=5), "bootstrap"),
                      (lambda: mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"],
                                         backend="dask"), "dask"),
                      (lambda: mlsem.fit(d, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"],
                                         method="reml"), "reml")):
        with pytest.raises(MlsemError, match=msg):
            call()
