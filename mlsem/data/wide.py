"""Wide data for a general SEM (mlsem.sem) in the kernel's CSR layout: one row
per data row, one observation per observed cell (slot = endogenous observed
variable), rows sorted by missing-data pattern. The table is a
mlsem.spec.semtable.SemTable (read for the covariates each mean uses).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SemData:
    """The wide data in the kernel's CSR layout: one row per data row, one
    observation per observed cell (slot = endogenous observed variable)."""
    nrows: int
    nobs: int
    row_ptr: np.ndarray
    pat_ptr: np.ndarray
    slot: np.ndarray
    obs_row: np.ndarray
    y: np.ndarray
    X: np.ndarray          # (nrows, q) covariates, 0 where missing and unused
    wrow: np.ndarray
    max_row_obs: int
    dropped_cells: int
    dropped_rows: int
    data_row: np.ndarray   # original row number of each row


def used_covariates(table) -> np.ndarray:
    """(P, q) boolean: covariate c enters the mean of variable s."""
    P, M, q = table.P, table.M, table.q
    lam = np.zeros((P, M), dtype=bool)
    beta = np.zeros((M, M), dtype=bool)
    gy = np.zeros((P, q), dtype=bool)
    ge = np.zeros((M, q), dtype=bool)
    for e in table.entries:
        nz = e.full >= 0 or e.value != 0.0
        if not nz:
            continue
        if e.matrix == "lambda":
            lam[e.i, e.j] = True
        elif e.matrix == "beta":
            beta[e.i, e.j] = True
        elif e.matrix == "gy":
            gy[e.i, e.j] = True
        elif e.matrix == "geta":
            ge[e.i, e.j] = True
    reach = np.eye(M, dtype=bool)
    for _ in range(M):
        reach = reach | ((reach.astype(int) @ beta.astype(int)) > 0)
    lt = (lam.astype(int) @ reach.astype(int)) > 0
    return gy | ((lt.astype(int) @ ge.astype(int)) > 0)


def prepare_wide(table, Y: np.ndarray, X: np.ndarray) -> SemData:
    """Y (n x P) and X (n x q) with NaN for missing -> CSR layout sorted by pattern.

    A cell is observed when y is and every covariate its mean uses is; a row
    with no observed cell is dropped (lavaan drops it too)."""
    n, P = Y.shape
    obs = ~np.isnan(Y)
    U = used_covariates(table)
    dropped_cells = 0
    if table.q:
        xmiss = np.isnan(X)
        bad = (xmiss.astype(int) @ U.T.astype(int)) > 0      # (n, P): a used covariate is missing
        dropped_cells = int((obs & bad).sum())
        obs &= ~bad
    keep = np.flatnonzero(obs.any(axis=1))
    dropped_rows = n - len(keep)
    obs = obs[keep]
    packed = np.packbits(obs, axis=1)
    if packed.shape[1] <= 8:
        # up to 64 variables: each row's pattern as one big-endian integer (the
        # same order as the rows' bytes; np.unique(axis=0) cost ~2 ms cold)
        key = np.zeros((len(packed), 8), dtype=np.uint8)
        key[:, :packed.shape[1]] = packed
        _, inv = np.unique(key.view(">u8").ravel(), return_inverse=True)
    else:
        _, inv = np.unique(packed, axis=0, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    rows = keep[order]
    obs = obs[order]
    counts = obs.sum(axis=1)
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    pat = inv[order]
    change = np.flatnonzero(np.diff(pat)) + 1
    pat_ptr = np.concatenate([[0], change, [len(rows)]]).astype(np.int64)
    r_idx, s_idx = np.nonzero(obs)
    y = Y[rows][r_idx, s_idx].astype(np.float64)
    Xr = np.nan_to_num(X[rows], nan=0.0) if table.q else np.zeros((len(rows), 0))
    return SemData(nrows=len(rows), nobs=len(y), row_ptr=row_ptr, pat_ptr=pat_ptr,
                   slot=s_idx.astype(np.int32), obs_row=r_idx.astype(np.int64), y=y,
                   X=np.ascontiguousarray(Xr), wrow=np.ones(len(rows)),
                   max_row_obs=int(counts.max()) if len(counts) else 0,
                   dropped_cells=dropped_cells, dropped_rows=dropped_rows, data_row=rows)
