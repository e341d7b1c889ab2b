"""Data layer, several outcomes (issue 15): one row per unit -> (unit, outcome) cells.

Each outcome's fixed part is encoded on its own (factors, transforms: mlsem.data.encode),
on the rows where that outcome and its covariates are observed.  The cells are stacked
(one per outcome of a kept unit, consecutive, a missing one null) and laid out by
:func:`mlsem.data.prepare.prepare` (no design: only the ids and the values pass through
it); cell c of an innermost group is then its unit c // nout's outcome c % nout, so the
slots of one unit are consecutive, in outcome order.  The block design (outcome o's
columns named ``o:name``, zero in the other outcomes' cells) is gathered afterwards.  A
missing outcome is a missing cell (FIML); a covariate missing for one outcome's formula
makes that outcome's cell missing; a unit with no usable outcome is dropped and counted.  The latents are one
per (node, outcome): ``k:y1``, ``j[1]:y2``.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl

from ..errors import MlsemError
from .encode import Encoding, outcome_column
from .layout import LazyMeta, LevelInfo, Prepared, label_mode, latents
from .prepare import _ROW, collect_columns, prepare

_VAL = "__mlsem_value"


def load_multi(data, Fs, levels, index=None, extra=()):
    """(frame, encodings): the columns of every formula read once, each fixed part
    encoded on its own estimation rows."""
    cols, numeric = [], []
    for F in Fs:
        for c in F.columns:
            if c not in cols:
                cols.append(c)
        numeric += list(F.outcome_vars or (F.outcome,))
    for c in ([index] if index else []) + list(extra):
        if c and c not in cols:
            cols.append(c)
    ids = [lv[-1] for lv in levels]
    df = collect_columns(data, cols, list(dict.fromkeys(numeric)), ids)
    for F in Fs:
        df = outcome_column(df, F)
    encs = [Encoding(F.fixed_text, [], F.variables, F.outcome).learn(df) for F in Fs]
    return df, encs


def prepare_multi(df: pl.DataFrame, Fs, encs, levels, index=None, fast=True):
    """The CSR layout of the stacked cells (``prep.meta``: ``sout``, ``spup`` per slot,
    ``outcomes``, ``units``, ``dropped_units``, ``cells_missing`` per outcome among the
    kept units).  ``fast=False``: the first implementation (a design callable through
    prepare, the block design by a gather and masked products), kept as the reference
    the tests compare the default layout with, field by field."""
    nout = len(Fs)
    level_cols = [lv[-1] for lv in levels]
    df = df.with_row_index(_ROW)
    if index is not None:
        if df[index].null_count():
            raise MlsemError(f"data: the index column {index!r} has null values")
        dup = df.filter(pl.struct(level_cols + [index]).is_duplicated())
        if dup.height:
            first = dup.row(0, named=True)
            key = ", ".join(f"{c}={first[c]!r}" for c in level_cols + [index])
            raise MlsemError(f"data: duplicate units for ({key}): each "
                             f"({', '.join(level_cols + [index])}) must be unique")
    xnames = []
    qs = [len(e.names) for e in encs]
    q = sum(qs)
    ok = np.empty((nout, df.height), dtype=bool)
    Xo = []
    missing = []
    conv = {}
    for o, (F, enc) in enumerate(zip(Fs, encs)):
        if fast and enc.plain and not enc.slopes:
            # numeric columns as they are: read in place by the compiled pass (no frame
            # of the encoded rows, no design matrix)
            enc._check_finite(df)
            ok[o] = enc._complete(df, True).to_numpy()
            X = _Columns(df, enc.names, conv)
        else:
            rows, X, _ = enc.design(df, with_outcome=True)
            ok[o] = rows
        missing.append(int(df.height - np.count_nonzero(ok[o])))
        Xo.append(X)
        xnames += [f"{F.outcome}:{n}" for n in enc.names]
    idxs = _Rows(ok)
    used = ok.any(axis=0)
    dropped_units = int(df.height - used.sum())
    if not used.any():
        raise MlsemError("data: no unit has an outcome with its covariates observed")
    # the kept units, each as nout consecutive cells (outcome order; a missing cell has
    # a null value): prepare numbers the cells of a group 1, 2, ... in this order, so
    # cell c of a group is its unit c // nout's outcome c % nout; with an index the
    # units of a group are in the order of the index
    everyone = bool(used.all())
    uidx = np.arange(df.height) if everyone else np.flatnonzero(used)
    if index is not None:
        order = df.select(level_cols + [index]).filter(pl.Series(used)).select(
            pl.arg_sort_by(level_cols + [index], maintain_order=True)).to_series().to_numpy()
        uidx = uidx[order]
    nu = len(uidx)
    got = _cells_compiled(df, Fs, levels, ok, Xo, qs, uidx, everyone and index is None) \
        if fast else None
    if got is not None:
        prep, sout, spup = got
    else:
        prep, sout, spup = _cells_stacked(df, Fs, levels, ok, Xo, idxs, qs, uidx, everyone, fast,
                                          index)
    prep.xnames = xnames
    nout = len(Fs)
    sl = prep.slot_lat
    slot_lat = np.where(sl >= 0, sl * nout + sout[:, None], -1).astype(np.int32)
    outs = [F.outcome for F in Fs]
    names, node, term = [], [], []
    for g in range(prep.nlatent):
        for o in range(nout):
            names.append(f"{prep.latent_names[g]}:{outs[o]}")
            node.append(prep.latent_node[g])
            term.append((prep.latent_term[g][0], outs[o]))
    prep.slot_lat = slot_lat
    prep.nlatent = prep.nlatent * nout
    prep.latent_names = names
    prep.latent_node = np.asarray(node, dtype=np.int64)
    prep.latent_term = term
    # a dropped unit has every cell missing: count it once, not among the missing cells
    missing = [n - dropped_units for n in missing]
    prep.missing_outcome = int(sum(missing))
    # unit_rows: the input row of kept unit u (cell s of the stacked frame is unit s // nout)
    prep.meta.update(sout=sout, spup=spup, outcomes=outs, units=int(used.sum()), unit_rows=uidx,
                     dropped_units=dropped_units, cells_missing=dict(zip(outs, missing)))
    return prep


def _cells_stacked(df, Fs, levels, ok, Xo, idxs, qs, uidx, everyone, fast, index):
    """(prep, sout, spup) by the stacked frame of the cells through prepare (the first
    implementation; the path of ids that are not integers)."""
    nout = len(Fs)
    level_cols = [lv[-1] for lv in levels]
    q = sum(qs)
    nu = len(uidx)
    Xo = [x.matrix(idxs[o]) if isinstance(x, _Columns) else x for o, x in enumerate(Xo)]
    # values and the compact design of every (kept unit, outcome) cell, unit-major: a
    # cell's own outcome's columns (column a of outcome o in column a)
    qmax = max(qs + [1])
    Y = np.full((nu, nout), np.nan)
    Xcu = np.zeros((nu, nout, qmax))
    rank = None if (everyone and index is None) else np.full(df.height, -1, dtype=np.int64)
    if rank is not None:
        rank[uidx] = np.arange(nu)
    for o, F in enumerate(Fs):
        yo = df[F.outcome].cast(pl.Float64).to_numpy()
        idx = idxs[o]
        if rank is None and len(idx) == nu:          # every unit: no gathers
            Y[:, o] = yo
            Xcu[:, o, :qs[o]] = Xo[o]
        else:
            at = idx if rank is None else rank[idx]
            Y[at, o] = yo[idx]
            Xcu[at, o, :qs[o]] = Xo[o]
    if rank is None and uidx is not None and nu == df.height:
        # every unit in the frame's order: integer ids repeated (no gather in Polars)
        cols = []
        for c in level_cols:
            col = df[c]
            cols.append(pl.Series(c, np.repeat(col.to_numpy(), nout)) if col.dtype.is_integer()
                        and not col.null_count() else col.gather(pl.Series(np.repeat(uidx, nout))))
    else:
        cidx = pl.Series(np.repeat(uidx, nout))
        cols = [df[c].gather(cidx) for c in level_cols]
    stacked = pl.DataFrame(cols + [pl.Series(_VAL, Y.ravel(), nan_to_null=True)])

    def design(d):
        return [], []

    effects = {d: ["Intercept"] for d in range(len(levels))
               if any(len(rt.group) == d + 1 for rt in Fs[0].random)}
    # no design through prepare (without a callable its compiled path builds no frame of
    # the cells' labels): the designs are gathered below
    prep = prepare(stacked, _VAL, [], False, levels, effects, design=design if not fast else None)
    # the compact design of the kept cells and the block design (a cell's row is 0
    # outside its outcome's columns), built from it column block by column block
    Xc = Xcu.reshape(nu * nout, qmax)
    ob = prep.obs_row
    if not (len(ob) == len(Xc) and np.array_equal(ob, np.arange(len(ob)))):
        Xc = np.take(Xc, ob, axis=0)
    if fast:
        # column by column (one 1-D product per column: about half the time of the 2-D
        # masked products on 2.3M cells), the same values
        ocell = np.asarray(ob) % nout
        X = np.empty((len(Xc), q))       # every column written below
        off = 0
        for o in range(nout):
            if qs[o]:
                mk = ocell == o
                for a in range(qs[o]):
                    np.multiply(Xc[:, a], mk, out=X[:, off + a])
            off += qs[o]
    else:
        ocell = (np.asarray(ob) % nout).astype(np.int32)
        X = np.zeros((len(Xc), q))
        off = 0
        for o in range(nout):
            if qs[o]:
                np.multiply(Xc[:, :qs[o]], (ocell == o)[:, None], out=X[:, off:off + qs[o]])
            off += qs[o]
    prep.X = X
    prep.meta["Xc"] = Xc
    prep.meta["zcross"] = _zcross(ok, Xo, qs, df, Fs)
    # one latent per (node, outcome): latent g of prepare -> g * nout + o
    labels = prep.slot_labels
    cell = labels["obs"].to_numpy().astype(np.int64) - 1
    sout = (cell % nout).astype(np.int32)
    key_cols = [c for c in labels.columns if c not in ("slot", "obs")]
    # with one grouping level there is no key column above the unit: the frame of the unit
    # numbers alone (labels.select([]) would have height 0)
    ukey = pl.DataFrame({**{c: labels[c] for c in key_cols}, "__u": cell // nout})
    spup = ukey.select(pl.struct(ukey.columns).rank("dense").cast(pl.Int32)).to_series().to_numpy()
    if np.any(np.diff(spup) < 0):
        raise MlsemError("internal: the slots of a unit are not consecutive")
    return prep, sout, spup


def _cells_compiled(df, Fs, levels, ok, Xo, qs, uidx, ident):
    """(prep, sout, spup) laid out from the units (pupils) with the slot arithmetic, the
    same arrays as :func:`_cells_stacked` (its stacked frame through prepfast.prepare_fast:
    tests/data/test_multivariate_fast.py): one pass of prepare_fast's steps on the units,
    then the cells in compiled passes (a cell of unit u and outcome o is numbered
    ``(u's number in its innermost group - 1) * nout + o + 1`` in the group, so the slots
    are the present (unit slot, outcome) pairs in that order).  None where it does not apply
    (ids that are not integers, the passes not built, a hash collision of two missing
    patterns): the stacked path."""
    from . import prepfast as pf
    K = pf._K
    level_cols = [lv[-1] for lv in levels]
    if not hasattr(K, "fill_cells") or not pf.applies(df, level_cols, None, None, None, False):
        return None
    nout = len(Fs)
    L = len(level_cols)
    schema = df.schema
    effects = {d: ["Intercept"] for d in range(L)
               if any(len(rt.group) == d + 1 for rt in Fs[0].random)}
    nu = len(uidx)
    ids = [pf._i64(df[c].to_numpy()) for c in level_cols]
    if not ident:
        ids = [v[uidx] for v in ids]
    lvl, in_order = pf._levels(ids)
    # the data row of each unit and its number among the kept (empty: the unit's own)
    none = np.zeros(0, dtype=np.int64)
    drow = none if ident else pf._i64(uidx)
    srow = none
    if not in_order:
        order = pf._i64(pl.DataFrame(ids, schema=level_cols).with_row_index("__i").sort(
            level_cols, maintain_order=True)["__i"].to_numpy())
        ids = [v[order] for v in ids]
        drow, srow = (order if ident else drow[order]), order
        lvl, _ = pf._levels(ids)
    ng = [int(np.count_nonzero(lvl <= d)) for d in range(L)]
    labs, lab_dtypes, is_value = [], [], []
    for d in range(1, L):
        mode = label_mode(pf._n_distinct(ids[d]), ng[d], ng[d - 1])
        if mode == "rank":
            labs.append(K.rank_and_obs(lvl, d))
            lab_dtypes.append(pl.Int64)
        elif mode == "one":
            labs.append(np.ones(nu, dtype=np.int64))
            lab_dtypes.append(pl.Int64)
        else:
            labs.append(ids[d])
            lab_dtypes.append(schema[level_cols[d]])
        is_value.append(mode == "value")
    pobs = K.rank_and_obs(lvl, L)       # the unit's number within its innermost group
    # the observed cells of each unit (in its order): okp[u, o]
    okp = np.ascontiguousarray((ok if not len(drow) else ok[:, drow]).T).view(np.uint8)
    # unit slots: the distinct (labels, unit number) in order; a cell's slot is the rank of
    # (unit slot, outcome) among the present pairs
    pslot, PP, prep_first = pf._slot_codes(labs + [pobs])
    pslot = np.ascontiguousarray(pslot, dtype=np.int32)
    pres = K.slot_presence(pslot, okp, PP).view(bool)
    cslot_of = (np.cumsum(pres, dtype=np.int64) - 1).astype(np.int32)
    P = int(np.count_nonzero(pres))
    pair = np.flatnonzero(pres)
    ps, po = pair // nout, (pair % nout).astype(np.int32)
    rep = prep_first[ps]
    lab_cols = [f"__lab{d}" for d in range(1, L)]
    slots = pl.DataFrame([pl.Series(nm, v[rep]).cast(dt) for nm, v, dt in zip(lab_cols, labs, lab_dtypes)]
                         + [pl.Series("__obs", (pobs[rep] - 1) * nout + po + 1)]).with_row_index("__slot")
    # top-level units (rows of the CSR layout), their patterns as in prepare_fast
    tstart = np.flatnonzero(lvl == 0)
    nrows = len(tstart)
    tptr = np.append(tstart, nu).astype(np.int64)
    R = np.random.default_rng(pf._RNG_SEED).integers(1, 2**63 - 1, size=P, dtype=np.int64).view(np.uint64)
    h, cnt = K.unit_cells_hash(pslot, okp, cslot_of, tptr, R)
    m = int(cnt.sum())
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    rk = np.empty(len(first), dtype=np.int64)
    rk[np.argsort(first, kind="stable")] = np.arange(len(first))
    pat_of_row = rk[inv]
    if not K.same_unit_cells(pslot, okp, tptr, pf._i64(first[inv])):
        return None
    row_order = np.argsort(pat_of_row, kind="stable")
    counts = cnt[row_order]
    row_ptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    change = np.flatnonzero(np.diff(pat_of_row[row_order])) + 1
    pat_ptr = np.concatenate([[0], change, [nrows]]).astype(np.int64)
    top_f = ids[0][tstart[row_order]]
    # group counts per level: the cells of the units of each group
    gn, gmin, gmax = K.cell_run_stats(lvl, okp, L)
    infos = [LevelInfo(level_cols[d], tuple(level_cols[: d + 1]), int(gn[d]), int(gmin[d]),
                       float(m / gn[d]), int(gmax[d])) for d in range(L)]
    del lvl
    # the cells, in the final order, in one pass
    q, qmax = sum(qs), max(qs + [1])
    qoff = np.zeros(nout + 1, dtype=np.int64)
    np.cumsum(qs, out=qoff[1:])
    ys, maps, xcols, xo0, xst = [], [], [], [], []
    none = np.zeros(0, dtype=np.int64)
    for o, F in enumerate(Fs):
        ys.append(np.ascontiguousarray(df[F.outcome].cast(pl.Float64).to_numpy()))
        if isinstance(Xo[o], _Columns):       # the data's columns, at the data row
            for c in Xo[o].arrays():
                xcols.append(c)
                xo0.append(0)
                xst.append(1)
                if len(c) != df.height:        # the intercept: one value, read at offset 0
                    xst[-1] = 0
            maps.append(none)
            continue
        Xa = np.ascontiguousarray(Xo[o], dtype=np.float64)
        if Xa.shape != (int(np.count_nonzero(ok[o])), qs[o]):
            raise MlsemError("internal: a design's rows are not its outcome's cells")
        for a in range(qs[o]):
            xcols.append(Xa.reshape(-1))
            xo0.append(a)
            xst.append(qs[o])
        if Xa.shape[0] == df.height:
            maps.append(none)
        else:                                  # the design's row of each data row
            mp = np.cumsum(ok[o], dtype=np.int64)
            mp -= 1
            maps.append(mp)
    idx_dt = pf._index_dtype()
    slot = np.empty(m, dtype=np.int32)
    y = np.empty(m)
    obs_row = np.empty(m, dtype=np.uint64 if idx_dt == pl.UInt64 else np.uint32)
    Xc = np.empty((m, qmax))
    K.fill_cells(pf._i64(row_order), tptr, okp, pslot, cslot_of, drow, srow, nout, ys, xcols,
                 np.asarray(xo0, dtype=np.int64), np.asarray(xst, dtype=np.int64), maps, qoff,
                 slot, y, obs_row, Xc)
    del xcols, maps
    nl = len(effects)
    lat = latents(slots, lab_cols, levels, level_cols, effects)
    slot_labels = slots.rename({c: level_cols[i + 1] for i, c in enumerate(lab_cols)}).rename(
        {"__obs": "obs", "__slot": "slot"})
    top_ids = pl.Series(level_cols[0], top_f).cast(schema[level_cols[0]])
    frame = partial(_cells_frame, df, uidx, nout, level_cols, lab_cols, lab_dtypes, is_value, slots,
                    top_ids, row_ptr, obs_row, slot)
    prep = CellsPrepared(
        y=y, X=None, slot=slot, load=None, row_ptr=row_ptr, pat_ptr=pat_ptr,
        slot_lat=lat[0], nlatent=lat[1], latent_names=lat[2], latent_node=lat[3],
        latent_term=lat[4], slot_labels=slot_labels, level_labels=lat[5], top_ids=top_ids,
        obs_row=obs_row, wrow=np.ones(nrows), levels=infos, xnames=[], nobs=m,
        dropped_covariate=0, missing_outcome=int(nu * nout - m), max_row_obs=int(counts.max()),
        meta=LazyMeta({"frame": frame}))
    prep.meta["Xc"] = Xc
    prep.meta["zcross"] = _zcross(ok, Xo, qs, df, Fs, ys)
    sout = np.ascontiguousarray(po, dtype=np.int32)
    prep.defer_arrays(sout, qoff, max(nl, 1))
    # the unit of a slot: its unit slot's rank among the present ones (every unit slot has
    # a cell: the rank is the code)
    spup = (ps + 1).astype(np.int32)
    return prep, sout, spup


def _cells_frame(df, uidx, nout, level_cols, lab_cols, lab_dtypes, is_value, slots, top_ids, row_ptr,
                 obs_row, slot):
    """prepfast's ``meta["frame"]`` of the stacked cells (ids gathered from the units)."""
    from .prepfast import _meta_frame
    cidx = pl.Series(np.repeat(uidx, nout))
    ids_orig = {c: df[c].gather(cidx) for d, c in enumerate(level_cols)
                if d >= 1 and not is_value[d - 1]}
    return _meta_frame(level_cols, lab_cols, lab_dtypes, is_value, ids_orig, slots, top_ids, row_ptr,
                       obs_row, slot)


class _Deferred:
    """A field of :class:`CellsPrepared` written when first read: the array (allocated
    unwritten, its pages untouched) is filled in place by ``fill(array)``; while the
    object's ``deferred()`` context holds it is handed out as it is (shape and
    reference only)."""

    def __init__(self, name):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        d = obj.__dict__
        fill = d.get("_fill_" + self.name)
        if fill is not None and not d.get("_defer"):
            del d["_fill_" + self.name]
            fill(d["_" + self.name])
        return d["_" + self.name]

    def __set__(self, obj, value):
        obj.__dict__["_" + self.name] = value
        obj.__dict__.pop("_fill_" + self.name, None)


class CellsPrepared(Prepared):
    """The :class:`Prepared` of several outcomes laid out by the compiled passes: its block
    design ``X`` (a cell's row zero outside its outcome's columns) is written from the
    compact one (``meta["Xc"]``) when first read, and its loadings ``load`` (all 1: random
    intercepts) likewise: the grouped fit reads neither (74 + 37 MB not written on 2.3M
    cells of two outcomes with two columns and two levels each).  While ``deferred()``
    holds (MultiModel's construction, which takes their shapes and references only) the
    arrays are handed out unwritten; they are written in place on the first read after.
    ``unit_load``: every loading is 1 (Model need not read them to know)."""

    X = _Deferred("X")
    load = _Deferred("load")
    unit_load = True

    def defer_arrays(self, sout, qoff, nl):
        m, q = self.nobs, int(qoff[-1])
        d = self.__dict__
        d["_X"] = np.zeros((m, q))       # (pages untouched until written)
        d["_fill_X"] = partial(_block_design, self, np.asarray(sout), np.asarray(qoff))
        d["_load"] = np.empty((m, nl))
        d["_fill_load"] = _ones

    @property
    def block_design_pending(self) -> bool:
        return self.__dict__.get("_fill_X") is not None

    @property
    def loadings_pending(self) -> bool:
        return self.__dict__.get("_fill_load") is not None

    def deferred(self):
        return _Defer(self)

    def __getstate__(self):
        self.X, self.load    # noqa: B018 - written before pickling
        d = dict(self.__dict__)
        d.pop("_defer", None)
        return d


def _ones(a):
    a.fill(1.0)


class _Defer:
    def __init__(self, prep):
        self.prep = prep

    def __enter__(self):
        self.prep.__dict__["_defer"] = True
        return self.prep

    def __exit__(self, *exc):
        self.prep.__dict__.pop("_defer", None)
        return False


def _block_design(prep, sout, qoff, X):
    """X[:, qoff[o] + a] = column a of the compact design on the cells of outcome o."""
    Xc = prep.meta["Xc"]
    ocell = sout[prep.slot]
    for o in range(len(qoff) - 1):
        if qoff[o + 1] > qoff[o]:
            mk = ocell == o
            for a in range(int(qoff[o + 1] - qoff[o])):
                np.multiply(Xc[:, a], mk, out=X[:, qoff[o] + a])


class _Columns:
    """A plain design (an outcome's covariates as they are, and the intercept), not
    materialised: the compiled pass reads the data's columns at the data rows."""

    def __init__(self, df, names, cache):
        self.df, self.names, self.cache = df, list(names), cache

    def arrays(self):
        """The columns as float arrays (the intercept: one value), each converted once
        for all the outcomes (``cache``: a column of several chunks is copied by each
        conversion)."""
        for n in self.names:
            if n != "Intercept" and n not in self.cache:
                self.cache[n] = np.ascontiguousarray(self.df[n].cast(pl.Float64).to_numpy(),
                                                     dtype=np.float64)
        return [np.ones(1) if n == "Intercept" else self.cache[n] for n in self.names]

    def matrix(self, idx):
        X = np.empty((len(idx), len(self.names)))
        for j, (n, c) in enumerate(zip(self.names, self.arrays())):
            X[:, j] = 1.0 if n == "Intercept" else c[idx]
        return X


class _Rows:
    """Per outcome the data rows of its cells (flatnonzero of its mask), when asked for."""

    def __init__(self, ok):
        self.ok, self.got = ok, {}

    def __getitem__(self, o):
        if o not in self.got:
            self.got[o] = np.flatnonzero(self.ok[o])
        return self.got[o]


def _zcross(ok, Xo, qs, df, Fs, ys=None, chunk=1 << 16):
    """(nout, k, k), k = 2 + the most columns of an outcome: per outcome o the cross
    products of z = [1, its design row, its value] over its cells (its rows of the data
    with ``ok[o]``), in the leading 2 + qs[o] square: MultiModel.outcome_ols's sums,
    here by BLAS on blocks of rows (the cells' own pass costs a read of 2.3M cells)."""
    nout, n = len(qs), ok.shape[1]
    k = max(qs + [0]) + 2
    out = np.zeros((nout, k, k))
    for o in range(nout):
        qo = qs[o]
        y = df[Fs[o].outcome].cast(pl.Float64).to_numpy() if ys is None else ys[o]
        cols = Xo[o].arrays() if isinstance(Xo[o], _Columns) else None
        X = None if cols is not None else np.asarray(Xo[o], dtype=np.float64)
        acc = np.zeros((qo + 2, qo + 2))
        if ok[o].all():
            # every row a cell: dot products of whole columns (no blocks copied)
            vecs = [None] + [(None if len(cols[a]) != n else cols[a]) if cols is not None
                             else X[:, a] for a in range(qo)] + [y]
            for i in range(qo + 2):
                for j in range(i, qo + 2):
                    u, v = vecs[i], vecs[j]
                    acc[i, j] = acc[j, i] = (float(n) if u is None and v is None else
                                             float(np.sum(v if u is None else u)) if u is None or v is None
                                             else float(np.dot(u, v)))
            out[o, :qo + 2, :qo + 2] = acc
            continue
        pos = 0
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            mk = ok[o, lo:hi]
            nk = int(np.count_nonzero(mk))
            if not nk:
                continue
            sel = slice(None) if nk == hi - lo else mk
            Z = np.empty((nk, qo + 2))
            Z[:, 0] = 1.0
            for a in range(qo):
                if cols is not None:
                    Z[:, 1 + a] = 1.0 if len(cols[a]) != n else cols[a][lo:hi][sel]
                else:
                    Z[:, 1 + a] = X[pos:pos + nk, a]
            Z[:, qo + 1] = y[lo:hi][sel]
            pos += nk
            acc += Z.T @ Z
        out[o, :qo + 2, :qo + 2] = acc
    return out
