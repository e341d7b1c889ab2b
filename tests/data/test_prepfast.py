"""prepare's NumPy path for integer ids (mlsem.data.prepfast) gives exactly what
the Polars path gives: every array and table of Prepared, on awkward inputs
(ids out of order, globally unique ids, one group per parent, nulls in the
outcome and covariates, several covariates, slopes, weights, a design callable,
three levels, unbalanced and unsorted rows)."""
import numpy as np
import polars as pl
import pytest

import mlsem
import mlsem.data.prepare as D
import mlsem.data.prepfast as PF
from mlsem.data.encode import load
from mlsem.spec.formula import effects_of, nest_levels, parse_formula
from mlsem.spec.relax import coefficient_design
from conftest import REF
from test_prepare_paths import _same


def _run(df, formula, weights=None, coefficients=None, index=None):
    F = parse_formula(formula)
    levels = nest_levels(F)
    d, F, _ = load(df, F, [c for c in (weights, index) if c])
    design = coefficient_design(coefficients, F, levels)
    return D.prepare(d, F.outcome, list(F.fixed), F.intercept, levels, effects_of(F),
                     weights=weights, design=design, index=index)


def _both(monkeypatch, df, formula, **kw):
    taken = []
    real = PF.prepare_fast

    def spy(*a, **k):
        out = real(*a, **k)
        taken.append(out is not None)
        return out
    with monkeypatch.context() as mp:
        mp.setattr(PF, "prepare_fast", spy)
        fast = _run(df, formula, **kw)
    assert taken == [True]                  # the NumPy path gave the result
    with monkeypatch.context() as mp:
        mp.setattr(PF, "applies", lambda *a, **k: False)
        slow = _run(df, formula, **kw)
    for f in fast.__dataclass_fields__:
        _same(getattr(fast, f), getattr(slow, f), f)
    return fast


def _sim(seed=3, counties=40):
    return mlsem.simulate(counties, (1, 6), (1, 8), seed=seed, x="normal")


def _shuffle(df, seed=1):
    return df[np.random.default_rng(seed).permutation(df.height)]


class _Patched:
    """The compiled passes with a hash that makes every pattern collide."""
    def __init__(self, k):
        self.k = k

    def __getattr__(self, name):
        return getattr(self.k, name)

    def unit_hash(self, slot, tstart, R):
        return np.zeros(len(tstart), np.uint64), self.k.unit_hash(slot, tstart, R)[1]


def test_passes_match_their_numpy_twins():
    from mlsem.data import _prep
    rng = np.random.default_rng(2)
    n = 5000
    ids = [np.sort(rng.integers(0, 50, n)), rng.integers(0, 4, n), rng.integers(-2, 2, n)]
    order = np.lexsort(ids[::-1])
    for arrs in ([v[order].copy() for v in ids], ids):      # in order, then not
        outs = []
        for K in (_prep, PF._NumpyPasses):
            lvl = np.full(n, 3, dtype=np.uint8)
            lvl[0] = 0
            uns = [K.level_pass(np.ascontiguousarray(v, dtype=np.int64), lvl, d, 3) for d, v in enumerate(arrs)]
            outs.append((lvl, uns, [K.rank_and_obs(lvl, d) for d in (1, 2, 3)], K.run_stats(lvl, 3)))
        a, b = outs
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]
        assert all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))
        assert all(np.array_equal(x, y) for x, y in zip(a[3], b[3]))
    cols = [np.ascontiguousarray(v, dtype=np.int64) for v in (ids[1], ids[2])]
    a = _prep.slot_codes(cols, [0, -2], [4, 4], 16)
    b = PF._NumpyPasses.slot_codes(cols, [0, -2], [4, 4], 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    slot = a[0]
    tstart = np.flatnonzero(np.r_[True, ids[0][1:] != ids[0][:-1]]).astype(np.int64)
    R = np.arange(1, 17, dtype=np.uint64) * np.uint64(2654435761)
    ha, ia = _prep.unit_hash(slot, tstart, R)
    hb, ib = PF._NumpyPasses.unit_hash(slot, tstart, R)
    assert np.array_equal(ha, hb) and ia == ib is False       # random slots do not increase
    cnt = np.diff(np.append(tstart, n))
    for rep in (np.arange(len(tstart)), np.zeros(len(tstart), dtype=np.int64)):
        assert _prep.same_slots(slot, tstart, cnt, rep) == PF._NumpyPasses.same_slots(slot, tstart, cnt, rep)


def test_sorted_simulated(monkeypatch, passes):
    _both(monkeypatch, _sim(), "y ~ x + (1 | k/j)")


def test_unsorted_rows_and_ids(monkeypatch, passes):
    df = _shuffle(_sim()).with_columns(k=pl.col("k") * 7 - 100, j=(pl.col("j") * 3).cast(pl.Int32))
    _both(monkeypatch, df, "y ~ x + (1 | k/j)")


def test_globally_unique_inner_ids(monkeypatch, passes):
    df = _shuffle(_sim()).with_columns(j=pl.col("k") * 1000 + pl.col("j") * 13)
    p = _both(monkeypatch, df, "y ~ x + (1 | k/j)")
    assert p.slot_labels["j"].max() < 1000          # ranks, not the ids


def test_one_group_per_parent(monkeypatch):
    df = _sim().with_columns(j=pl.col("k") * 0 + 5)
    _both(monkeypatch, df.filter(pl.col("j") == 5), "y ~ x + (1 | k/j)")
    df = _sim().with_columns(j=pl.col("k") + 10**9)     # one j per k, huge values
    _both(monkeypatch, _shuffle(df), "y ~ x + (1 | k/j)")


def test_nulls_in_outcome_and_covariates(monkeypatch, passes):
    rng = np.random.default_rng(5)
    df = _shuffle(_sim())
    n = df.height
    df = df.with_columns(x2=pl.Series(rng.normal(size=n)))
    ny = rng.random(n) < 0.1
    nx = rng.random(n) < 0.05
    df = df.with_columns(y=pl.when(pl.Series(ny)).then(None).otherwise(pl.col("y")),
                         x2=pl.when(pl.Series(nx)).then(None).otherwise(pl.col("x2")))
    p = _both(monkeypatch, df, "y ~ x + x2 + (1 | k/j)")
    assert p.dropped_covariate > 0 and p.missing_outcome > 0
    # a whole county without observations
    k0 = df["k"][0]
    _both(monkeypatch, df.with_columns(y=pl.when(pl.col("k") == k0).then(None).otherwise(pl.col("y"))),
          "y ~ x + (1 | k/j)")


def test_slopes_weights_factor_and_design(monkeypatch, passes):
    df = _shuffle(_sim()).with_columns(
        w=(pl.col("k") % 3 + 1).cast(pl.Float64), g=pl.when(pl.col("x") > 0).then(pl.lit("a")).otherwise(pl.lit("b")))
    _both(monkeypatch, df, "y ~ x + (1 + x | k) + (1 | k:j)")
    _both(monkeypatch, df, "y ~ x + g + (1 | k/j)", weights="w")
    _both(monkeypatch, df, "y ~ x + (1 | k/j)", coefficients={"x": "j"})
    _both(monkeypatch, df, "y ~ 0 + x + (1 | k)")


def test_three_levels_and_small_ints(monkeypatch, passes):
    rng = np.random.default_rng(9)
    n = 3000
    df = pl.DataFrame({"a": rng.integers(0, 30, n).astype(np.uint8), "b": rng.integers(0, 4, n).astype(np.int16),
                       "c": rng.integers(-3, 3, n), "x": rng.normal(size=n), "y": rng.normal(size=n)})
    _both(monkeypatch, df, "y ~ x + (1 | a/b/c)")
    _both(monkeypatch, df, "y ~ x + (1 | a) + (1 | a:b)")


@pytest.mark.parametrize("name,formula", [
    ("unbalanced.parquet", "y ~ x1 + z + (1 | k/j)"),
    ("egsingle.parquet", "math ~ year + (1 | schoolid/childid)"),
    ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)"),
    ("hetero_corr.parquet", "y ~ x + (1 + x | k) + (1 | k:j)"),
    ("medium.parquet", "y ~ x + (1 | k/j)")])
def test_reference_files(monkeypatch, name, formula):
    _both(monkeypatch, pl.read_parquet(REF / name), formula)


def test_other_inputs_take_the_polars_path():
    df = _sim()
    assert PF.applies(df, ["k", "j"], None, None, None, False)
    assert not PF.applies(df.with_columns(pl.col("j").cast(pl.String)), ["k", "j"], None, None, None, False)
    assert not PF.applies(df.with_columns(pl.col("j").cast(pl.Float64)), ["k", "j"], None, None, None, False)
    assert not PF.applies(df, ["k", "j"], "i", None, None, False)
    assert not PF.applies(df, ["k", "j"], None, ["value"], None, False)
    assert not PF.applies(df, ["k", "j"], None, None, None, True)


@pytest.fixture(params=["compiled", "numpy"])
def passes(request, monkeypatch):
    """Run a test with the compiled passes and again with their NumPy twins."""
    if request.param == "numpy":
        monkeypatch.setattr(PF, "_K", PF._NumpyPasses)
    else:
        from mlsem.data import _prep
        monkeypatch.setattr(PF, "_K", _prep)
    return request.param


def test_hash_collision_falls_back(monkeypatch, passes):
    df = _shuffle(_sim())
    slow = _run(df, "y ~ x + (1 | k/j)")
    # every pattern hashes alike: the exact check sees different slots and gives up
    monkeypatch.setattr(PF, "_K", _Patched(PF._K))
    calls = []
    rf = PF.prepare_fast
    monkeypatch.setattr(PF, "prepare_fast", lambda *a, **k: calls.append(rf(*a, **k)) or calls[-1])
    again = _run(df, "y ~ x + (1 | k/j)")
    assert calls == [None]
    for f in slow.__dataclass_fields__:
        _same(getattr(again, f), getattr(slow, f), f)


def test_lazy_meta_builds_on_first_use():
    import pickle
    from mlsem.data.layout import LazyMeta
    built = []
    m = LazyMeta({"frame": lambda: built.append(1) or "F"}, other=2)
    assert "frame" in m and len(m) == 2 and built == []
    assert m.get("missing") is None and m["other"] == 2 and built == []
    assert m.get("frame") == "F" and m["frame"] == "F" and built == [1]
    m2 = LazyMeta({"frame": lambda: built.append(2) or "G"})
    m2["frame"] = "mine"                        # an explicit value wins, nothing built
    assert dict(m2) == {"frame": "mine"} and built == [1]
    m3 = LazyMeta({"frame": lambda: "H"})
    assert pickle.loads(pickle.dumps(m3)) == {"frame": "H"}
    m4 = LazyMeta({"frame": lambda: "I"})
    m4.update(sout=1)
    assert sorted(m4) == ["frame", "sout"] and m4.pop("frame") == "I" and "frame" not in m4
    with pytest.raises(KeyError):
        m4["nothing"]


def test_prepared_frame_is_built_when_asked(monkeypatch):
    df = _shuffle(_sim())
    fast = _run(df, "y ~ x + (1 | k/j)")
    assert not dict.__contains__(fast.meta, "frame")         # not built by prepare
    frame = fast.meta["frame"]
    assert frame.height == fast.nobs and frame["__mlsem_row"].to_numpy().tolist() == fast.obs_row.tolist()


def test_fit_with_string_ids_matches_integer_ids():
    """String ids take the Polars path: the same model, the same fit."""
    df = _shuffle(_sim(counties=60))
    a = mlsem.fit(df, "y ~ x + (1 | k/j)")
    b = mlsem.fit(df.with_columns(pl.col("k").cast(pl.String), (pl.col("j") * 7).cast(pl.String)),
                  "y ~ x + (1 | k/j)")
    assert a.nslots == b.nslots and a.npatterns == b.npatterns
    assert abs(a.loglik - b.loglik) < 1e-8 * abs(a.loglik)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-5, atol=1e-7)


def test_huge_unsigned_ids_take_the_polars_path():
    df = _sim().with_columns((pl.col("k").cast(pl.UInt64) + 2**63).alias("k"))
    assert not PF.applies(df, ["k", "j"], None, None, None, False)
    assert PF.applies(df.with_columns(pl.col("k") - 2**63), ["k", "j"], None, None, None, False)


def test_rows_already_in_final_order(monkeypatch):
    """Balanced, sorted data: no row moves (the permutation is skipped)."""
    df = mlsem.simulate(30, (3, 3), (2, 2), seed=4, x="normal")
    _both(monkeypatch, df, "y ~ x + (1 | k/j)", coefficients={"x": "j"})
    _both(monkeypatch, df.with_columns(w=(pl.col("k") % 2 + 1).cast(pl.Float64)), "y ~ x + (1 | k/j)",
          weights="w")
