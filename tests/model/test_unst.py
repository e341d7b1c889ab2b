"""Issue 14 (unst): the exact Hessian of grouped random intercepts with covariance
blocks (mlsem.model.unst, kernel unst_eval).

The kernel's part must equal the NumPy oracle (_oracle.unst_dense) at 1 and 2
threads; the evaluator must give the full model's log-likelihood and gradient
and the Hessian of central differences of the full model's gradient, with and
without the county effect, unstructured, equal and listed covariances, weights
and several residual variances; points outside (Phi not positive semi-definite,
a residual variance of 0) are refused; models outside the path say why."""
import numpy as np
import pytest

import mlsem
from mlsem.estimate.optimize import hessian
from mlsem.model import _oracle
from mlsem.model.multilevel import Model
from mlsem.model.reduced import reduce_model
from mlsem.model.unst import build_unst, why_not_unst

UNST = {"variance": "slot", "covariance": "unstructured"}
COV = np.array([[1.0, 0.5, 0.3, 0.2], [0.5, 0.8, 0.4, 0.1], [0.3, 0.4, 1.2, 0.5], [0.2, 0.1, 0.5, 0.9]])


def _data(seed=3, counties=90):
    return mlsem.simulate(counties, (1, 4), (1, 6), intercept=1.0, slope=0.5, sd_county=0.0,
                          school_cov=COV, sd_resid=1.0, x="normal", seed=seed)


CASES = {
    "unstructured": ("y ~ x + (1 | k:j)", {"effects": {"j": UNST}}),
    "unstructured_county": ("y ~ x + (1 | k/j)", {"effects": {"j": UNST}}),
    "equal": ("y ~ x + (1 | k:j)", {"effects": {"j": {"variance": "slot", "covariance": "equal"}}}),
    "pairs_county": ("y ~ x + (1 | k/j)",
                     {"effects": {"j": {"variance": "slot", "covariance": [(1, 2), (3, 4)]}}}),
    "resid_by_slot": ("y ~ x + (1 | k:j)", {"effects": {"j": UNST}, "residuals": {"variance": "j"}}),
}


def _fit(case):
    f, kw = CASES[case]
    return mlsem.fit(_data(), f, **kw)


def _exact(res):
    full = Model(res.model.prep, res.model.table, nthreads=1)
    red, why = reduce_model(full, patterns=False)
    assert red is not None, why
    ex, why = build_unst(red)
    assert ex is not None, why
    return full, ex


def _points(res, ex):
    """Points near the estimate with Phi positive semi-definite (covariances shrunk)."""
    rng = np.random.default_rng(5)
    psi = res.estimate
    kinds = np.array(res.kinds)
    out = []
    for _ in range(3):
        p = psi * (1 + 0.2 * rng.uniform(-1, 1, psi.size))
        var = (kinds == "var") | (kinds == "resid")
        p[var] = np.abs(p[var]) + 0.05
        while not ex.psd(ex.phi(p)):
            p[kinds == "cov"] *= 0.5
        out.append(p)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_oracle(case):
    res = _fit(case)
    full, ex = _exact(res)
    red, t = ex.red, res.model.table
    for psi in _points(res, ex):
        Phi = ex.phi(psi)
        theta_s = np.zeros(red.P)
        theta_s[t.theta_row] = psi[t.theta_param]
        o = _oracle.unst_dense(ex._row_ptr, ex._slot, ex._y, ex._X, psi[ex.beta], ex.load, ex.lat,
                               Phi, theta_s, ex._wrow, t.phi_row, t.phi_col, t.phi_param, ex._thp,
                               ex.beta, ex.nv)
        for nt in (1, 2):
            red._nt = nt
            ex._acc = np.zeros((nt, ex.nacc))
            ex._status = np.zeros(nt, dtype=np.int32)
            k = ex.between(psi)
            assert k[0] == pytest.approx(o[0], rel=1e-12)
            assert np.allclose(k[1], o[1], rtol=1e-10, atol=1e-10 * np.abs(o[1]).max())
            assert np.allclose(k[2], o[2], rtol=1e-10, atol=1e-11 * np.abs(o[2]).max())


def test_kernel_equals_oracle_with_weights():
    d = _data().with_columns(w=(mlsem.simulate(90, 1, 1, seed=9)["x"] + 0.5).repeat_by(1).explode()
                             .gather(_data()["k"] - 1))
    res = mlsem.fit(d, "y ~ x + (1 | k:j)", effects={"j": UNST}, weights="w")
    full, ex = _exact(res)
    assert not np.all(ex._wrow == 1.0)
    red, t = ex.red, res.model.table
    psi = _points(res, ex)[0]
    theta_s = np.zeros(red.P)
    theta_s[t.theta_row] = psi[t.theta_param]
    o = _oracle.unst_dense(ex._row_ptr, ex._slot, ex._y, ex._X, psi[ex.beta], ex.load, ex.lat,
                           ex.phi(psi), theta_s, ex._wrow, t.phi_row, t.phi_col, t.phi_param, ex._thp,
                           ex.beta, ex.nv)
    k = ex.between(psi)
    assert k[0] == pytest.approx(o[0], rel=1e-12)
    assert np.allclose(k[2], o[2], rtol=1e-10, atol=1e-11 * np.abs(o[2]).max())
    ll, g, H = ex.evaluate(psi)
    ll0, g0 = full.evaluate(psi)
    assert ll == pytest.approx(ll0, rel=1e-11)
    assert np.allclose(H, hessian(full, psi), rtol=1e-5, atol=1e-6 * np.abs(H).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluator_equals_full_model_and_differences(case):
    res = _fit(case)
    full, ex = _exact(res)
    for psi in _points(res, ex)[:2]:
        ll, g, H = ex.evaluate(psi)
        ll0, g0 = full.evaluate(psi)
        assert ll == pytest.approx(ll0, rel=1e-11)
        unit = full.pscale
        assert np.allclose(g * unit, g0 * unit, rtol=1e-8, atol=1e-8 * np.sqrt(full.prep.nobs))
        Hd = hessian(full, psi)
        assert np.allclose(H, Hd, rtol=1e-5, atol=1e-6 * np.max(np.abs(Hd)))


def test_inadmissible_points_are_refused():
    res = _fit("unstructured")
    full, ex = _exact(res)
    psi = res.estimate.copy()
    psi[res.names.index("var(Residual)")] = 0.0
    assert ex.evaluate(psi) is None
    psi = res.estimate.copy()
    # a covariance larger than the two variances allow: Phi indefinite (Sigma may still be
    # positive definite, the model's parameter space is not left)
    i = [n for n in res.names if n.startswith("cov(")][0]
    psi[res.names.index(i)] = 3.0
    assert not ex.psd(ex.phi(psi))
    assert ex.evaluate(psi) is None


def test_step_cap_keeps_phi_psd():
    res = _fit("unstructured")
    full, ex = _exact(res)
    psi = res.estimate.copy()
    rng = np.random.default_rng(1)
    for _ in range(20):
        step = rng.normal(size=psi.size) * np.abs(psi).max()
        t = ex.step_cap(psi, step)
        assert 0 <= t <= 1
        assert ex.psd(ex.phi(psi + t * step))
        if t < 1:   # the cap is 90% of the way to the boundary
            assert not ex.psd(ex.phi(psi + min(1.0, t / 0.9 * 1.01) * step)) or t / 0.9 * 1.01 >= 1


def test_outside_say_why():
    d = _data()
    sl = mlsem.fit(d, "y ~ x + (x | k)")
    assert why_not_unst(sl.model) is not None
    std = mlsem.fit(d, "y ~ x + (1 | k/j)")
    assert "no covariances" in why_not_unst(std.model)      # ri2 keeps it (faster)
    assert std.opt.exact_hessian_reason is None
    assert "mlsem.model.ri2" in std.opt.message
