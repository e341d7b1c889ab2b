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
