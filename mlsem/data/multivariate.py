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

import numpy as np
import polars as pl

from ..errors import MlsemError
from .encode import Encoding, outcome_column
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
    ok = np.zeros((nout, df.height), dtype=bool)
    Xo, idxs = [], []
    missing = []
    for o, (F, enc) in enumerate(zip(Fs, encs)):
        rows, X, _ = enc.design(df, with_outcome=True)
        idx = np.flatnonzero(rows)
        missing.append(int(df.height - len(idx)))
        ok[o, idx] = True
        Xo.append(X)
        idxs.append(idx)
        xnames += [f"{F.outcome}:{n}" for n in enc.names]
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
    prep.xnames = xnames
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
