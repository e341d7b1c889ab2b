"""Issue 14 (opt): the closed-form whole Hessian of grouped random intercepts
(mlsem.model.ri2, kernel ri2_eval) and Newton's method on it
(mlsem.estimate.newton_exact).

The kernel must equal the NumPy oracle (_oracle.ri2_dense); the evaluator must
give the full model's log-likelihood and gradient and the Hessian of central
differences of the full model's gradient; the fits must equal the L-BFGS-B
driver's on the full data, on awkward data (unbalanced, one school in some
counties, schools of one pupil, a variance on its bound of 0, weights,
relaxations); models outside the path say why."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.estimate.grouped import optimize_auto
from mlsem.estimate.optimize import hessian, optimize
from mlsem.model import _core, _oracle
from mlsem.model.multilevel import Model
from mlsem.model.reduced import reduce_model
from mlsem.model.ri2 import build_exact, why_not_exact

from conftest import REF

F = "y ~ x + (1 | k/j)"


def _sim(**kw):
    base = dict(intercept=1.0, slope=0.5, sd_county=1.0, sd_school=0.7, sd_resid=1.0,
                x="normal", seed=11)
    base.update(kw)
    return base


DATA = {
    # unbalanced: 1-6 schools of 1-8 pupils (schools of one pupil, counties of one school)
    "unbalanced": lambda: mlsem.simulate(80, (1, 6), (1, 8), **_sim()),
    "one_pupil_schools": lambda: mlsem.simulate(60, (2, 5), (1, 3), **_sim(seed=4)),
    "one_school_counties": lambda: mlsem.simulate(120, (1, 2), (2, 7), **_sim(seed=5)),
    "school_variance_zero": lambda: mlsem.simulate(300, (1, 5), (1, 8), **_sim(sd_school=0.0, seed=5)),
}
KW = {
    "standard": {},
    "var_by_slot": {"effects": {"j": {"variance": "slot"}}},
    "resid_by_slot": {"residuals": {"variance": "j"}},
}
CASES = [(d, k) for d in DATA for k in KW
         if not (k != "standard" and d in ("school_variance_zero", "one_school_counties"))]


def _fit(data, kw):
    return mlsem.fit(DATA[data](), F, **KW[kw])


def _weighted():
    return mlsem.fit(mlsem.example_data("unbalanced_weighted"), "y ~ x1 + z + (1 | k/j)",
                     weights="w_k")


def _fresh(res):
    return Model(res.model.prep, res.model.table, nthreads=1)


def _exact(res, patterns=True):
    red, why = reduce_model(_fresh(res), patterns=patterns)
    assert red is not None, why
    ex, why = build_exact(red)
    assert ex is not None, why
    return ex


def _points(res):
    rng = np.random.default_rng(7)
    psi = res.estimate
    return [np.maximum(psi, 0.05)] + [np.abs(psi * (1 + 0.3 * rng.uniform(-1, 1, psi.size))) + 0.02
                                      for _ in range(2)]


def _kernel_and_oracle(ex, psi, nthreads):
    red = ex.red
    t = red.table
    Phid = np.zeros(red.M)
    Phid[t.phi_row] = psi[t.phi_param]
    tau_s = np.where(ex.low >= 0, Phid[np.maximum(ex.low, 0)], 0.0)
    theta_s = np.zeros(red.P)
    theta_s[t.theta_row] = psi[t.theta_param]
    gamma = float(Phid[ex.top])
    beta = np.ascontiguousarray(psi[ex.beta])
    q, nv, nt = red.q, ex.nv, nthreads
    out = [np.zeros(nt), np.zeros((nt, nv)), np.zeros((nt, q)), np.zeros((nt, nv * nv)),
           np.zeros((nt, nv * q)), np.zeros((nt, q * q))]
    st = np.zeros(nt, dtype=np.int32)
    _core.ri2_eval(ex._row_ptr, red._slot, ex._y, red._X, beta, ex.l0, ex.l1, tau_s, theta_s,
                   ex.ptau, ex.pth, gamma, ex.pgam, ex._wrow, *out, st, nt, 1, 1)
    assert not st.any()
    hbb = out[5].sum(0).reshape(q, q)
    k = (out[0].sum(), out[1].sum(0), out[3].sum(0).reshape(nv, nv), out[2].sum(0),
         out[4].sum(0).reshape(nv, q), np.tril(hbb) + np.tril(hbb, -1).T)
    o = _oracle.ri2_dense(ex._row_ptr, red._slot, ex._y, red._X, beta, ex.l0, ex.l1, tau_s,
                          theta_s, ex.ptau, ex.pth, gamma, ex.pgam, ex._wrow, nv)
    return k, o


@pytest.mark.parametrize("data,kw", CASES + [("weighted", "standard")])
def test_kernel_equals_oracle(data, kw):
    res = _weighted() if data == "weighted" else _fit(data, kw)
    ex = _exact(res)
    for psi in _points(res):
        for nt in (1, 2):
            k, o = _kernel_and_oracle(ex, psi, nt)
            assert k[0] == pytest.approx(o[0], rel=1e-12)
            for a, b in zip(k[1:], o[1:]):
                assert np.allclose(a, b, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("data,kw", CASES + [("weighted", "standard")])
def test_evaluator_equals_full_model_and_differences(data, kw):
    """ll and gradient equal the full data's; the whole Hessian (cross terms and
    the within-group part included) equals central differences of the full
    model's analytic gradient."""
    res = _weighted() if data == "weighted" else _fit(data, kw)
    full = _fresh(res)
    for patterns in (True, False):
        ex = _exact(res, patterns)
        for psi in _points(res)[1:]:
            ll, g, H = ex.evaluate(psi)
            ll0, g0 = full.evaluate(psi)
            assert ll == pytest.approx(ll0, rel=1e-11)
            unit = full.pscale
            assert np.allclose(g * unit, g0 * unit, rtol=1e-8, atol=1e-8 * np.sqrt(full.prep.nobs))
            Hd = hessian(full, psi)
            assert np.allclose(H, Hd, rtol=1e-5, atol=1e-6 * np.max(np.abs(Hd)))


def test_inadmissible_points_are_refused():
    res = _fit("unbalanced", "standard")
    ex = _exact(res)
    psi = res.estimate.copy()
    psi[res.names.index("var(Residual)")] = 0.0
    assert ex.evaluate(psi) is None
    psi = res.estimate.copy()
    psi[res.names.index("var(k)")] = -0.1
    assert ex.evaluate(psi) is None


@pytest.mark.parametrize("data,kw", CASES + [("weighted", "standard")])
def test_fit_equals_lbfgsb_on_full_data(data, kw):
    res = _weighted() if data == "weighted" else _fit(data, kw)
    assert res.opt.method == "newton" and res.opt.exact_hessian_reason is None, \
        (res.opt.exact_hessian_reason, res.opt.newton_reason)
    old = optimize(_fresh(res))
    assert old.converged and res.converged
    assert res.loglik == pytest.approx(old.loglik, abs=1e-7)
    scale = np.maximum(np.abs(old.final), 1e-3 * np.max(np.abs(old.final)))
    assert np.max(np.abs(res.estimate - old.final) / scale) < 1e-6
    # the information is the exact Hessian at the estimate
    Hd = hessian(_fresh(res), res.estimate)
    if data == "school_variance_zero":
        assert res.estimate[res.names.index("var(j)")] == 0.0
    else:
        assert np.allclose(res.opt.hessian, Hd, rtol=1e-5, atol=1e-6 * np.max(np.abs(Hd)))
    assert res.opt.evaluations < old.evaluations


def test_reference_medium_on_the_exact_path():
    """medium (lme4 reference values in tests/reference) goes this way."""
    res = mlsem.fit(REF / "medium.parquet", F)
    assert res.opt.method == "newton" and res.opt.exact_hessian_reason is None
    assert res.opt.evaluations <= 9


def test_units_of_y_do_not_change_the_path():
    d = DATA["unbalanced"]()
    a = mlsem.fit(d, F, **KW["var_by_slot"])
    b = mlsem.fit(d.with_columns(pl.col("y") * 1e4), F, **KW["var_by_slot"])
    assert a.opt.exact_hessian_reason is None and b.opt.exact_hessian_reason is None
    assert a.opt.evaluations == b.opt.evaluations
    scale = np.where(np.array(a.kinds) == "fixed", 1e4, 1e8)
    assert np.allclose(b.estimate / scale, a.estimate, rtol=1e-7)


def test_paths_outside_say_why():
    sleep = mlsem.fit(mlsem.example_data("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
    assert sleep.opt.exact_hessian_reason is not None
    assert "covariances" in why_not_exact(mlsem.fit(
        DATA["unbalanced"](), "y ~ x + (1 | k:j)",
        effects={"j": {"variance": "slot", "covariance": "unstructured"}}).model)
