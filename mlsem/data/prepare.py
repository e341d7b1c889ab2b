"""Data layer: read, validate, nested -> slots, missing-pattern grouping.

Everything here is Polars: a lazy scan projected on the model's columns, one
collect, then in-memory expressions.  The output is the compact CSR layout of
DESIGN.md section 3 (never a dense wide matrix):

    rows (top-level units) sorted by missing pattern,
    row_ptr (rows + 1), pat_ptr (patterns + 1),
    per observation: slot, y, X (obs x q) and the random-effect loadings.

Slots are labelled by the id values within their parent; an id that is
globally unique (each value has one parent, e.g. a child id) is labelled by its
rank within the parent instead.  The observation index within the innermost
group is the ``index`` column's value when given, else the row order.
"""
from __future__ import annotations

import glob as _glob
import os

import numpy as np
import polars as pl

from ..errors import NAN_HINT, MlsemError
from .layout import LevelInfo, Prepared, label_mode, latents  # noqa: F401  (re-exported)
from . import prepfast

_ROW = "__mlsem_row"


def _rows_text(rows: list, limit: int = 5) -> str:
    rows = [int(r) + 1 for r in rows]
    s = ", ".join(str(r) for r in rows[:limit])
    if len(rows) > limit:
        s += f", ... ({len(rows)} rows)"
    return s


# the text a CSV file writes for a missing value, read as null: pandas' default
# set (R's write.csv writes NA; empty fields are null anyway)
CSV_NULLS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
             "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def scan(data) -> pl.LazyFrame:
    """Anything mlsem accepts as data, as a Polars LazyFrame."""
    if isinstance(data, pl.LazyFrame):
        return data
    if isinstance(data, pl.DataFrame):
        return data.lazy()
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if os.path.isdir(path):
            files = sorted(_glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            if not files:
                raise MlsemError(f"data: directory {path!r} holds no .parquet files")
            return pl.scan_parquet(files)
        if any(ch in path for ch in "*?["):
            files = sorted(_glob.glob(path, recursive=True))
            if not files:
                raise MlsemError(f"data: no file matches {path!r}")
            return pl.scan_parquet(files)
        if not os.path.exists(path):
            raise MlsemError(f"data: file {path!r} does not exist")
        low = path.lower()
        if low.endswith(".csv") or low.endswith(".csv.gz") or low.endswith(".tsv"):
            return pl.scan_csv(path, separator="\t" if low.endswith(".tsv") else ",",
                               null_values=CSV_NULLS)
        if low.endswith(".parquet") or low.endswith(".pq"):
            return pl.scan_parquet(path)
        raise MlsemError(f"data: cannot tell the format of {path!r} (expected .parquet or .csv)")
    mod = type(data).__module__
    if mod.startswith("pandas"):
        # named index levels (ids after set_index or groupby) are columns too
        named = [n for n in getattr(data.index, "names", [None]) if n is not None]
        if named and not any(n in data.columns for n in named):
            return pl.from_pandas(data, include_index=True).lazy()
        return pl.from_pandas(data).lazy()
    if mod.startswith("pyarrow"):
        return pl.from_arrow(data).lazy()
    raise MlsemError(
        f"data: unsupported type {type(data).__name__}; give a Parquet/CSV path, a Polars "
        "DataFrame or LazyFrame, a pandas DataFrame or a pyarrow Table")


def _check_has_values(lf: pl.LazyFrame, data, c: str) -> None:
    """An empty data set, or a column with no values at all (a CSV reader
    calls such a column text), is said as such rather than as a type error."""
    try:
        counts = lf.select(pl.len().alias("n"), pl.col(c).null_count().alias("nulls")).collect()
    except Exception as exc:
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    n, nulls = counts["n"][0], counts["nulls"][0]
    if n == 0:
        raise MlsemError("data: the data set is empty (0 rows)")
    if nulls == n:
        raise MlsemError(f"data: column {c!r} has no values (all {n:,} rows are empty)")


def _not_a_number(lf: pl.LazyFrame, c: str, dt) -> str:
    """For a text column that should be numeric: the first value that is not a
    number and its row (a missing-value code such as '.' or 'missing', or a
    decimal comma)."""
    if dt != pl.String:
        return ""
    try:
        bad = (lf.select(pl.col(c)).with_row_index(_ROW)
               .filter(pl.col(c).is_not_null() & pl.col(c).str.strip_chars().cast(pl.Float64, strict=False).is_null())
               .head(1).collect())
    except Exception:    # noqa: BLE001 - only a hint for the message
        return ""
    if bad.height == 0:
        return ""
    return (f" (row {bad[_ROW][0] + 1} holds {bad[c][0]!r}, which is not a number; a code for missing "
            "values must be empty or NA in a CSV file, or null in a data frame)")


def _nonfinite_columns(df: pl.DataFrame, cols: list) -> set:
    """The columns among ``cols`` (float) holding an infinite or NaN value."""
    cols = list(dict.fromkeys(cols))
    if not cols:
        return set()
    row = df.select([(pl.col(c).is_infinite() | pl.col(c).is_nan()).any().alias(c) for c in cols]).row(0)
    return {c for c, b in zip(cols, row) if b}


def collect_columns(data, columns: list, numeric: list, ids: list) -> pl.DataFrame:
    """Project ``data`` on ``columns`` and collect once, checking names and types."""
    lf = scan(data)
    try:
        schema = lf.collect_schema()
    except Exception as exc:  # unreadable file
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    missing = [c for c in columns if c not in schema]
    if missing:
        have = ", ".join(list(schema.names())[:20])
        raise MlsemError(
            f"data: column {missing[0]!r} is not in the data (columns: {have})")
    for c in numeric:
        dt = schema[c]
        if not (dt.is_numeric() or dt == pl.Boolean):
            _check_has_values(lf, data, c)
            raise MlsemError(f"data: column {c!r} must be numeric, but it is {dt}{_not_a_number(lf, c, dt)}")
    try:
        df = lf.select(columns).collect()
    except Exception as exc:
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    if df.height == 0:
        raise MlsemError("data: the data set is empty (0 rows)")
    # one pass over the float columns says whether any value is not finite (the
    # rows are listed only then)
    suspect = _nonfinite_columns(df, [c for c in list(ids) + list(numeric) if df.schema[c].is_float()])
    for c in ids:
        nnull = df[c].null_count()
        if nnull:
            rows = df.with_row_index(_ROW).filter(pl.col(c).is_null())[_ROW].to_list()
            raise MlsemError(f"data: id column {c!r} has {nnull} null value(s), rows {_rows_text(rows)}")
        if c in suspect:
            bad = df.with_row_index(_ROW).filter(~pl.col(c).is_finite())[_ROW].to_list()
            if bad:
                raise MlsemError(f"data: id column {c!r} has non-finite values, rows {_rows_text(bad)}")
    for c in numeric:
        if c in suspect:
            bad = df.with_row_index(_ROW).filter(pl.col(c).is_infinite() | pl.col(c).is_nan())[_ROW].to_list()
            if bad:
                raise MlsemError(
                    f"data: column {c!r} has infinite or NaN values, rows {_rows_text(bad)}"
                    f"{NAN_HINT}")
    return df


def _radix_key(df: pl.DataFrame, cols: list, limit: int):
    """(key, radices, offsets) with key the mixed-radix int64 code of each row's
    tuple of integer columns ``cols`` (lexicographic order of the tuples = order
    of the codes), or None where a column is not an integer column without
    nulls or the product of the columns' value ranges exceeds ``limit``: then
    the distinct tuples need a hash table (Polars), here an array of flags."""
    key = None
    size = 1
    radices, offsets = [], []
    for c in cols:
        s = df[c]
        if not s.dtype.is_integer() or s.null_count() or s.len() == 0:
            return None
        lo, hi = int(s.min()), int(s.max())
        r = hi - lo + 1
        if r <= 0 or size * r > limit or hi >= 2**63:
            return None
        # as int64: an unsigned column times an int64 key is float64 in NumPy (an
        # UInt64 id column crashed the fit with an IndexError)
        v = s.to_numpy().astype(np.int64, copy=False)
        v = (v - lo) if lo else v
        key = v.astype(np.int64) if key is None else key * r + v
        size *= r
        radices.append(r)
        offsets.append(lo)
    return key, radices, offsets


def _n_unique(df: pl.DataFrame, cols: list) -> int:
    """Number of distinct tuples of ``cols``: by a flag array over the codes of
    integer columns (O(n); Polars' hash-based n_unique took 0.25 s on 1.15M
    rows), else by Polars."""
    rk = _radix_key(df, cols, 4 * df.height + 1024)
    if rk is None:
        return df.select(cols).n_unique()
    key, radices, _ = rk
    seen = np.zeros(int(np.prod(radices, dtype=np.int64)), dtype=bool)
    seen[key] = True
    return int(np.count_nonzero(seen))


def _label_expr(df: pl.DataFrame, col: str, parent: list, mode: str | None = None) -> pl.Expr:
    """Nested ids keep their value; a globally unique id becomes its rank in the parent."""
    if mode is None:
        mode = label_mode(_n_unique(df, [col]), _n_unique(df, parent + [col]),
                          _n_unique(df, parent))
    if mode == "rank":
        return pl.col(col).rank("dense").over(parent).cast(pl.Int64)
    if mode == "one":
        return pl.lit(1, dtype=pl.Int64)
    return pl.col(col)


def prepare(df: pl.DataFrame, outcome: str, covariates: list, intercept: bool,
            levels: list, effects: dict, index: str | None = None,
            weights: str | None = None, design=None, label_modes: list | None = None,
            slots: pl.DataFrame | None = None, keys_only: bool = False) -> Prepared:
    """Build the CSR layout.

    levels:  list of id-column tuples, outermost first, e.g. [("k",), ("k","j")]
    effects: {level position: [effect names]} ("Intercept" or a covariate)
    design:  optional callable(df) -> (list of expressions, names) that replaces
             the plain fixed-effects design (used by group-specific coefficients).
    label_modes, slots, keys_only: for data split over several workers
             (mlsem.backends.dask), which must number slots and latents alike:
             the label mode per level below the top (see label_mode), the
             global slot table (the distinct slot keys, sorted), or return
             only this share's distinct slot keys.
    """
    level_cols = [lv[-1] for lv in levels]
    top = level_cols[0]
    used_x = [c for c in covariates]
    for eff in effects.values():
        used_x += [e for e in eff if e != "Intercept" and e not in used_x]
    if prepfast.applies(df, level_cols, index, label_modes, slots, keys_only):
        prep = prepfast.prepare_fast(df, outcome, covariates, intercept, levels, effects,
                                     weights, design, used_x)
        if prep is not None:
            return prep
    df = df.with_row_index(_ROW)
    # labels of the levels below the top, and the observation index
    lab_cols = []
    for d in range(1, len(levels)):
        parent = level_cols[:d]
        name = f"__lab{d}"
        mode = label_modes[d - 1] if label_modes is not None else None
        df = df.with_columns(_label_expr(df, level_cols[d], parent, mode).alias(name))
        lab_cols.append(name)
    if index is not None:
        keys = list(dict.fromkeys(level_cols + [index]))   # index may be a grouping column
        dup = df.filter(pl.struct(keys).is_duplicated())
        if dup.height:
            first = dup.row(0, named=True)
            key = ", ".join(f"{c}={first[c]!r}" for c in keys)
            why = (f" (index {index!r} is a grouping column of the formula: it cannot tell the "
                   f"observations of a group apart)" if index in level_cols else "")
            raise MlsemError(
                f"data: duplicate observations for ({key}) at rows "
                f"{_rows_text(dup[_ROW].to_list())}: index column {index!r} has the value "
                f"{first[index]!r} more than once in a group; each ({', '.join(keys)}) must be "
                f"unique{why}")
        df = df.with_columns(pl.col(index).alias("__obs"))
    else:
        # observation number within the innermost group, in row order: a stable
        # sort by the ids and the distance to the group's first row (about twice
        # as fast as a window expression over the ids on a million rows)
        rk = _radix_key(df, level_cols, 4 * df.height + 1024)
        if rk is None or np.any(rk[0][1:] < rk[0][:-1]):
            df = df.sort(level_cols, maintain_order=True)
        # else: integer ids already in order (files written sorted by their ids,
        # as the simulated ones): the stable sort would not move a row (3.6 s of
        # 27 s of prepare on 10M rows at load 10)
        idx = np.arange(df.height, dtype=np.int64)
        same = np.ones(df.height, dtype=bool)      # same group as the row before
        for c in level_cols:
            v = df[c].to_numpy()
            same[1:] &= v[1:] == v[:-1]
        same[0] = False
        first = np.maximum.accumulate(np.where(same, 0, idx))
        df = df.with_columns(pl.Series("__obs", idx - first + 1))
    # drop what cannot be used: null covariates (counted), null outcomes (missing cells)
    dropped = 0
    if used_x:
        keep = pl.all_horizontal([pl.col(c).is_not_null() for c in used_x])
        before = df.height
        df = df.filter(keep)
        dropped = before - df.height
    n_missing_y = int(df[outcome].null_count())
    df = df.filter(pl.col(outcome).is_not_null())
    if df.height == 0:
        raise MlsemError(f"data: no observation has both {outcome!r} and the covariates observed")
    # slots: distinct label tuples below the top, sorted
    slot_keys = lab_cols + ["__obs"]
    if keys_only:
        return df.select(slot_keys).unique()
    rk = _radix_key(df, slot_keys, 4 * df.height + 1024) if slots is None else None
    if rk is not None:
        # integer slot keys with a small range (the usual case): the distinct
        # keys by a flag array over their codes and each observation's slot by
        # a lookup, O(n), instead of unique + sort + a hash join on the key
        # columns (0.57 s on 1.15M rows); the same slot numbering (keys sorted)
        key, radices, offsets = rk
        seen = np.zeros(int(np.prod(radices, dtype=np.int64)), dtype=bool)
        seen[key] = True
        codes = np.flatnonzero(seen)
        slot_of_code = np.full(seen.shape[0], -1, dtype=np.int32)
        slot_of_code[codes] = np.arange(codes.shape[0], dtype=np.int32)
        cols, rest = {}, codes
        for c, r, lo in zip(reversed(slot_keys), reversed(radices), reversed(offsets)):
            cols[c] = pl.Series(c, rest % r + lo).cast(df[c].dtype)
            rest = rest // r
        slots = pl.DataFrame([cols[c] for c in slot_keys]).with_row_index("__slot")
        df = df.with_columns(pl.Series("__slot", slot_of_code[key]).cast(pl.UInt32))
    else:
        if slots is None:
            slots = df.select(slot_keys).unique().sort(slot_keys)
        slots = slots.with_row_index("__slot")
        df = df.join(slots, on=slot_keys, how="left")
    slot_lat, M, latent_names, latent_node, latent_term, level_labels = latents(
        slots, lab_cols, levels, level_cols, effects)
    P = slots.height
    nl = sum(len(effects.get(d, [])) for d in range(len(levels)))
    # rows and patterns
    per_row = df.group_by(top, maintain_order=True).agg(pl.col("__slot").sort().alias("__pat_slots"))
    has_slopes = any(e != "Intercept" for eff in effects.values() for e in eff)
    if has_slopes:
        # loadings depend on the row's covariates: each row is its own pattern
        per_row = per_row.sort(top).with_row_index("__pat")
    else:
        pats = per_row.select("__pat_slots").unique(maintain_order=True).with_row_index("__pat")
        per_row = per_row.join(pats, on="__pat_slots", how="left")
    per_row = per_row.select(top, "__pat").sort("__pat", top).with_row_index("__rowid")
    # one int64 key (row * P + slot) instead of a two-column sort: the
    # two-column sort encodes rows of both keys and was the most expensive step
    # of prepare (0.78 of 2.5 s on 1.15M rows, a busy machine)
    # only the row number joins the observations, and the observation index
    # (now in the slot table) leaves before the sort: fewer columns to reorder
    # and to hold at the peak of memory
    df = df.join(per_row.select(top, "__rowid"), on=top, how="left").drop("__obs")
    df = df.sort(pl.col("__rowid").cast(pl.Int64) * P + pl.col("__slot").cast(pl.Int64))
    nrows = per_row.height
    counts = np.bincount(df["__rowid"].to_numpy(), minlength=nrows)
    row_ptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    pat_of_row = per_row["__pat"].to_numpy()
    change = np.flatnonzero(np.diff(pat_of_row)) + 1
    pat_ptr = np.concatenate([[0], change, [nrows]]).astype(np.int64)
    # arrays
    y = df[outcome].cast(pl.Float64).to_numpy().copy()
    if design is not None:
        exprs, xnames = design(df)
    else:
        exprs, xnames = [], []
        if intercept:
            exprs.append(pl.lit(1.0).alias("Intercept"))
            xnames.append("Intercept")
        for c in covariates:
            exprs.append(pl.col(c).cast(pl.Float64).alias(c))
            xnames.append(c)
    X = np.empty((df.height, len(exprs)), dtype=np.float64)
    for c, ex in enumerate(exprs):
        X[:, c] = df.select(ex.cast(pl.Float64)).to_series().to_numpy() if not (
            xnames[c] == "Intercept" and design is None) else 1.0
    load = np.ones((df.height, max(nl, 1)), dtype=np.float64)
    k = 0
    for d in range(len(levels)):
        for e in effects.get(d, []):
            if e != "Intercept":
                load[:, k] = df[e].cast(pl.Float64).to_numpy()
            k += 1
    if weights is not None:
        wdf = df.group_by("__rowid").agg(pl.col(weights).first(), pl.col(weights).n_unique().alias("__nw")).sort("__rowid")
        wrow = wdf[weights].cast(pl.Float64).to_numpy().copy()
    else:
        wrow = np.ones(nrows)
    # group counts per level, for the summary
    # (df is sorted by row, then slot, and slots by their labels: a group of any
    # level is a run of equal (row, labels above it); labels are one-to-one with
    # the ids within their parent, so these are the groups of the id columns)
    infos = []
    brk = np.ones(df.height, dtype=bool)         # an observation starts a new group
    rid = df["__rowid"].to_numpy()
    brk[1:] = rid[1:] != rid[:-1]
    for d, lv in enumerate(levels):
        if d >= 1:
            lab = df[lab_cols[d - 1]].to_numpy()
            brk[1:] |= lab[1:] != lab[:-1]
        cnt = np.diff(np.append(np.flatnonzero(brk), df.height))
        infos.append(LevelInfo(level_cols[d], tuple(level_cols[: d + 1]), len(cnt),
                               int(cnt.min()), float(cnt.mean()), int(cnt.max())))
    slot_labels = slots.rename({c: level_cols[i + 1] for i, c in enumerate(lab_cols)}).rename({"__obs": "obs", "__slot": "slot"})
    top_ids = per_row[top]
    return Prepared(
        y=y, X=X, slot=df["__slot"].cast(pl.Int32).to_numpy().copy(), load=load,
        row_ptr=row_ptr, pat_ptr=pat_ptr, slot_lat=slot_lat, nlatent=M,
        latent_names=latent_names, latent_node=latent_node,
        latent_term=latent_term, slot_labels=slot_labels, level_labels=level_labels,
        top_ids=top_ids, obs_row=df[_ROW].to_numpy().copy(), wrow=wrow, levels=infos,
        xnames=xnames, nobs=df.height, dropped_covariate=dropped,
        missing_outcome=n_missing_y, max_row_obs=int(counts.max()),
        meta={"frame": df.select(level_cols + [_ROW, "__slot", "__rowid"] + lab_cols)})
