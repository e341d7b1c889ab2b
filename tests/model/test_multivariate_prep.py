"""mfast2 (issue 15): the several-outcome model's inputs built faster must equal the slow
constructions: the compact design of data.multivariate.prepare_multi against the sum of
the block design's columns, the per-outcome least squares against lstsq on the outcome's
cells, and psi_to_tau on a covariance block indefinite beyond its jitter."""
import numpy as np
import pytest

from mlsem.model.multilevel import _core
from mlsem.model.multivariate import MultiModel

from test_mreduced import build, reviewer_data  # noqa: E402 (tests/model is on sys.path)

pytestmark = pytest.mark.skipif(_core is None, reason="compiled kernel not built")


@pytest.mark.parametrize("seed,nout,index", [(0, 2, "i"), (1, 3, "i"), (2, 3, None), (5, 2, None)])
def test_compact_design_equals_block_columns(seed, nout, index):
    """prepare_multi's compact design (prep.meta["Xc"]: column a of a cell = its outcome's
    a-th column) is the sum over the outcomes of the block design's columns (the
    construction MultiModel used), with missing cells, dropped units, an index, one
    outcome with a covariate the other lacks."""
    df, fs = reviewer_data(seed, nout=nout)
    prep, tab = build(df, fs, index=index)
    Xc = prep.meta["Xc"]
    cols = [np.asarray(c) for c in tab.beta_cols]
    ref = np.zeros((prep.nobs, max(len(c) for c in cols)))
    for c in cols:
        for a, col in enumerate(c):
            ref[:, a] += prep.X[:, col]
    np.testing.assert_array_equal(Xc, ref)
    # every cell's block row is zero outside its outcome's columns
    model = MultiModel(prep, tab, backend="cython")
    for o, c in enumerate(cols):
        rows = np.flatnonzero(model._ocell == o)
        others = np.setdiff1d(np.arange(prep.X.shape[1]), c)
        assert not np.any(prep.X[np.ix_(rows, others)])
    assert model._Xc is Xc or np.array_equal(model._Xc, Xc)


@pytest.mark.parametrize("seed", [0, 1])
def test_outcome_ols_equals_lstsq(seed):
    df, fs = reviewer_data(seed, nout=3)
    prep, tab = build(df, fs)
    model = MultiModel(prep, tab, backend="cython")
    for o, (rows, cols, b, v) in enumerate(model._ols_out):
        X = prep.X[np.ix_(rows, cols)]
        y = prep.y[rows]
        ref, *_ = np.linalg.lstsq(X, y, rcond=None)
        np.testing.assert_allclose(b, ref, rtol=1e-10, atol=1e-12)
        r = y - X @ ref
        assert v == pytest.approx(float(r @ r) / len(rows), rel=1e-10)
        # the centring sums: count, column sums, sum of y
        assert model._zsums[o, 0] == len(rows)
        np.testing.assert_allclose(model._zsums[o, 1:1 + len(cols)], X.sum(axis=0), rtol=1e-12)
        assert model._zsums[o, -1] == pytest.approx(y.sum(), rel=1e-12)


def test_psi_to_tau_of_an_indefinite_block():
    """A covariance block indefinite beyond the 1e-8 jitter (a Newton polish step can
    leave one) gets the factor of its positive semi-definite pivots instead of raising
    (a fuzz case crashed in optimize._judge)."""
    df, fs = reviewer_data(0, nout=2)
    prep, tab = build(df, fs)
    model = MultiModel(prep, tab, backend="cython")
    psi = model.start_values()
    blk = model._chol[0]
    P = blk.pidx
    d = model._scale()
    sq = np.sqrt(d[np.diag(P)])
    S = np.array([[1.0, 1.001], [1.001, 1.0]])       # correlation 1.001
    psi[P] = S * np.outer(sq, sq)
    tau = model.psi_to_tau(psi)
    assert np.all(np.isfinite(tau))
