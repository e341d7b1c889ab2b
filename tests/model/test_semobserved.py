"""The exact observed information of SEMs linear in their parameters
(mlsem.model.seminfo.observed_information): the kernel against the NumPy
oracle, both against central differences of the analytic gradient, and None
(the caller differences the gradient) where loadings are free."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.data.wide import prepare_wide
from mlsem.estimate.optimize import hessian
from mlsem.model import _core, seminfo
from mlsem.model.sem import SemModel
from mlsem.spec.lavaan import parse
from mlsem.spec.semtable import build_table
from test_sem_gradient import HS, _model, _point

LINEAR = {
    # fixed loadings, a correlated residual (dense path), a latent mean, a covariate
    "cfa_fixed": ("visual =~ 1*x1 + 1*x2 + 0.8*x3\ntextual =~ 1*x4 + 1.2*x5 + 1*x6\n"
                  "x1 ~~ x4\nvisual ~ 1\nx1 ~ 0*1\nx2 ~ x7", HS),
    "cfa_labels": ("visual =~ 1*x1 + 1*x2 + 1*x3\nx1 ~~ e*x1\nx2 ~~ e*x2\nx3 ~ b*x7\nx2 ~ b*x8", HS),
}


def _linear(name, backend="cython"):
    src, d = LINEAR[name]
    tab = build_table(parse(src), d.columns)
    Y = np.column_stack([d[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in tab.observed])
    X = (np.column_stack([d[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in tab.covariates])
         if tab.q else np.zeros((d.height, 0)))
    return SemModel(tab, prepare_wide(tab, Y, X), backend=backend)


@pytest.fixture(scope="module")
def unbalanced_model():
    spec = mlsem.multilevel("y ~ x1 + z + (1 | k/j)", mlsem.example_data("unbalanced"))
    return mlsem.sem(spec.to_syntax(), spec.to_wide()).model


def _models(unbalanced_model):
    return [_linear("cfa_fixed"), _linear("cfa_labels"), unbalanced_model]


def _fd_information(m, psi):
    """Minus the central differences of the analytic gradient, relative steps."""
    k = len(psi)
    H = np.zeros((k, k))
    for i in range(k):
        h = 1e-5 * max(abs(psi[i]), 0.1 * m.pscale[i])
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        H[:, i] = (m.evaluate(up)[1] - m.evaluate(dn)[1]) / (2 * h)
    return -0.5 * (H + H.T)


def test_kernel_matches_numpy_oracle(unbalanced_model):
    for m in _models(unbalanced_model):
        assert seminfo.linear_in_psi(m)
        psi = _point(m, seed=4)
        assert m.evaluate(psi)[0] is not None
        rng = np.random.default_rng(2)
        keep = m.prep.wrow.copy()
        m.prep.wrow = rng.uniform(0.5, 2.0, m.prep.nrows)        # weighted rows too
        try:
            a = seminfo.observed_information(m, psi)
            b = seminfo.observed_information_numpy(m, psi)
        finally:
            m.prep.wrow = keep
        assert a is not None and b is not None
        assert np.allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max())


def test_equals_central_differences_of_the_gradient(unbalanced_model):
    for m in _models(unbalanced_model):
        for psi in (_point(m, seed=7), m.start_values()):   # away from the optimum: the data terms count
            info = seminfo.observed_information(m, psi)
            num = _fd_information(m, psi)
            assert np.allclose(info, num, rtol=1e-6, atol=1e-6 * np.abs(num).max()), (info, num)
            # and it is not the expected information there
            exp = seminfo.expected_information(m, psi)
            assert not np.allclose(info, exp, rtol=1e-3, atol=1e-3 * np.abs(exp).max())


def test_not_available_where_loadings_are_free():
    m = _model("cfa")
    assert not seminfo.linear_in_psi(m)
    assert seminfo.observed_information(m, m.start_values()) is None
    assert seminfo.observed_information_numpy(m, m.start_values()) is None


def test_fit_information_is_the_exact_one(unbalanced_model):
    spec = mlsem.multilevel("y ~ x1 + z + (1 | k/j)", mlsem.example_data("unbalanced"))
    r = mlsem.sem(spec.to_syntax(), spec.to_wide())
    assert "exact Newton step(s)" in r.opt.message
    m = r.model
    exact = seminfo.observed_information(m, r.estimate)
    # the last Newton step's (REUSE_HESSIAN_STEP: computed within 1e-6 relative of the estimates)
    np.testing.assert_allclose(r.info, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_allclose(r.info, -hessian(m, r.estimate), rtol=1e-5)


def test_kernel_refuses_mismatched_rows(unbalanced_model):
    m = unbalanced_model
    d = m.prep
    Sigma, dS, cov, dM, mean = seminfo._derivatives(m, m.start_values())
    resid = np.zeros(d.nobs)
    Ic, Im, Icm = np.zeros((len(cov),) * 2), np.zeros((len(mean),) * 2), np.zeros((len(cov), len(mean)))
    with pytest.raises(ValueError, match="Icm"):
        _core.sem_observed_info(d.pat_ptr, d.row_ptr, m._slot, Sigma, dS, dM, resid, d.wrow, Ic, Im,
                                np.zeros((1, 1)))
    with pytest.raises(ValueError, match="resid"):
        _core.sem_observed_info(d.pat_ptr, d.row_ptr, m._slot, Sigma, dS, dM, resid[:3], d.wrow, Ic, Im, Icm)
    slot = m._slot.copy()
    r = int(np.flatnonzero(np.diff(d.pat_ptr) > 1)[0])       # a pattern of two rows or more
    o = int(d.row_ptr[d.pat_ptr[r] + 1])
    slot[o] = (slot[o] + 1) % m.P
    with pytest.raises(ValueError, match="share"):
        _core.sem_observed_info(d.pat_ptr, d.row_ptr, slot, Sigma, dS, dM, resid, d.wrow, Ic, Im, Icm)
