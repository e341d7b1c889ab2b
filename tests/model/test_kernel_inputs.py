"""Issue 13 item 6: the kernels check what they index without bounds checks.

factor_loglik and dense_loglik check the lengths of their output and scratch
arrays and the slot / latent indices of the layout (ValueError naming the
array), a thread whose scratch allocation fails raises MemoryError (not the
status of a non-positive-definite Sigma), and xt_w reports a status."""
import numpy as np
import pytest

from mlsem.model.multilevel import Model, _core
from test_kernel import build, random_data, random_psi

pytestmark = pytest.mark.skipif(_core is None, reason="compiled kernel not built")


@pytest.fixture(scope="module")
def setup():
    prep, tab = build(random_data(4, 12, 3, 4), "y ~ x + (1 | k/j)")
    m = Model(prep, tab, backend="cython", nthreads=1)
    psi = random_psi(m, np.random.default_rng(0))
    beta, Phi, Theta = m.matrices(psi)
    F = m.factor(Phi)
    return m, prep, F, Theta, Phi


def factor_args(m, prep, F, Theta, **over):
    M, P = m.M, m.P
    a = dict(pat_ptr=prep.pat_ptr, row_ptr=prep.row_ptr, slot=m._slot,
             resid=np.random.default_rng(1).normal(size=prep.nobs), load=m._load,
             slot_lat=m._slot_lat, F=F, blk_start=m.blk_start, blk_end=m.blk_end, theta=Theta,
             wrow=prep.wrow, w_out=np.zeros(prep.nobs), ll_t=np.zeros(1),
             gphi_t=np.zeros((1, M * M)), gth_t=np.zeros((1, P)),
             status_t=np.zeros(1, dtype=np.int32), maxn=m._maxn, maxm=m._maxm, maxc=m._maxc,
             nthreads=1, need_grad=1)
    a.update(over)
    return a


def call_factor(a):
    keys = ["pat_ptr", "row_ptr", "slot", "resid", "load", "slot_lat", "F", "blk_start",
            "blk_end", "theta", "wrow", "w_out", "ll_t", "gphi_t", "gth_t", "status_t", "maxn",
            "maxm", "maxc", "nthreads", "need_grad"]
    return _core.factor_loglik(*[a[k] for k in keys])


def test_factor_valid_call_still_works(setup):
    m, prep, F, Theta, _ = setup
    a = factor_args(m, prep, F, Theta)
    call_factor(a)
    assert a["status_t"][0] == 0 and np.isfinite(a["ll_t"][0])


@pytest.mark.parametrize("what,value,message", [
    ("w_out", lambda m, p: np.zeros(p.nobs - 1), "w_out"),
    ("gth_t", lambda m, p: np.zeros((1, m.P - 1)), "gth_t"),
    ("gphi_t", lambda m, p: np.zeros((1, m.M)), "gphi_t"),
    ("ll_t", lambda m, p: np.zeros(0), "ll_t"),
    ("maxn", lambda m, p: m._maxn - 1, "maxn"),
    ("maxm", lambda m, p: 1, "maxm"),
])
def test_factor_rejects_short_arrays(setup, what, value, message):
    m, prep, F, Theta, _ = setup
    a = factor_args(m, prep, F, Theta, **{what: value(m, prep)})
    with pytest.raises(ValueError, match=message):
        call_factor(a)


def test_factor_rejects_bad_slot_and_latent_indices(setup):
    m, prep, F, Theta, _ = setup
    slot = m._slot.copy()
    slot[3] = m.P            # one past the last slot
    with pytest.raises(ValueError, match=r"slot\[3\]"):
        call_factor(factor_args(m, prep, F, Theta, slot=slot))
    slot_lat = m._slot_lat.copy()
    slot_lat[0, 0] = m.M     # one past the last latent
    with pytest.raises(ValueError, match=r"slot_lat\[0, 0\]"):
        call_factor(factor_args(m, prep, F, Theta, slot_lat=slot_lat))
    row_ptr = prep.row_ptr.copy()
    row_ptr[-1] = prep.nobs + 5
    with pytest.raises(ValueError, match="row_ptr"):
        call_factor(factor_args(m, prep, F, Theta, row_ptr=row_ptr))


def test_factor_allocation_failure_is_reported_as_such(setup):
    """maxm = 2^22 asks each thread for ~2^47 bytes of scratch: MemoryError,
    not the status a non-positive-definite Sigma gets."""
    m, prep, F, Theta, _ = setup
    a = factor_args(m, prep, F, Theta, maxm=1 << 22)
    with pytest.raises(MemoryError, match="scratch"):
        call_factor(a)
    assert a["status_t"][0] == _core.ALLOC_FAILED


def dense_args(m, prep, Phi, Theta, **over):
    M, P = m.M, m.P
    a = dict(pat_ptr=prep.pat_ptr, row_ptr=prep.row_ptr, slot=m._slot,
             resid=np.random.default_rng(2).normal(size=prep.nobs), load=m._load,
             slot_lat=m._slot_lat, Phi=np.ascontiguousarray(Phi), Theta=np.diag(Theta),
             wrow=prep.wrow, w_out=np.zeros(prep.nobs), ll_t=np.zeros(1),
             gphi_t=np.zeros((1, M * M)), gth_t=np.zeros((1, P * P)),
             status_t=np.zeros(1, dtype=np.int32), maxn=m._maxn, nthreads=1, need_grad=1)
    a.update(over)
    return a


def call_dense(a):
    keys = ["pat_ptr", "row_ptr", "slot", "resid", "load", "slot_lat", "Phi", "Theta", "wrow",
            "w_out", "ll_t", "gphi_t", "gth_t", "status_t", "maxn", "nthreads", "need_grad"]
    return _core.dense_loglik(*[a[k] for k in keys])


def test_dense_checks(setup):
    m, prep, F, Theta, Phi = setup
    a = dense_args(m, prep, Phi, Theta)
    call_dense(a)
    assert a["status_t"][0] == 0 and np.isfinite(a["ll_t"][0])
    # dl/dTheta is P x P on the dense path: a factor-path sized output is refused
    with pytest.raises(ValueError, match="gth_t"):
        call_dense(dense_args(m, prep, Phi, Theta, gth_t=np.zeros((1, m.P))))
    slot = m._slot.copy()
    slot[0] = -1
    with pytest.raises(ValueError, match=r"slot\[0\]"):
        call_dense(dense_args(m, prep, Phi, Theta, slot=slot))
    with pytest.raises(ValueError, match="maxn"):
        call_dense(dense_args(m, prep, Phi, Theta, maxn=m._maxn - 1))
    b = dense_args(m, prep, Phi, Theta, maxn=1 << 23)   # 3 * 2^46 doubles of scratch
    with pytest.raises(MemoryError, match="scratch"):
        call_dense(b)
    assert b["status_t"][0] == _core.ALLOC_FAILED


def test_xt_w_status_and_lengths():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(101, 3))
    w = rng.normal(size=101)
    out = np.zeros((4, 3))
    status = np.full(4, 7, dtype=np.int32)
    _core.xt_w(X, w, out, 1, status)
    assert np.all(status == 0)
    np.testing.assert_allclose(out.sum(axis=0), X.T @ w, rtol=1e-12)
    with pytest.raises(ValueError, match="w has"):
        _core.xt_w(X, w[:-1], out, 1, status)
    with pytest.raises(ValueError, match="status"):
        _core.xt_w(X, w, out, 1, np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="out_t"):
        _core.xt_w(X, w, np.zeros((4, 2)), 1, status)


def test_model_checks_layout_once(setup):
    m, *_ = setup
    fresh = Model(m.prep, m.table, backend="cython", nthreads=1)
    assert not fresh._layout_ok
    psi = random_psi(fresh, np.random.default_rng(3))
    ll, g = fresh.evaluate(psi)
    assert ll is not None and fresh._layout_ok
