"""Data layer: ``prepare`` for integer ids in linear passes over NumPy arrays.

The same CSR layout as mlsem.data.prepare.prepare's Polars path (slot numbering,
pattern order, row order, obs_row, the slot table, the meta frame, the level
counts), built with at most one stable sort of the rows by their ids (none when
the ids are already in order, as files written sorted by their ids are) and a
few vectorised passes:

- in id order a group of any level is a run of rows: its labels (the id, its
  dense rank within the parent, or 1) and the observation number within the
  innermost group come from the run starts;
- the slot labels are monotone in the ids within a top-level unit, so a unit's
  observations are already in slot order: the final order (units by pattern,
  then by id) is a permutation of whole runs, no second sort;
- a unit's missing pattern (its set of slots) is found by a 64-bit hash of the
  set, then checked slot by slot against the first unit of the same hash
  (exact: a collision returns None and the caller takes the Polars path).

It applies to integer id columns without nulls, no ``index=`` and no Dask
share options (see :func:`applies`); anything else takes the Polars path.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl

from ..errors import MlsemError
from .layout import LazyMeta, LevelInfo, Prepared, label_mode, latents

_ROW = "__mlsem_row"
_RNG_SEED = 0x6D6C73656D
_MIX = 0x9E3779B97F4A7C15


_IDX = []


def _index_dtype():
    """The dtype of Polars' row index (UInt32, UInt64 in a 64-bit-index build)."""
    if not _IDX:
        _IDX.append(pl.DataFrame({"a": [0]}).with_row_index(_ROW).schema[_ROW])
    return _IDX[0]


def applies(df: pl.DataFrame, level_cols: list, index, label_modes, slots, keys_only) -> bool:
    if index is not None or label_modes is not None or slots is not None or keys_only:
        return False
    if df.height == 0 or len(set(level_cols)) != len(level_cols):
        return False
    for c in level_cols:
        s = df[c]
        if not s.dtype.is_integer() or s.null_count():
            return False
        if s.dtype == pl.UInt64 and s.max() >= 2**63:
            return False
    return True


class _NumpyPasses:
    """The NumPy twins of mlsem.data._prep's passes (same arguments, same arrays)."""

    @staticmethod
    def level_pass(v, lvl, d, L):
        m = (lvl[1:] == L) & (v[1:] != v[:-1])
        unsorted = bool(np.any(m & (v[1:] < v[:-1])))
        lvl[1:][m] = d
        return int(unsorted)

    @staticmethod
    def rank_and_obs(lvl, d):
        cs = np.cumsum(lvl == d, dtype=np.int64)
        return cs - np.maximum.accumulate(np.where(lvl < d, cs, 0)) + 1

    @staticmethod
    def run_stats(lvl, L):
        n = len(lvl)
        out = np.zeros((3, L), dtype=np.int64)
        for d in range(L):
            sizes = np.diff(np.append(np.flatnonzero(lvl <= d), n))
            out[:, d] = len(sizes), sizes.min(), sizes.max()
        return out[0], out[1], out[2]

    @staticmethod
    def slot_codes(cols, offsets, radices, size):
        key = np.zeros(len(cols[0]), dtype=np.int64)
        for v, lo, r in zip(cols, offsets, radices):
            key = key * r + (v - lo)
        seen = np.zeros(size, dtype=bool)
        seen[key] = True
        lookup = np.cumsum(seen, dtype=np.int64) - 1
        codes = lookup[key].astype(np.int32)
        P = int(lookup[-1] + 1)
        first = np.empty(P, dtype=np.int64)
        first[codes[::-1]] = np.arange(len(key) - 1, -1, -1, dtype=np.int64)
        return codes, P, first

    @staticmethod
    def n_distinct(v, lo, r):
        seen = np.zeros(r, dtype=bool)
        seen[v - lo] = True
        return int(np.count_nonzero(seen))

    @staticmethod
    def unit_perm(tstart, row_order, counts):
        starts = np.zeros(len(counts), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        return np.repeat(tstart[row_order] - starts, counts) + np.arange(int(counts.sum()), dtype=np.int64)

    @staticmethod
    def gather_into(v, perm, out, col):
        out[:, col] = v[perm]

    @staticmethod
    def unit_hash(slot, tstart, R):
        n = len(slot)
        cnt = np.diff(np.append(tstart, n))
        h = np.add.reduceat(R[slot], tstart)
        h ^= cnt.astype(np.uint64) * np.uint64(_MIX)
        within = np.ones(n, dtype=bool)
        within[tstart] = False
        return h, not bool(np.any(within[1:] & (slot[1:] <= slot[:-1])))

    @staticmethod
    def same_slots(slot, tstart, cnt, rep_row):
        if np.any(cnt != cnt[rep_row]):
            return False
        off = np.arange(len(slot), dtype=np.int64) - np.repeat(tstart, cnt)
        return bool(np.all(slot == slot[np.repeat(tstart[rep_row], cnt) + off]))


try:
    from . import _prep as _K
except ImportError:     # pragma: no cover - not built: the NumPy twins (a few times slower)
    _K = _NumpyPasses


def _dense(v: np.ndarray):
    """(codes, number of distinct values): codes 0.. in the order of the values."""
    u, inv = np.unique(v, return_inverse=True)
    return inv.reshape(-1).astype(np.int64, copy=False), int(u.shape[0])


def _n_distinct(v: np.ndarray) -> int:
    lo, hi = int(v.min()), int(v.max())
    r = hi - lo + 1
    if r <= 4 * len(v) + 1024:
        return int(_K.n_distinct(v, lo, r))
    return int(np.unique(v).shape[0])


def _slot_codes(cols: list):
    """(slot of each row int32, number of slots, first row of each slot): the
    distinct tuples of ``cols`` numbered in lexicographic order."""
    m = len(cols[0])
    los = [int(v.min()) for v in cols]
    radices = [int(v.max()) - lo + 1 for v, lo in zip(cols, los)]
    size = 1
    for r in radices:
        size *= r
    if size <= 4 * m + 1024:
        return (_K if len(cols) <= 8 else _NumpyPasses).slot_codes(cols, los, radices, size)
    code, size = _dense(cols[0])
    for v in cols[1:]:      # wide ranges: pairwise dense codes (no overflow)
        c2, n2 = _dense(v)
        code, size = _dense(code * n2 + c2)
    first = np.empty(size, dtype=np.int64)
    first[code[::-1]] = np.arange(m - 1, -1, -1, dtype=np.int64)
    return code.astype(np.int32), size, first


def _levels(ids: list):
    """(lvl, in order): per row the outermost level whose id differs from the
    previous row's (0 for the first row, L if none), and whether the rows are in
    lexicographic order of the ids."""
    L = len(ids)
    lvl = np.full(len(ids[0]), L, dtype=np.uint8)
    lvl[0] = 0
    unsorted = 0
    for d, v in enumerate(ids):
        unsorted |= _K.level_pass(v, lvl, d, L)
    return lvl, not unsorted


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def prepare_fast(df, outcome, covariates, intercept, levels, effects, weights, design, used_x):
    """The Prepared of mlsem.data.prepare.prepare, or None (hash collision of two
    missing patterns: the caller takes the Polars path)."""
    level_cols = [lv[-1] for lv in levels]
    top = level_cols[0]
    schema = df.schema
    L = len(level_cols)
    n = df.height
    ids = [_i64(df[c].to_numpy()) for c in level_cols]
    # one stable sort by the ids, unless they are in order already
    lvl, in_order = _levels(ids)
    order = None
    if not in_order:
        order = _i64(df.select(level_cols).with_row_index("__i").sort(
            level_cols, maintain_order=True)["__i"].to_numpy())
        ids = [v[order] for v in ids]
        lvl, _ = _levels(ids)
    # labels below the top (on every row, as the Polars path: before dropping nulls)
    ng = [int(np.count_nonzero(lvl <= d)) for d in range(L)]    # groups per level: rows with lvl <= d
    labs, lab_dtypes, is_value = [], [], []
    for d in range(1, L):
        mode = label_mode(_n_distinct(ids[d]), int(ng[d]), int(ng[d - 1]))
        if mode == "rank":
            labs.append(_K.rank_and_obs(lvl, d))
            lab_dtypes.append(pl.Int64)
        elif mode == "one":
            labs.append(np.ones(n, dtype=np.int64))
            lab_dtypes.append(pl.Int64)
        else:
            labs.append(ids[d])
            lab_dtypes.append(schema[level_cols[d]])
        is_value.append(mode == "value")
    obs = _K.rank_and_obs(lvl, L)      # the row's number within its innermost group
    # drop null covariates (counted) and null outcomes (missing cells)
    bad_x = None
    for c in used_x:
        if df[c].null_count():
            mk = df[c].is_null().to_numpy()
            bad_x = mk if bad_x is None else (bad_x | mk)
    dropped = 0 if bad_x is None else int(np.count_nonzero(bad_x))
    bad = bad_x
    n_missing_y = 0
    if df[outcome].null_count():
        my = df[outcome].is_null().to_numpy()
        n_missing_y = int(np.count_nonzero(my if bad_x is None else my & ~bad_x))
        bad = my if bad is None else (bad | my)
    src = order          # original row of each row in id order (None: the same)
    if bad is not None:
        keep = ~(bad if order is None else bad[order])
        if not keep.any():
            raise MlsemError(f"data: no observation has both {outcome!r} and the covariates observed")
        src = np.flatnonzero(keep) if order is None else order[keep]
        ids = [v[keep] for v in ids]
        labs = [v[keep] for v in labs]
        obs = obs[keep]
        lvl, _ = _levels(ids)
    m = len(obs)
    # slots: the distinct (labels, obs) tuples in lexicographic order
    slot, P, rep = _slot_codes(labs + [obs])
    lab_cols = [f"__lab{d}" for d in range(1, L)]
    slots = pl.DataFrame([pl.Series(nm, v[rep]).cast(dt) for nm, v, dt in zip(lab_cols, labs, lab_dtypes)]
                         + [pl.Series("__obs", obs[rep])]).with_row_index("__slot")
    del obs
    # top-level units (rows of the CSR layout) in id order; a unit's slots increase
    # (labels are monotone in the ids within the parent)
    tstart = np.flatnonzero(lvl == 0)
    nrows = len(tstart)
    cnt = np.diff(np.append(tstart, m))
    R = np.random.default_rng(_RNG_SEED).integers(1, 2**63 - 1, size=P, dtype=np.int64).view(np.uint64)
    h, increasing = _K.unit_hash(slot, tstart, R)
    if not increasing:     # pragma: no cover - cannot happen (labels are monotone)
        return None
    if any(e != "Intercept" for eff in effects.values() for e in eff):
        pat_of_row = np.arange(nrows, dtype=np.int64)     # slopes: each unit its own pattern
    else:
        _, first, inv = np.unique(h, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        rk = np.empty(len(first), dtype=np.int64)
        rk[np.argsort(first, kind="stable")] = np.arange(len(first))
        pat_of_row = rk[inv]     # patterns numbered by their first unit
        # exact: every unit has the slots of the first unit of its hash
        if not _K.same_slots(slot, tstart, cnt, _i64(first[inv])):
            return None
    row_order = np.argsort(pat_of_row, kind="stable")     # units by (pattern, id)
    counts = cnt[row_order]
    row_ptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    change = np.flatnonzero(np.diff(pat_of_row[row_order])) + 1
    pat_ptr = np.concatenate([[0], change, [nrows]]).astype(np.int64)
    # the final order: whole units moved, each keeping its (slot-sorted) rows
    up = None if np.array_equal(row_order, np.arange(nrows)) else _K.unit_perm(
        _i64(tstart), _i64(row_order), _i64(counts))      # positions in id order
    if up is not None:
        slot = slot[up]
    perm = up if src is None else (src if up is None else src[up])   # original rows (None: as they are)
    del up
    top_f = ids[0][tstart[row_order]]
    # group counts per level (the same runs in id order and in the final order:
    # units move whole)
    gn, gmin, gmax = _K.run_stats(lvl, L)
    infos = [LevelInfo(level_cols[d], tuple(level_cols[: d + 1]), int(gn[d]), int(gmin[d]),
                       float(m / gn[d]), int(gmax[d])) for d in range(L)]
    del ids, lvl
    # arrays

    def column(c):
        v = df[c].cast(pl.Float64).to_numpy()
        return v if perm is None else v[perm]

    def fill(c, out, j):
        v = df[c].cast(pl.Float64).to_numpy()
        if perm is None:
            out[:, j] = v
        else:
            _K.gather_into(np.ascontiguousarray(v), perm, out, j)

    y = np.ascontiguousarray(column(outcome))
    if design is not None:
        frame = (df if perm is None else df[perm]).with_columns(
            [pl.Series(nm, slots[nm].to_numpy()[slot]).cast(dt)
             for nm, dt in zip(lab_cols, lab_dtypes)])
        exprs, xnames = design(frame)
    else:
        exprs = ([None] if intercept else []) + list(covariates)
        xnames = (["Intercept"] if intercept else []) + list(covariates)
    X = np.empty((m, len(exprs)), dtype=np.float64)
    for j, ex in enumerate(exprs):
        if ex is None:
            X[:, j] = 1.0
        elif isinstance(ex, str):
            fill(ex, X, j)
        else:
            X[:, j] = frame.select(ex.cast(pl.Float64)).to_series().to_numpy()
    nl = sum(len(effects.get(d, [])) for d in range(L))
    load = np.ones((m, max(nl, 1)), dtype=np.float64)
    k = 0
    for d in range(L):
        for e in effects.get(d, []):
            if e != "Intercept":
                fill(e, load, k)
            k += 1
    idx_dt = _index_dtype()
    obs_row = (np.arange(m) if perm is None else perm).astype(
        np.uint64 if idx_dt == pl.UInt64 else np.uint32)
    if weights is not None:
        wrow = df[weights].cast(pl.Float64).to_numpy()[obs_row[row_ptr[:-1]]]
    else:
        wrow = np.ones(nrows)
    lat = latents(slots, lab_cols, levels, level_cols, effects)
    slot_labels = slots.rename({c: level_cols[i + 1] for i, c in enumerate(lab_cols)}).rename(
        {"__obs": "obs", "__slot": "slot"})
    top_ids = pl.Series(top, top_f).cast(schema[top])
    # the frame of ids per observation, built when asked for (predictions, survey weights)
    ids_orig = {c: df[c] for d, c in enumerate(level_cols) if d >= 1 and not is_value[d - 1]}
    frame = partial(_meta_frame, level_cols, lab_cols, lab_dtypes, is_value, ids_orig, slots,
                    top_ids, row_ptr, obs_row, slot)
    return Prepared(
        y=y, X=X, slot=slot, load=load, row_ptr=row_ptr, pat_ptr=pat_ptr, slot_lat=lat[0],
        nlatent=lat[1], latent_names=lat[2], latent_node=lat[3], latent_term=lat[4],
        slot_labels=slot_labels, level_labels=lat[5], top_ids=top_ids, obs_row=obs_row,
        wrow=wrow, levels=infos, xnames=xnames, nobs=m, dropped_covariate=dropped,
        missing_outcome=n_missing_y, max_row_obs=int(counts.max()),
        meta=LazyMeta({"frame": frame}))


def _meta_frame(level_cols, lab_cols, lab_dtypes, is_value, ids_orig, slots, top_ids, row_ptr,
                obs_row, slot) -> pl.DataFrame:
    """The Polars path's ``meta["frame"]``: per observation (final order) its ids,
    original row, slot, CSR row and labels."""
    idx_dt = _index_dtype()
    counts = np.diff(row_ptr)
    labs = [slots[nm].to_numpy()[slot] for nm in lab_cols]
    cols = [pl.Series(level_cols[0], np.repeat(top_ids.to_numpy(), counts)).cast(top_ids.dtype)]
    for d, c in enumerate(level_cols[1:], start=1):
        if is_value[d - 1]:
            cols.append(pl.Series(c, labs[d - 1]).cast(lab_dtypes[d - 1]))
        else:
            s = ids_orig[c]
            cols.append(s.gather(pl.Series(obs_row)).alias(c))
    cols += [pl.Series(_ROW, obs_row).cast(idx_dt), pl.Series("__slot", slot).cast(idx_dt),
             pl.Series("__rowid", np.repeat(np.arange(len(counts), dtype=np.int64), counts)).cast(idx_dt)]
    cols += [pl.Series(nm, v).cast(dt) for nm, v, dt in zip(lab_cols, labs, lab_dtypes)]
    return pl.DataFrame(cols)
