"""Kernel == NumPy oracle, and analytic gradient == finite differences, on
random small models (both kernel paths, weights, random slopes)."""
import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings, strategies as st

from mlsem.model import _oracle
from mlsem.data.prepare import prepare
from mlsem.spec.formula import nest_levels, parse_formula
from mlsem.model.multilevel import Model, _core
from mlsem.spec.table import multilevel_table

pytestmark = pytest.mark.skipif(_core is None, reason="compiled kernel not built")


def random_data(seed, counties, max_schools, max_pupils, slope=False):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(counties):
        for j in range(rng.integers(1, max_schools + 1)):
            for i in range(rng.integers(1, max_pupils + 1)):
                x = rng.normal()
                rows.append((k, j + 1, i + 1, x, rng.normal() + 0.5 * x))
    return pl.DataFrame(rows, schema=["k", "j", "i", "x", "y"], orient="row")


def build(df, formula):
    F = parse_formula(formula)
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects,
                   index="i" if len(levels) > 1 else None)
    return prep, multilevel_table(prep, F, levels)


def random_psi(model, rng):
    psi = np.zeros(model.table.nparams)
    for i, p in enumerate(model.table.params):
        if p.kind in ("var", "resid"):
            psi[i] = rng.uniform(0.2, 2.0)
        elif p.kind == "cov":
            # |cov| < 0.2 <= sqrt(var_a var_b): the 2 x 2 slope blocks stay positive definite
            psi[i] = rng.uniform(-0.19, 0.19)
        else:
            psi[i] = rng.normal(0, 0.3)
    return psi


FORMULAS = ["y ~ x + (1 | k/j)", "y ~ x + (1 + x | k) + (1 | k:j)", "y ~ x + (1 | k:j)",
            "y ~ 0 + x + (1 + x || k)"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), counties=st.integers(1, 12), ms=st.integers(1, 4),
       mp=st.integers(1, 4), fi=st.integers(0, len(FORMULAS) - 1), nt=st.integers(1, 2))
def test_factor_kernel_equals_oracle(seed, counties, ms, mp, fi, nt):
    rng = np.random.default_rng(seed)
    prep, tab = build(random_data(seed, counties, ms, mp), FORMULAS[fi])
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    kern = Model(prep, tab, backend="cython", nthreads=nt)
    orac = Model(prep, tab, backend="numpy")
    psi = random_psi(kern, rng)
    ll1, g1 = kern.evaluate(psi)
    ll2, g2 = orac.evaluate(psi)
    assert ll1 == pytest.approx(ll2, rel=1e-11, abs=1e-9)
    np.testing.assert_allclose(g1, g2, rtol=1e-8, atol=1e-8)


def test_dense_kernel_equals_oracle():
    rng = np.random.default_rng(3)
    prep, tab = build(random_data(5, 30, 3, 4), "y ~ x + (1 | k/j)")
    kern = Model(prep, tab, backend="cython")
    kern.dense = True  # force the dense path on a diagonal Theta
    kern._gth = np.zeros((kern._nt, kern.P * kern.P))
    orac = Model(prep, tab, backend="numpy")
    psi = random_psi(kern, rng)
    ll1, g1 = kern.evaluate(psi)
    ll2, g2 = orac.evaluate(psi)
    assert ll1 == pytest.approx(ll2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-9)


def test_raw_kernels_full_theta_and_phi():
    """The dense kernel against the oracle with a full Theta and full Phi."""
    rng = np.random.default_rng(11)
    prep, tab = build(random_data(8, 15, 3, 3), "y ~ x + (1 | k/j)")
    M, P = prep.nlatent, prep.nslots
    A = rng.normal(size=(M, M))
    Phi = A @ A.T + np.eye(M)
    B = rng.normal(size=(P, P)) * 0.2
    Theta = B @ B.T + np.eye(P)
    resid = rng.normal(size=prep.nobs)
    out = dict(w=np.zeros(prep.nobs), ll=np.zeros(1), gphi=np.zeros((1, M * M)),
               gth=np.zeros((1, P * P)), st=np.zeros(1, dtype=np.int32))
    _core.dense_loglik(prep.pat_ptr, prep.row_ptr, prep.slot, resid, prep.load, prep.slot_lat,
                       Phi, Theta, prep.wrow, out["w"], out["ll"], out["gphi"], out["gth"],
                       out["st"], prep.max_row_obs, 1, 1)
    ll, gphi, gth, w = _oracle.loglik(prep.row_ptr, prep.slot, resid, prep.load, prep.slot_lat,
                                      Phi, Theta, prep.wrow)
    assert out["ll"][0] == pytest.approx(ll, rel=1e-12)
    np.testing.assert_allclose(out["gphi"][0].reshape(M, M), gphi, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["gth"][0].reshape(P, P), gth, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["w"], w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("formula", FORMULAS)
def test_gradient_equals_finite_differences(formula):
    rng = np.random.default_rng(42)
    prep, tab = build(random_data(1, 20, 3, 3), formula)
    m = Model(prep, tab, backend="cython")
    psi = random_psi(m, rng)
    _, g = m.evaluate(psi)
    for i in range(len(psi)):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (m.evaluate(up, need_grad=False)[0] - m.evaluate(dn, need_grad=False)[0]) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-5), tab.names[i]


def test_tau_gradient_chain_rule():
    """The Cholesky change of variables for unstructured blocks."""
    rng = np.random.default_rng(7)
    prep, tab = build(random_data(2, 20, 3, 3), "y ~ x + (1 + x | k) + (1 | k:j)")
    m = Model(prep, tab, backend="cython")
    tau = m.psi_to_tau(random_psi(m, rng))
    _, gpsi = m.evaluate(m.tau_to_psi(tau))
    g = m.grad_tau(tau, gpsi)
    for i in range(len(tau)):
        h = 1e-6
        up, dn = tau.copy(), tau.copy()
        up[i] += h
        dn[i] -= h
        fd = (m.evaluate(m.tau_to_psi(up), False)[0] - m.evaluate(m.tau_to_psi(dn), False)[0]) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-5)


def test_non_positive_definite_reports_failure_not_nan():
    prep, tab = build(random_data(4, 10, 2, 3), "y ~ x + (1 | k/j)")
    m = Model(prep, tab, backend="cython")
    psi = np.array([0.0, 0.5, 1.0, 1.0, -1.0])  # negative residual variance
    assert m.evaluate(psi) == (None, None)
    psi = np.array([0.0, 0.5, -5.0, 1.0, 1.0])  # negative variance component
    assert m.evaluate(psi) == (None, None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrowhead_path_equals_generic_factor_path(seed):
    """Nested random intercepts take the arrowhead fast path of the factor
    kernel; it must give what the generic Woodbury path gives (weights, 1 and 2
    threads), and what the oracle gives."""
    rng = np.random.default_rng(seed)
    prep, tab = build(random_data(seed, 40, 5, 6), "y ~ x + (1 | k/j)")
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    psi = random_psi(Model(prep, tab, backend="cython"), rng)
    out = []
    for arrow in (True, False):
        old = _core.set_arrowhead(arrow)
        try:
            for nt in (1, 2):
                out.append(Model(prep, tab, backend="cython", nthreads=nt).evaluate(psi))
        finally:
            _core.set_arrowhead(old)
    ll0, g0 = Model(prep, tab, backend="numpy").evaluate(psi)
    for ll, g in out:
        assert ll == pytest.approx(ll0, rel=1e-12)
        np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-9)


SINGLE_CASES = [
    ("y ~ x + (1 | k:j)", {}),
    ("y ~ x + (0 + x | k:j)", {}),                                   # loadings = x
    ("y ~ x + (1 | k:j)", {"effects": {"j": {"variance": "slot"}}}),
    ("y ~ x + (1 | k:j)", {"effects": {"j": {"variance": "slot", "covariance": "unstructured"}}}),
]


@pytest.mark.parametrize("formula,kw", SINGLE_CASES, ids=lambda v: str(v)[:50])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_latent_path_equals_generic_factor_path(formula, kw, seed):
    """Slots that load on one latent each take the single-latent fast path of the
    factor kernel; log-likelihood, gradient and exact Phi Hessian must equal the
    generic Woodbury path's and the oracle's (weights, 1 and 2 threads)."""
    import mlsem
    rng = np.random.default_rng(seed)
    res = mlsem.fit(random_data(seed, 40, 5, 6), formula, index="i", **kw)
    model = res.model
    prep, tab = model.prep, model.table
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    psi = res.opt.final * rng.uniform(0.8, 1.2, size=len(res.opt.final))
    if "covariance" in str(kw):   # halfway to the (diagonal) start: positive definite
        from mlsem.estimate.optimize import start_values
        psi = 0.5 * res.opt.final + 0.5 * start_values(model)
    out = []
    for single in (True, False):
        old = _core.set_single(single)
        try:
            for nt in (1, 2):
                out.append(Model(prep, tab, backend="cython", nthreads=nt).phi_hessian(psi))
        finally:
            _core.set_single(old)
    ll0, g0, H0 = Model(prep, tab, backend="numpy").phi_hessian(psi)
    for ll, g, H in out:
        assert ll == pytest.approx(ll0, rel=1e-12)
        np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(H, H0, rtol=1e-9, atol=1e-9 * np.abs(H0).max())


@pytest.mark.parametrize("formula", ["y ~ x + (1 | k/j)", "y ~ x + (1 | k:j)", "y ~ x + (1 + x | k/j)"])
def test_unit_loadings_skip_equals_reading_them(formula):
    """Random intercepts only: the row loops use loading 1 without reading the
    loadings array; the result is the one computed with the array."""
    rng = np.random.default_rng(3)
    prep, tab = build(random_data(3, 30, 4, 5), formula)
    m = Model(prep, tab, backend="cython", nthreads=2)
    assert m._unit_load == ("+ x |" not in formula)
    psi = random_psi(m, rng)
    ll1, g1 = m.evaluate(psi)
    m._unit_load = False
    ll0, g0 = m.evaluate(psi)
    assert ll1 == pytest.approx(ll0, rel=1e-13)
    np.testing.assert_allclose(g1, g0, rtol=1e-11, atol=1e-11)
