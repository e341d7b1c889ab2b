"""Data layer: the CSR layout's types (Prepared, LevelInfo) and the pieces both
prepare paths share (mlsem.data.prepare's Polars path, mlsem.data.prepfast's
NumPy/Cython path for integer ids): the label rule and the latents of a slot
table."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl


@dataclass
class LevelInfo:
    name: str                # the id column naming the level
    columns: tuple           # id columns identifying a group of this level
    ngroups: int
    min_obs: int
    mean_obs: float
    max_obs: int


@dataclass
class Prepared:
    """The compact arrays the kernel reads, plus what results need to say."""
    y: np.ndarray            # (nobs,)
    X: np.ndarray            # (nobs, q) C-contiguous
    slot: np.ndarray         # (nobs,) int32
    load: np.ndarray         # (nobs, nl) loadings on the slot's latents
    row_ptr: np.ndarray      # (nrows + 1,) int64
    pat_ptr: np.ndarray      # (npatterns + 1,) int64
    slot_lat: np.ndarray     # (P, nl) int32 global latent index, -1 none
    nlatent: int
    latent_names: list       # M names, e.g. "k", "j[1]"
    latent_node: np.ndarray  # (M,) node id per latent (latents of one node form a block)
    latent_term: list        # (level index, effect name) per latent
    slot_labels: pl.DataFrame  # P rows: slot, and the label of each level below the top + obs
    level_labels: list       # per level below the top: sorted label values
    top_ids: pl.Series       # id of each row of the CSR layout, in order
    obs_row: np.ndarray      # original row number of each observation (0-based)
    wrow: np.ndarray         # (nrows,) row weights
    levels: list             # LevelInfo, outermost first
    xnames: list
    nobs: int
    dropped_covariate: int   # observations dropped for a null covariate
    missing_outcome: int     # observations whose outcome is null (missing cells)
    max_row_obs: int
    meta: dict = field(default_factory=dict)

    @property
    def nrows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def npatterns(self) -> int:
        return len(self.pat_ptr) - 1

    @property
    def nslots(self) -> int:
        return self.slot_lat.shape[0]


def label_mode(n_id: int, n_pair: int, n_parent: int) -> str:
    """How a level's ids become slot labels, from the number of distinct ids,
    (parent, id) pairs and parents: "rank", "one" or "value"."""
    if n_id == n_pair and n_pair > n_parent:
        return "rank"     # every id value has one parent: a global id -> rank within the parent
    if n_id == n_pair:
        return "one"      # one group per parent: label 1 whatever the id
    return "value"


def latents(slots: pl.DataFrame, lab_cols: list, levels: list, level_cols: list, effects: dict):
    """(slot_lat, M, latent_names, latent_node, latent_term, level_labels) from the
    slot table (slot, labels below the top, obs; sorted by the labels)."""
    P = slots.height
    # latents: per level with effects, one block of len(effects) latents per node
    nl = sum(len(effects.get(d, [])) for d in range(len(levels)))
    slot_lat = np.full((P, max(nl, 1)), -1, dtype=np.int32)
    latent_names, latent_node, latent_term = [], [], []
    level_labels = []
    k = 0
    M = 0
    node_base = 0
    for d in range(len(levels)):
        if d >= 1:
            level_labels.append(slots[lab_cols[d - 1]].unique().sort().to_list())
        eff = effects.get(d, [])
        if not eff:
            continue
        node_cols = lab_cols[:d]
        if d == 0:
            node_of_slot = np.zeros(P, dtype=np.int64)
            node_labels = [()]
        else:
            nodes = slots.select(node_cols).unique().sort(node_cols).with_row_index("__node")
            node_of_slot = slots.join(nodes, on=node_cols, how="left").sort("__slot")["__node"].to_numpy()
            node_labels = [tuple(r) for r in nodes.select(node_cols).iter_rows()]
        nn = len(node_labels)
        for ni, lab in enumerate(node_labels):
            for ei, e in enumerate(eff):
                base = level_cols[d]
                suffix = "" if d == 0 else "[" + ",".join(str(v) for v in lab) + "]"
                latent_names.append(f"{base}{suffix}" if e == "Intercept" else f"{base}{suffix}:{e}")
                latent_node.append(node_base + ni)
                latent_term.append((d, e))
        for ei in range(len(eff)):
            slot_lat[:, k + ei] = M + node_of_slot * len(eff) + ei
        k += len(eff)
        M += nn * len(eff)
        node_base += nn
    return (slot_lat, M, latent_names, np.asarray(latent_node, dtype=np.int64), latent_term,
            level_labels)


class LazyMeta(dict):
    """``Prepared.meta``: a dict whose entries in ``lazy`` ({key: callable}) are
    built on first use (the frame of ids per observation is read by predictions
    and survey weights, not by a fit: building it eagerly took 0.47 s and ~400 MB
    on 10M rows).  Enumerating or pickling it builds every entry (it pickles as a
    plain dict)."""

    def __init__(self, lazy=None, **items):
        super().__init__(**items)
        self._lazy = dict(lazy or {})

    def _build(self, key):
        value = self._lazy.pop(key)()
        dict.__setitem__(self, key, value)
        return value

    def _build_all(self):
        for key in list(self._lazy):
            self._build(key)

    def __missing__(self, key):
        if key in self._lazy:
            return self._build(key)
        raise KeyError(key)

    def __contains__(self, key):
        return dict.__contains__(self, key) or key in self._lazy

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value):
        self._lazy.pop(key, None)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        if self._lazy.pop(key, None) is None or dict.__contains__(self, key):
            dict.__delitem__(self, key)

    def pop(self, key, *default):
        if key in self._lazy:
            self._build(key)
        return dict.pop(self, key, *default)

    def update(self, *args, **kw):
        for key, value in dict(*args, **kw).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def keys(self):
        self._build_all()
        return dict.keys(self)

    def values(self):
        self._build_all()
        return dict.values(self)

    def items(self):
        self._build_all()
        return dict.items(self)

    def __iter__(self):
        self._build_all()
        return dict.__iter__(self)

    def __len__(self):
        return dict.__len__(self) + len(self._lazy)

    def copy(self):
        self._build_all()
        return dict(self)

    def __eq__(self, other):
        self._build_all()
        return dict.__eq__(self, other)

    __hash__ = None

    def __repr__(self):
        return f"LazyMeta({dict.__repr__(self)}, lazy={sorted(self._lazy)})"

    def __reduce__(self):
        self._build_all()
        return (dict, (dict(self),))
