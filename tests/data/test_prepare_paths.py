"""prepare's O(n) paths for integer ids (distinct slot keys and the number of
distinct id tuples by flag arrays over mixed-radix codes) give exactly what the
Polars hash-based path gives: every array and table of Prepared."""
import numpy as np
import polars as pl
import pytest

import mlsem.data.prepare as D
from mlsem.spec.formula import nest_levels, parse_formula
from conftest import REF

CASES = [("unbalanced.parquet", "y ~ x1 + z + (1 | k/j)", None),
         ("unbalanced.parquet", "y ~ x1 + z + (1 | k/j)", "i"),
         ("egsingle.parquet", "math ~ year + (1 | schoolid/childid)", None),
         ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)", None),
         ("hetero_corr.parquet", "y ~ x + (1 + x | k) + (1 | k:j)", None)]


def _same(a, b, where):
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, pl.DataFrame):
        assert a.schema == b.schema and a.equals(b), where
    elif isinstance(a, pl.Series):
        assert a.dtype == b.dtype and a.equals(b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b or repr(a) == repr(b), where


def _prep(name, formula, index):
    F = parse_formula(formula)
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    df = D.collect_columns(REF / name, F.columns + ([index] if index else []),
                           [F.outcome] + list(F.fixed), [lv[-1] for lv in levels])
    return D.prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index)


@pytest.mark.parametrize("name,formula,index", CASES)
def test_radix_path_equals_hash_path(monkeypatch, name, formula, index):
    import mlsem.data.prepfast as PF
    monkeypatch.setattr(PF, "applies", lambda *a, **k: False)   # the Polars path (tests/data/test_prepfast.py: the NumPy one)
    calls = []
    real = D._radix_key

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(D, "_radix_key", spy)
    fast = _prep(name, formula, index)
    assert any(calls)                       # the integer path was taken
    monkeypatch.setattr(D, "_radix_key", lambda *a, **k: None)
    slow = _prep(name, formula, index)
    for f in fast.__dataclass_fields__:
        _same(getattr(fast, f), getattr(slow, f), f)


def test_radix_key_refuses_what_it_cannot_code():
    df = pl.DataFrame({"a": [1, 2, None], "b": ["x", "y", "z"], "c": [0, 10**9, 5]})
    assert D._radix_key(df, ["a"], 100) is None          # a null
    assert D._radix_key(df, ["b"], 100) is None          # not integer
    assert D._radix_key(df, ["c"], 100) is None          # range beyond the limit
    key, radices, offsets = D._radix_key(pl.DataFrame({"p": [3, 1, 3], "q": [2, 0, 1]}),
                                         ["p", "q"], 100)
    assert radices == [3, 3] and offsets == [1, 0]
    assert key.tolist() == [2 * 3 + 2, 0, 2 * 3 + 1]
    assert D._n_unique(pl.DataFrame({"p": [3, 1, 3, 3], "q": [2, 0, 2, 1]}), ["p", "q"]) == 3
