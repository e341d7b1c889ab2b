"""The exact second derivatives in Phi (kernel: mlsem.model._core.hess_accum): the
compiled kernel against the NumPy oracle's dense formula, and both against
central differences of the analytic gradient at interior points."""
import numpy as np
import pytest

import mlsem
from conftest import REF
from mlsem.estimate import optimize as estimate
from mlsem.model.multilevel import Model, _core

UNST = {"effects": {"j": {"variance": "slot", "covariance": "unstructured"}}}
CASES = [
    ("unbalanced", "y ~ x1 + z + (1 | k/j)", {}),                        # arrowhead path
    ("unbalanced", "y ~ x1 + z + (1 | k/j)", {"effects": {"j": {"variance": "slot"}}}),
    ("unbalanced", "y ~ x1 + z + (1 | k:j)", UNST),                      # one dense block
    ("unbalanced", "y ~ x1 + z + (1 | k/j)", {"effects": {"j": {"covariance": "equal"}}}),
    ("hetero_corr", "y ~ x + (1 + x | k/j)", {}),                        # random slopes
    ("pastes", "strength ~ 1 + (1 | batch/cask)", {}),
]


def fitted(name, formula, kw):
    res = mlsem.fit(REF / f"{name}.parquet", formula, **kw)
    return res, res.model


def fd_block(model, psi, idx, step=1e-5):
    """Columns idx of the Hessian by central differences of the gradient."""
    H = np.zeros((len(psi), len(idx)))
    for c, i in enumerate(idx):
        h = step * max(abs(psi[i]), 0.1)
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        H[:, c] = (model.evaluate(up)[1] - model.evaluate(dn)[1]) / (2 * h)
    return H


def interior(model, res):
    """The estimate pulled a tenth of the way back to the starting values
    (positive definite, away from every bound)."""
    return 0.9 * res.opt.final + 0.1 * estimate.start_values(model)


@pytest.mark.parametrize("name,formula,kw", CASES, ids=lambda v: str(v)[:40])
def test_phi_hessian_matches_differences(name, formula, kw):
    res, model = fitted(name, formula, kw)
    assert len(model.hess_params) > 0
    for psi in (interior(model, res), estimate.start_values(model)):
        ll, g, H = model.phi_hessian(psi)
        ll0, g0 = model.evaluate(psi)
        assert ll == pytest.approx(ll0, rel=1e-13)
        np.testing.assert_allclose(g, g0, rtol=1e-12, atol=1e-9)
        an = model.hess_params
        Hfd = fd_block(model, psi, an)[an]
        scale = np.abs(Hfd).max()
        np.testing.assert_allclose(H, Hfd, rtol=0, atol=1e-6 * scale)
        np.testing.assert_array_equal(H, H.T)


@pytest.mark.skipif(_core is None, reason="compiled kernel not built")
@pytest.mark.parametrize("name,formula,kw", CASES, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("threads", [1, 2])
def test_phi_hessian_kernel_equals_oracle(name, formula, kw, threads):
    res, model = fitted(name, formula, kw)
    prep = model.prep
    rng = np.random.default_rng(7)
    prep.wrow = rng.uniform(0.5, 2.0, len(prep.wrow))     # weighted rows too
    k = Model(prep, model.table, backend="cython", nthreads=threads)
    o = Model(prep, model.table, backend="numpy")
    psi = interior(model, res)
    llk, gk, Hk = k.phi_hessian(psi)
    llo, go, Ho = o.phi_hessian(psi)
    assert llk == pytest.approx(llo, rel=1e-12)
    np.testing.assert_allclose(Hk, Ho, rtol=1e-10, atol=1e-10 * np.abs(Ho).max())


def test_hessian_uses_exact_block_and_differences_the_rest():
    """estimate.hessian = exact block for the Phi parameters + differenced
    columns for beta and Theta: one pass plus 2 evaluations per other parameter,
    and the same matrix as differencing every column."""
    res, model = fitted("unbalanced", "y ~ x1 + z + (1 | k:j)", UNST)
    psi = interior(model, res)
    n0 = model.nevals
    H = estimate.hessian(model, psi)
    nother = len(psi) - len(model.hess_params)
    assert model.nevals - n0 == 1 + 2 * nother
    Hfd = fd_block(model, psi, np.arange(len(psi)))
    Hfd = 0.5 * (Hfd + Hfd.T)
    np.testing.assert_allclose(H, Hfd, rtol=0, atol=1e-6 * np.abs(Hfd).max())


def test_no_exact_block_where_theta_is_not_diagonal():
    res = mlsem.fit(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)",
                    residuals={"correlation": "exchangeable"})
    assert len(res.model.hess_params) == 0
    assert res.model.phi_hessian(res.opt.final) is None
