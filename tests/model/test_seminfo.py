"""The expected FIML information of a general SEM (mlsem.model.seminfo): the
kernel against the NumPy oracle, and both against minus the Hessian of the
expected log-likelihood (central differences of its closed form)."""
import numpy as np
import pytest

from mlsem.model import seminfo
from test_sem_gradient import MODELS, _model, _point


@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_matches_numpy_oracle(name):
    m = _model(name)
    psi = _point(m, seed=3)
    assert m.evaluate(psi)[0] is not None
    rng = np.random.default_rng(1)
    m.prep.wrow = rng.uniform(0.5, 2.0, m.prep.nrows)      # weighted rows too
    a = seminfo.expected_information(m, psi)
    b = seminfo.expected_information_numpy(m, psi)
    assert a is not None and b is not None
    assert np.allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max())
    assert np.all(np.linalg.eigvalsh(a) > 0)


def _expected_loglik(m, psi, psi0):
    """E_{psi0} l(psi): sum over rows of -1/2 [log|Sigma_O| + tr(Sigma_O^-1 (Sigma0_O + d d'))]."""
    S0, MU0 = m.implied(psi0)[3], m.implied(psi0)[5]
    S, MU = m.implied(psi)[3], m.implied(psi)[5]
    d = m.prep
    out = 0.0
    for p in range(len(d.pat_ptr) - 1):
        r0, r1 = d.pat_ptr[p], d.pat_ptr[p + 1]
        o = d.slot[d.row_ptr[r0]:d.row_ptr[r0 + 1]]
        So = S[np.ix_(o, o)]
        Si = np.linalg.inv(So)
        ld = np.linalg.slogdet(So)[1]
        D = MU0[r0:r1][:, o] - MU[r0:r1][:, o]
        w = d.wrow[r0:r1]
        quad = np.einsum("ra,ab,rb->r", D, Si, D)
        out += -0.5 * float(w @ (ld + np.trace(Si @ S0[np.ix_(o, o)]) + quad))
    return out


@pytest.mark.parametrize("name", ["latent_mean", "iv"])
def test_equals_minus_hessian_of_expected_loglik(name):
    m = _model(name)
    psi0 = _point(m, seed=5)
    k = len(psi0)
    H = np.zeros((k, k))
    h = 1e-3 * np.maximum(np.abs(psi0), 0.1)
    for i in range(k):
        for j in range(k):
            def f(si, sj):
                p = psi0.copy()
                p[i] += si * h[i]
                p[j] += sj * h[j]
                return _expected_loglik(m, p, psi0)
            H[i, j] = (f(1, 1) - f(1, -1) - f(-1, 1) + f(-1, -1)) / (4 * h[i] * h[j])
    info = seminfo.expected_information(m, psi0)
    assert np.allclose(info, -H, rtol=1e-4, atol=1e-5 * np.abs(H).max()), (info, -H)


def test_linear_model_caches_constant_derivatives():
    """Without free loadings or regressions among latents, dSigma and the mean
    derivatives are computed once; the information still moves with psi."""
    from mlsem.api.bridge import multilevel
    import mlsem
    d = mlsem.example_data("unbalanced")
    spec = multilevel("y ~ x1 + z + (1 | k/j)", d)
    res = mlsem.sem(spec.to_syntax(), spec.to_wide())
    m = res.model
    assert not m._lam_free and getattr(m, "_seminfo_derivs", None) is not None
    a = seminfo.expected_information(m, res.estimate)
    m._lam_free = True                       # the generic path: differences at psi
    try:
        b = seminfo.expected_information(m, res.estimate)
    finally:
        m._lam_free = False
    assert np.allclose(a, b, rtol=1e-8)
    c = seminfo.expected_information(m, res.estimate * 1.3)
    assert not np.allclose(a, c, rtol=1e-3)


def test_kernel_refuses_bad_shapes():
    from mlsem.model import _core
    m = _model("cfa")
    psi = m.start_values()
    Sigma = np.ascontiguousarray(m.implied(psi)[3])
    d = m.prep
    with pytest.raises(ValueError, match="Ic must be"):
        _core.sem_expected_info(d.pat_ptr, d.row_ptr, m._slot, Sigma, np.zeros((2, m.P, m.P)),
                                np.zeros((0, d.nrows, m.P)), d.wrow, np.zeros((3, 3)), np.zeros((0, 0)))
    bad = np.ascontiguousarray(-np.eye(m.P))
    assert _core.sem_expected_info(d.pat_ptr, d.row_ptr, m._slot, bad, np.zeros((1, m.P, m.P)),
                                   np.zeros((0, d.nrows, m.P)), d.wrow, np.zeros((1, 1)),
                                   np.zeros((0, 0))) == 1
