"""mprep (issue 15): prepare_multi's default layout (no design callable through prepare,
the block design column by column) equals the first implementation (``fast=False``) field
by field, on random data sets: missing cells, a covariate missing for one outcome's
formula, units with no outcome, string ids, ``index=``, three levels, a factor."""
import numpy as np
import polars as pl
import pytest

from mlsem.data.multivariate import load_multi, prepare_multi
from mlsem.spec.multivariate import parse_formulas


def _data(seed, nout, levels, string_ids, factor, miss):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(int(rng.integers(5, 15))):
        for j in range(int(rng.integers(1, 5))):
            for c in range(int(rng.integers(1, 4)) if levels == 3 else 1):
                for i in range(int(rng.integers(1, 8))):
                    x, z = rng.normal(), rng.normal()
                    ys = [float(rng.normal()) + 0.5 * x for _ in range(nout)]
                    ys = [None if rng.uniform() < miss else v for v in ys]
                    rows.append((k, j + 1, c + 1, i + 1, x, None if rng.uniform() < 0.1 else z,
                                 "abc"[int(rng.integers(3))], *ys))
    names = ["k", "j", "c", "i", "x", "z", "f"] + [f"y{o + 1}" for o in range(nout)]
    df = pl.DataFrame(rows, schema=names, orient="row")
    if seed % 2:   # the rows shuffled: ids not in order
        df = df.sample(fraction=1.0, shuffle=True, seed=seed)
    if string_ids:
        df = df.with_columns(pl.format("k{}", "k").alias("k"), pl.format("s{}", "j").alias("j"))
    g = {1: "(1 | k)", 2: "(1 | k/j)", 3: "(1 | k/j/c)"}[levels]
    fs = [f"y1 ~ x + {g}", f"y2 ~ x + z + {g}"] + [
        f"y{o + 1} ~ {'f' if factor else '1'} + {g}" for o in range(2, nout)]
    return df, fs


def _same(a, b, what):
    if isinstance(a, pl.DataFrame):
        assert a.equals(b), what
    elif isinstance(a, pl.Series):
        assert a.equals(b), what
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        np.testing.assert_array_equal(a, b, err_msg=what)
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _same(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (list, tuple)) and a and isinstance(a[0], np.ndarray):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{what}[{i}]")
    elif callable(a):
        _same(a(), b(), what)
    else:
        assert a == b, what


CASES = [(seed, nout, levels, s, f, index, miss)
         for seed, (nout, levels, s, f, index, miss) in enumerate([
             (2, 2, False, False, None, 0.0), (2, 2, False, False, None, 0.2),
             (3, 2, False, True, None, 0.3), (2, 1, False, False, None, 0.2),
             (3, 3, False, False, None, 0.2), (2, 2, True, False, None, 0.2),
             (2, 2, False, False, "i", 0.2), (3, 3, True, True, "i", 0.25),
             (2, 2, False, False, None, 0.6), (4, 2, False, True, None, 0.1),
             (2, 3, False, False, "i", 0.0), (3, 1, True, False, None, 0.4)])]


@pytest.mark.parametrize("seed,nout,levels,string_ids,factor,index,miss", CASES)
def test_fast_layout_equals_reference(seed, nout, levels, string_ids, factor, index, miss):
    df, fs = _data(seed, nout, levels, string_ids, factor, miss)
    Fs, lv = parse_formulas(fs)
    frame, encs = load_multi(df, Fs, lv, index=index)
    new = prepare_multi(frame, Fs, encs, lv, index=index)
    old = prepare_multi(frame, Fs, encs, lv, index=index, fast=False)
    assert new.nobs > 0 and new.nobs == old.nobs
    for name in old.__dataclass_fields__:
        if name == "meta":
            continue
        _same(getattr(new, name), getattr(old, name), name)
    assert X_contiguous(new.X)
    keys = set(old.meta) | set(new.meta)
    for k in keys:
        _same_meta(new.meta[k], old.meta[k], k)


def _same_meta(a, b, k):
    if k == "zcross":      # sums of products: the same terms, summed by BLAS in either order
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9, err_msg=k)
    else:
        _same(a, b, f"meta[{k}]")


def X_contiguous(X):
    return X.flags.c_contiguous and X.dtype == np.float64


@pytest.mark.parametrize("seed,dtype,levels,index,miss", [
    (20, pl.Int32, 2, None, 0.3), (21, pl.UInt16, 3, "i", 0.2), (22, pl.Int64, 1, None, 0.5),
    (23, pl.Int16, 2, "i", 0.0), (24, pl.UInt32, 2, None, 0.7)])
def test_compiled_cells_equal_reference(monkeypatch, seed, dtype, levels, index, miss):
    """mprep2: with integer ids (of any width) the cells are laid out from the units by the
    compiled passes (data.multivariate._cells_compiled, checked to be taken), equal to the
    reference field by field: shuffled rows, a county whose pupils all lack every outcome,
    an index, one and three levels."""
    import mlsem.data.multivariate as mv
    df, fs = _data(seed, 3, levels, False, seed % 2 == 0, miss)
    # every pupil of the first county without any outcome (dropped units, a dropped county)
    k0 = df["k"].min()
    df = df.with_columns([pl.when(pl.col("k") == k0).then(None).otherwise(pl.col(c)).alias(c)
                          for c in ("y1", "y2", "y3")])
    df = df.with_columns([pl.col(c).cast(dtype) for c in ("k", "j", "c", "i")])
    Fs, lv = parse_formulas(fs)
    frame, encs = load_multi(df, Fs, lv, index=index)
    taken = []
    orig = mv._cells_compiled

    def spy(*a, **k):
        got = orig(*a, **k)
        taken.append(got is not None)
        return got
    monkeypatch.setattr(mv, "_cells_compiled", spy)
    new = prepare_multi(frame, Fs, encs, lv, index=index)
    assert taken == [True]
    old = prepare_multi(frame, Fs, encs, lv, index=index, fast=False)
    assert new.meta["dropped_units"] > 0
    for name in old.__dataclass_fields__:
        if name != "meta":
            _same(getattr(new, name), getattr(old, name), name)
    for k in set(old.meta) | set(new.meta):
        _same_meta(new.meta[k], old.meta[k], k)
