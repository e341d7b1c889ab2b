"""The worker side of the Dask backend (mlsem.backends.dask): the sources the
workers read, and the tasks that run on the workers -- read and bucket a file
by the top-level id, the id and label passes, prepare a partition (a
model.Model kept in worker memory, with the checksum of its data) and evaluate
it. Every function here is a plain task on plain inputs, so that Dask can
recompute a lost partition from its recipe.
"""
from __future__ import annotations

import glob as _glob
import os
import threading
import uuid

import numpy as np
import polars as pl

from ..data.prepare import CSV_NULLS, collect_columns, prepare, scan
from ..data.encode import factor_levels
from ..errors import MlsemError
from ..model.multilevel import Model

try:
    import distributed as _dd
except ImportError:  # pragma: no cover - exercised only without dask
    _dd = None


_NO_DATA = "data: no observation has both"


def sources(data) -> list:
    """The pieces the workers read: Parquet/CSV file paths (absolute, sorted as
    data.scan sorts them, so that "row order" means the same thing), a URL
    given as is, or one in-memory Polars DataFrame."""
    if isinstance(data, (list, tuple)):
        out = []
        for f in data:
            out += sources(f)
        return out
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if "://" in path:
            return _url_sources(path)
        if os.path.isdir(path):
            files = sorted(_glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            if not files:
                raise MlsemError(f"data: directory {path!r} holds no .parquet files")
        elif any(ch in path for ch in "*?["):
            files = sorted(_glob.glob(path, recursive=True))
            if not files:
                raise MlsemError(f"data: no file matches {path!r}")
        else:
            if not os.path.exists(path):
                raise MlsemError(f"data: file {path!r} does not exist")
            files = [path]
        return [os.path.abspath(f) for f in files]
    # in-memory data: collected once on the driver and shipped in the task
    # graph (so that a lost partition can still be rebuilt)
    return [scan(data).collect()]


def _url_sources(url: str) -> list:
    """A URL (s3://, gs://, file://, ...): a file, a directory or a glob,
    expanded with fsspec (a Dask dependency; s3fs/gcsfs for the clouds)."""
    try:
        import fsspec
        fs, _, paths = fsspec.core.get_fs_token_paths(url)
        if len(paths) == 1 and fs.isdir(paths[0]):
            paths = sorted(fs.glob(paths[0].rstrip("/") + "/**/*.parquet"))
    except Exception as exc:
        raise MlsemError(f"data: cannot list {url!r} ({type(exc).__name__}: {exc})") from None
    if not paths:
        raise MlsemError(f"data: no file matches {url!r}")
    return [fs.unstrip_protocol(p) for p in sorted(paths)]


def _lazy(src):
    """What collect_columns reads: a URL as a Polars scan, anything else as is."""
    if isinstance(src, str) and "://" in src:
        low = src.lower()
        if low.endswith(".csv") or low.endswith(".csv.gz"):
            return pl.scan_csv(src, null_values=CSV_NULLS)
        return pl.scan_parquet(src)
    return src


def _source_name(src) -> str:
    return src if isinstance(src, str) else "the in-memory data"


def _read_split(src, cols, numeric, ids, top, nparts):
    """Read one source projected on the model's columns; split its rows into
    ``nparts`` buckets by a hash of the top-level id (order kept)."""
    try:
        df = collect_columns(_lazy(src), cols, numeric, ids)
    except MlsemError as exc:
        raise MlsemError(f"{exc} (in {_source_name(src)})") from None
    b = df.select(pl.col(top).hash(seed=20240101) % nparts)
    b = b.to_series().to_numpy()
    return tuple(df.filter(pl.Series(b == p)) for p in range(nparts))


def _pick(parts, p):
    return parts[p]


def _concat(*buckets):
    return pl.concat(buckets, how="vertical") if len(buckets) > 1 else buckets[0]


def _id_stats(raw, level_cols):
    """Per level below the top: distinct ids, (parent, id) pairs and parents."""
    out = []
    for d in range(1, len(level_cols)):
        parent, col = level_cols[:d], level_cols[d]
        out.append((raw[col].unique(), raw.select(parent + [col]).n_unique(),
                    raw.select(parent).n_unique()))
    return raw.height, out


def _factor_pass(raw, enc):
    """Per factor column: its levels in this share's estimation rows and its
    type; and the number of those rows (mlsem.data.encode learns on the largest share)."""
    if raw.height == 0:
        return 0, {}
    factors, _ = enc._types(raw.schema)
    sub = raw.filter(enc._complete(raw, with_outcome=True))
    return sub.height, {c: (factor_levels(sub[c]), raw.schema[c]) for c in factors}


def _learn_encoding(raw, enc, levels):
    return enc.learn(raw, levels, check_rank=False)   # a share: rank is not judged on it


def _merge_levels(passes) -> dict:
    """The levels of every factor over the whole data set, ordered as
    mlsem.data.encode.factor_levels orders one column's."""
    out = {}
    cols = {c for _, f in passes for c in f}
    for c in cols:
        seen, dtype = [], None
        for _, f in passes:
            if c in f:
                lv, dtype = f[c]
                seen += [v for v in lv if v not in seen]
        if isinstance(dtype, pl.Enum):
            out[c] = [v for v in dtype.categories.to_list() if v in seen]
        else:
            out[c] = sorted(seen)
    return out


def _slot_keys(raw, args, modes):
    if raw.height == 0:
        return None
    raw = args["encoding"].apply(raw)
    try:
        return prepare(raw, *args["prepare"], index=args["index"], label_modes=modes, keys_only=True)
    except MlsemError as exc:
        if str(exc).startswith(_NO_DATA):
            return None
        raise


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(v):
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    v = v ^ (v >> np.uint64(30))
    v = v * _M1
    v = v ^ (v >> np.uint64(27))
    v = v * _M2
    return v ^ (v >> np.uint64(31))


def _checksum(prep) -> tuple:
    """The partition's size and a bit-exact digest of its observations that
    does not depend on their order (Polars may order patterns differently when
    a partition is rebuilt): the wrapping sum of a hash of each observation's
    (top-level id, slot, y, X row, loadings)."""
    top = prep.top_ids.hash(seed=7).to_numpy()
    with np.errstate(over="ignore"):
        h = _mix(np.repeat(top, np.diff(prep.row_ptr)) ^ _mix(
            prep.slot.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
        cols = [prep.y[:, None], prep.X, prep.load]
        for a in cols:
            a = np.ascontiguousarray(a, dtype=np.float64)
            for c in range(a.shape[1]):
                h = _mix(h ^ a[:, c].view(np.uint64))
        digest = int(np.sum(h, dtype=np.uint64))
    return int(prep.nobs), int(prep.nrows), digest


class _Part:
    """One partition's prepared data and model, held in a worker's memory."""

    def __init__(self, prep, table, backend, nthreads, base_table=None):
        if nthreads is None:
            try:
                nthreads = _dd.get_worker().state.nthreads
            except Exception:
                nthreads = 1
        self.model = Model(prep, table, backend=backend, nthreads=nthreads)
        # a relaxed model also keeps the mixed model's (its warm start), on the same data
        self.base_model = (None if base_table is None else
                           Model(prep, base_table, backend=backend, nthreads=nthreads))
        self.checksum = _checksum(prep)
        self.build = uuid.uuid4().hex
        self.lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.lock = threading.Lock()

    def __sizeof__(self):  # what Dask reports as this partition's memory
        arrays = list(vars(self.model.prep).values()) + list(vars(self.model).values())
        return int(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)) + 1000)


def _pattern_keys(prep) -> set:
    """The observed-slot set of each pattern (to count distinct patterns globally)."""
    first = prep.row_ptr[prep.pat_ptr[:-1]]
    last = prep.row_ptr[prep.pat_ptr[:-1] + 1]
    return {prep.slot[a:b].tobytes() for a, b in zip(first, last)}


def _summary(prep, slopes) -> dict:
    return {
        "patterns": None if slopes else _pattern_keys(prep),
        "xnames": list(prep.xnames), "latent_names": list(prep.latent_names),
        "latent_term": list(prep.latent_term), "latent_node": prep.latent_node,
        "nlatent": prep.nlatent, "nslots": prep.nslots, "slot_labels": prep.slot_labels,
        "slot_lat": prep.slot_lat,
        "level_labels": prep.level_labels, "levels": prep.levels, "nobs": prep.nobs,
        "nrows": prep.nrows, "npatterns": prep.npatterns,
        "dropped_covariate": prep.dropped_covariate, "missing_outcome": prep.missing_outcome,
    }


def _prepare_share(raw, args, modes, slots):
    """Prepare one partition against the global slot table."""
    if raw.height == 0:
        return None
    raw = args["encoding"].apply(raw)
    try:
        prep = prepare(raw, *args["prepare"], index=args["index"], label_modes=modes, slots=slots,
                       design=args.get("design"))
    except MlsemError as exc:
        if str(exc).startswith(_NO_DATA):
            return None
        raise
    prep.meta = {}
    return prep


def _part_summary(prep, slopes):
    return None if prep is None else _summary(prep, slopes)


def _make_part(prep, table, backend, nthreads, base_table=None):
    return None if prep is None else _Part(prep, table, backend, nthreads, base_table)


def _part_id(part):
    return part.checksum, part.build


def _part_eval(part, psi, need_grad, which="model"):
    with part.lock:
        ll, g = getattr(part, which).evaluate(psi, need_grad)
    return ll, g, part.checksum, part.build


def _part_hessian(part, psi, which="model"):
    with part.lock:
        out = getattr(part, which).phi_hessian(psi)
    ll, g, H = out if out is not None else (None, None, None)
    return ll, g, H, part.checksum, part.build


def _part_echo(part, psi, need_grad):
    """What an evaluation sends back, without the work (to time the round trip)."""
    return 0.0, np.zeros_like(psi), part.checksum, part.build


def _part_moments(part):
    p = part.model.prep
    return p.X.T @ p.X, p.X.T @ p.y, float(p.y @ p.y), float(p.y.sum()), p.X.sum(axis=0), p.nobs


def _part_rss(part, beta, center):
    p = part.model.prep
    r = (p.y - p.X @ beta) if len(beta) else p.y
    r = r - center
    return float(r @ r)
