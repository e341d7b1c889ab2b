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


@pytest.mark.parametrize("seed,nout,index", [(0, 2, None), (1, 3, "i"), (3, 2, "i")])
def test_outcome_ols_from_the_units_equals_the_cells_pass(seed, nout, index):
    """mprep2: the least-squares cross products the data layer computes from the units'
    columns (prep.meta["zcross"]) give the same fit as the cells' own pass
    (_core.outcome_cross), which MultiModel takes without them."""
    df, fs = reviewer_data(seed, nout=nout)
    prep, tab = build(df, fs, index=index)
    assert "zcross" in prep.meta
    a = MultiModel(prep, tab, backend="cython")
    assert a._zcross is prep.meta["zcross"]
    zc = prep.meta.pop("zcross")
    b = MultiModel(prep, tab, backend="cython")
    assert getattr(b, "_zcross", None) is None
    np.testing.assert_allclose(zc, b._zcross_cells, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a._zsums, b._zsums, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a._zsq, b._zsq, rtol=1e-12, atol=1e-9)
    for (ca, ba, va, na), (cb, bb, vb, nb) in zip(a._ols_fit, b._ols_fit):
        assert na == nb and list(ca) == list(cb)
        np.testing.assert_allclose(ba, bb, rtol=1e-10, atol=1e-12)
        assert va == pytest.approx(vb, rel=1e-10)
    np.testing.assert_allclose(a.pscale, b.pscale, rtol=1e-10)
    # each cell's outcome (built on demand) and the rows per outcome
    np.testing.assert_array_equal(a._ocell, b._ocell)
    for ra, rb in zip(a._orows, b._orows):
        np.testing.assert_array_equal(ra, rb)


def test_block_design_written_on_first_read():
    """mprep2: the block design and the loadings of the compiled layout stay unwritten through
    MultiModel's construction and the grouping (they read the compact one), and is
    the reference's when read (also by the model's own reference, and after pickling)."""
    import pickle
    from mlsem.data.multivariate import load_multi, prepare_multi
    from mlsem.model.mreduced import reduce_multi
    from mlsem.spec.multivariate import parse_formulas
    df, fs = reviewer_data(2, nout=3)
    Fs, lv = parse_formulas(fs)
    frame, encs = load_multi(df, Fs, lv)
    ref = prepare_multi(frame, Fs, encs, lv, fast=False)
    for how in ("model", "prep", "pickle"):
        prep, tab = build(df, fs, index=None)
        assert prep.block_design_pending
        model = MultiModel(prep, tab, backend="cython")
        red, why = reduce_multi(model, max_share=1.0)
        assert red is not None, why
        assert prep.block_design_pending and prep.loadings_pending and model._unit_load
        if how == "model":
            np.testing.assert_array_equal(model._load, ref.load)
            X = model._X
        elif how == "prep":
            X = prep.X
        else:
            X = pickle.loads(pickle.dumps(prep)).X
        np.testing.assert_array_equal(X, ref.X)
        assert X.flags.c_contiguous and X.shape == (prep.nobs, len(prep.xnames))
        np.testing.assert_array_equal(prep.load, ref.load)
        assert not prep.loadings_pending
