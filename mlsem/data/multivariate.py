"""Data layer, several outcomes (issue 15): one row per unit -> (unit, outcome) cells.

Each outcome's fixed part is encoded on its own (factors, transforms: mlsem.data.encode),
on the rows where that outcome and its covariates are observed.  The cells are stacked
(one per observed outcome of a unit) with a block design (outcome o's columns named
``o:name``, zero in the other outcomes' cells), and laid out by
:func:`mlsem.data.prepare.prepare` with the observation index ``unit * nout + outcome``:
the slots of one unit are then consecutive, in outcome order.  A missing outcome is a
missing cell (FIML); a covariate missing for one outcome's formula makes that outcome's
cell missing; a unit with no usable outcome is dropped and counted.  The latents are one
per (node, outcome): ``k:y1``, ``j[1]:y2``.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import MlsemError
from .encode import Encoding
from .prepare import _ROW, collect_columns, prepare

_UNIT = "__mlsem_unit"
_CELL = "__mlsem_cell"
_VAL = "__mlsem_value"
_ORIG = "__mlsem_unit_row"


def load_multi(data, Fs, levels, index=None, extra=()):
    """(frame, encodings): the columns of every formula read once, each fixed part
    encoded on its own estimation rows."""
    cols, numeric = [], []
    for F in Fs:
        for c in F.columns:
            if c not in cols:
                cols.append(c)
        numeric.append(F.outcome)
    for c in ([index] if index else []) + list(extra):
        if c and c not in cols:
            cols.append(c)
    ids = [lv[-1] for lv in levels]
    df = collect_columns(data, cols, numeric, ids)
    encs = [Encoding(F.fixed_text, [], F.variables, F.outcome).learn(df) for F in Fs]
    return df, encs


def prepare_multi(df: pl.DataFrame, Fs, encs, levels, index=None):
    """The CSR layout of the stacked cells (``prep.meta``: ``sout``, ``spup`` per slot,
    ``outcomes``, ``units``, ``dropped_units``, ``cells_missing`` per outcome among the
    kept units)."""
    nout = len(Fs)
    level_cols = [lv[-1] for lv in levels]
    df = df.with_row_index(_ROW)
    # the unit's observation number within its innermost group (as prepare numbers it)
    if index is not None:
        if df[index].null_count():
            raise MlsemError(f"data: the index column {index!r} has null values")
        dup = df.filter(pl.struct(level_cols + [index]).is_duplicated())
        if dup.height:
            first = dup.row(0, named=True)
            key = ", ".join(f"{c}={first[c]!r}" for c in level_cols + [index])
            raise MlsemError(f"data: duplicate units for ({key}): each "
                             f"({', '.join(level_cols + [index])}) must be unique")
        if df.schema[index].is_integer():
            unit = df[index].cast(pl.Int64).to_numpy()
        else:
            unit = df.select(pl.col(index).rank("dense").over(level_cols).cast(pl.Int64)
                             ).to_series().to_numpy()
    else:
        unit = df.select(pl.int_range(pl.len()).over(level_cols).cast(pl.Int64)
                         ).to_series().to_numpy() + 1
    parts = []
    xnames = []
    qs = [len(e.names) for e in encs]
    q = sum(qs)
    used = np.zeros(df.height, dtype=bool)
    missing = []
    off = 0
    for o, (F, enc) in enumerate(zip(Fs, encs)):
        rows, X, _ = enc.design(df, with_outcome=True)
        idx = np.flatnonzero(rows)
        missing.append(int(df.height - len(idx)))
        used[idx] = True
        names = [f"{F.outcome}:{n}" for n in enc.names]
        xnames += names
        Xs = np.zeros((len(idx), q))
        Xs[:, off:off + qs[o]] = X
        off += qs[o]
        cols = {c: df[c].gather(idx) for c in level_cols}
        cols[_ORIG] = df[_ROW].gather(idx)
        cols[_CELL] = pl.Series(_CELL, unit[idx] * nout + o)
        cols[_VAL] = df[F.outcome].gather(idx).cast(pl.Float64)
        part = pl.DataFrame(cols)
        part = part.with_columns([pl.Series(f"__x{c}", Xs[:, c]) for c in range(q)])
        parts.append(part)
    stacked = pl.concat(parts, how="vertical")
    dropped_units = int(df.height - used.sum())
    if stacked.height == 0:
        raise MlsemError("data: no unit has an outcome with its covariates observed")
    xcols = [f"__x{c}" for c in range(q)]

    def design(d):
        return [pl.col(c) for c in xcols], list(xnames)

    effects = {d: ["Intercept"] for d in range(len(levels))
               if any(len(rt.group) == d + 1 for rt in Fs[0].random)}
    prep = prepare(stacked, _VAL, [], False, levels, effects, index=_CELL, design=design)
    # one latent per (node, outcome): latent g of prepare -> g * nout + o
    labels = prep.slot_labels
    cell = labels["obs"].to_numpy().astype(np.int64)
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
    prep.meta.update(sout=sout, spup=spup, outcomes=outs, units=int(used.sum()),
                     dropped_units=dropped_units, cells_missing=dict(zip(outs, missing)))
    return prep
