# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled linear passes of mlsem.data.prepfast (rows in id order).

Each function has a NumPy twin in mlsem.data.prepfast (``_np_*``) giving the
same arrays; tests/data/test_prepfast.py compares them.  Nothing here knows
about the model: these are run-length passes over integer arrays.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, int32_t, uint32_t, uint64_t

from libc.stdlib cimport malloc, free

cnp.import_array()


def level_pass(const int64_t[::1] v, uint8_t[::1] lvl, int d, int L):
    """One id column (level d) into ``lvl``: a row whose ids above d equal the
    previous row's (lvl == L) and whose id of level d differs gets lvl = d.
    Returns 1 if some such row has a smaller id than the previous row (the rows
    are not in lexicographic order of the ids), else 0."""
    cdef Py_ssize_t i, n = v.shape[0]
    cdef int unsorted = 0
    with nogil:
        for i in range(1, n):
            if lvl[i] == L and v[i] != v[i - 1]:
                lvl[i] = d
                if v[i] < v[i - 1]:
                    unsorted = 1
    return unsorted


def rank_and_obs(const uint8_t[::1] lvl, int d):
    """Per row: the dense rank (1, 2, ...) of its level-d group within its
    level-(d-1) group (d >= 1), or, with d = L, the row's number (1, 2, ...)
    within its innermost group (a group starts where lvl <= d - 1... see
    mlsem.data.prepfast._np_rank)."""
    cdef Py_ssize_t i, n = lvl.shape[0]
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef int64_t c = 0
    with nogil:
        for i in range(n):
            if lvl[i] < d:
                c = 1
            elif lvl[i] == d:
                c += 1
            o[i] = c
    return out


def run_stats(const uint8_t[::1] lvl, int L):
    """Per level d: (number, smallest, largest size) of the runs of rows
    (groups) that start where lvl <= d."""
    cdef Py_ssize_t i, n = lvl.shape[0]
    cdef int d
    ng = np.zeros(L, dtype=np.int64)
    mn = np.full(L, n + 1, dtype=np.int64)
    mx = np.zeros(L, dtype=np.int64)
    cur = np.zeros(L, dtype=np.int64)
    cdef int64_t[::1] g = ng, a = mn, b = mx, c = cur
    with nogil:
        for i in range(n + 1):
            for d in range(L):
                if i == n or lvl[i] <= d:
                    if i > 0:
                        if c[d] < a[d]:
                            a[d] = c[d]
                        if c[d] > b[d]:
                            b[d] = c[d]
                    if i < n:
                        g[d] += 1
                    c[d] = 0
                c[d] += 1
    return ng, mn, mx


def slot_codes(list cols, list offsets, list radices, int64_t size):
    """Each row's dense code of its tuple of columns (mixed radix over the
    value ranges, flags over the ``size`` codes), the number of distinct tuples
    and the first row of each: (codes int32, P, first rows int64)."""
    cdef Py_ssize_t i, n = len(cols[0]), P
    cdef int k, K = len(cols)
    if K > 8:
        raise ValueError("slot_codes: at most 8 columns")
    cdef const int64_t* vp[8]
    cdef int64_t lo[8]
    cdef int64_t rd[8]
    cdef const int64_t[::1] v
    for k in range(K):
        v = cols[k]
        vp[k] = &v[0]
        lo[k] = offsets[k]
        rd[k] = radices[k]
    lookup_a = np.full(size, -1, dtype=np.int64)
    cdef int64_t[::1] lookup = lookup_a
    cdef int64_t key, s
    with nogil:
        for i in range(n):
            key = 0
            for k in range(K):
                key = key * rd[k] + (vp[k][i] - lo[k])
            lookup[key] = 0
        P = 0
        for i in range(size):
            if lookup[i] == 0:
                lookup[i] = P
                P += 1
    codes_a = np.empty(n, dtype=np.int32)
    first_a = np.full(P, -1, dtype=np.int64)
    cdef int32_t[::1] codes = codes_a
    cdef int64_t[::1] first = first_a
    with nogil:
        for i in range(n):
            key = 0
            for k in range(K):
                key = key * rd[k] + (vp[k][i] - lo[k])
            s = lookup[key]
            codes[i] = <int32_t>s
            if first[s] < 0:
                first[s] = i
    return codes_a, P, first_a


def n_distinct(const int64_t[::1] v, int64_t lo, int64_t r):
    """Number of distinct values of ``v`` (all in lo .. lo + r - 1)."""
    cdef Py_ssize_t i, n = v.shape[0], c = 0
    seen_a = np.zeros(r, dtype=np.uint8)
    cdef uint8_t[::1] seen = seen_a
    with nogil:
        for i in range(n):
            if not seen[v[i] - lo]:
                seen[v[i] - lo] = 1
                c += 1
    return c


def unit_perm(const int64_t[::1] tstart, const int64_t[::1] row_order, const int64_t[::1] counts):
    """The rows of the units in the order ``row_order`` (each unit's rows kept
    in order): perm[row_ptr[u] + o] = tstart[row_order[u]] + o."""
    cdef Py_ssize_t u, o, p = 0, nu = row_order.shape[0], m = 0
    for u in range(nu):
        m += counts[u]
    out = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] perm = out
    cdef int64_t a
    with nogil:
        for u in range(nu):
            a = tstart[row_order[u]]
            for o in range(counts[u]):
                perm[p] = a + o
                p += 1
    return out


def gather_into(const double[::1] v, const int64_t[::1] perm, double[:, ::1] out, int col):
    """out[i, col] = v[perm[i]]."""
    cdef Py_ssize_t i, n = perm.shape[0]
    with nogil:
        for i in range(n):
            out[i, col] = v[perm[i]]


def unit_hash(const int32_t[::1] slot, const int64_t[::1] tstart, const uint64_t[::1] R):
    """Per unit (rows tstart[u] .. tstart[u+1]-1, the last to the end): the
    wrapping sum of R[slot] mixed with the count; and whether every unit's slots
    increase."""
    cdef Py_ssize_t u, i, nu = tstart.shape[0], n = slot.shape[0]
    cdef int64_t a, b
    cdef uint64_t h
    cdef int increasing = 1
    out = np.empty(nu, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    with nogil:
        for u in range(nu):
            a = tstart[u]
            b = tstart[u + 1] if u + 1 < nu else n
            h = 0
            for i in range(a, b):
                h += R[slot[i]]
                if i > a and slot[i] <= slot[i - 1]:
                    increasing = 0
            o[u] = h ^ (<uint64_t>(b - a) * <uint64_t>0x9E3779B97F4A7C15)
    return out, bool(increasing)


def same_slots(const int32_t[::1] slot, const int64_t[::1] tstart, const int64_t[::1] cnt,
               const int64_t[::1] rep_row):
    """Does every unit u have exactly the slots of unit rep_row[u]?"""
    cdef Py_ssize_t u, o, nu = tstart.shape[0]
    cdef int64_t a, b
    cdef int ok = 1
    with nogil:
        for u in range(nu):
            if rep_row[u] == u:
                continue
            if cnt[u] != cnt[rep_row[u]]:
                ok = 0
                break
            a = tstart[u]
            b = tstart[rep_row[u]]
            for o in range(cnt[u]):
                if slot[a + o] != slot[b + o]:
                    ok = 0
                    break
            if not ok:
                break
    return bool(ok)


# --- mprep2 --- several outcomes: the (unit, outcome) cells straight from the units --------------
# (mlsem.data.multivariate._cells_compiled; the reference is the stacked frame through
# prepare_fast, tests/data/test_multivariate_fast.py compares them field by field)

ctypedef fused index_t:
    uint32_t
    uint64_t


def slot_presence(const int32_t[::1] pslot, const uint8_t[:, ::1] okp, int64_t PP):
    """pres[s * nout + o] = 1 if some unit of unit slot s has outcome o observed."""
    cdef Py_ssize_t u, nu = pslot.shape[0]
    cdef int o, nout = okp.shape[1]
    if okp.shape[0] != nu:
        raise ValueError("slot_presence: okp must be (units, nout)")
    for u in range(nu):
        if pslot[u] < 0 or pslot[u] >= PP:
            raise ValueError("slot_presence: a unit slot out of range")
    out = np.zeros(PP * nout, dtype=np.uint8)
    cdef uint8_t[::1] pres = out
    with nogil:
        for u in range(nu):
            for o in range(nout):
                if okp[u, o]:
                    pres[<int64_t>pslot[u] * nout + o] = 1
    return out


def unit_cells_hash(const int32_t[::1] pslot, const uint8_t[:, ::1] okp,
                    const int32_t[::1] cslot_of, const int64_t[::1] tstart, const uint64_t[::1] R):
    """Per top-level unit (units tstart[r] .. tstart[r+1]-1): the wrapping sum of R over
    the slots of its observed cells (``cslot_of[pslot[u] * nout + o]``) mixed with their
    count (unit_hash of the cells), and the count: (hash uint64, cells int64)."""
    cdef Py_ssize_t r, u, nrows = tstart.shape[0] - 1
    cdef int o, nout = okp.shape[1]
    cdef int64_t cnt
    cdef uint64_t h
    if okp.shape[0] != pslot.shape[0] or tstart[0] != 0 or tstart[nrows] != pslot.shape[0]:
        raise ValueError("unit_cells_hash: shapes do not agree")
    out = np.empty(nrows, dtype=np.uint64)
    cnt_a = np.empty(nrows, dtype=np.int64)
    cdef uint64_t[::1] ho = out
    cdef int64_t[::1] co = cnt_a
    with nogil:
        for r in range(nrows):
            h = 0
            cnt = 0
            for u in range(tstart[r], tstart[r + 1]):
                for o in range(nout):
                    if okp[u, o]:
                        h += R[cslot_of[<int64_t>pslot[u] * nout + o]]
                        cnt += 1
            ho[r] = h ^ (<uint64_t>cnt * <uint64_t>0x9E3779B97F4A7C15)
            co[r] = cnt
    return out, cnt_a


def cell_run_stats(const uint8_t[::1] lvl, const uint8_t[:, ::1] okp, int L):
    """run_stats with each unit weighted by its observed cells: per level d (number,
    smallest, largest number of cells) of the groups that start where lvl <= d."""
    cdef Py_ssize_t i, n = lvl.shape[0]
    cdef int d, o, nout = okp.shape[1]
    cdef int64_t w
    if okp.shape[0] != n or L > 255:
        raise ValueError("cell_run_stats: one row of okp per unit")
    ng = np.zeros(L, dtype=np.int64)
    mn = np.full(L, np.iinfo(np.int64).max, dtype=np.int64)
    mx = np.zeros(L, dtype=np.int64)
    cur = np.zeros(L, dtype=np.int64)
    cdef int64_t[::1] g = ng, a = mn, b = mx, c = cur
    with nogil:
        for i in range(n + 1):
            w = 0
            if i < n:
                for o in range(nout):
                    w += okp[i, o]
            for d in range(L):
                if i == n or lvl[i] <= d:
                    if i > 0:
                        if c[d] < a[d]:
                            a[d] = c[d]
                        if c[d] > b[d]:
                            b[d] = c[d]
                    if i < n:
                        g[d] += 1
                    c[d] = 0
                c[d] += w
    return ng, mn, mx


def same_unit_cells(const int32_t[::1] pslot, const uint8_t[:, ::1] okp,
                    const int64_t[::1] tstart, const int64_t[::1] rep_row):
    """Does every top-level unit r have exactly the cells (unit slots and observed
    outcomes, in order) of unit rep_row[r]?"""
    cdef Py_ssize_t r, i, nrows = tstart.shape[0] - 1
    cdef int o, nout = okp.shape[1]
    cdef int64_t a, b, n
    cdef int ok = 1
    if rep_row.shape[0] != nrows:
        raise ValueError("same_unit_cells: one representative per unit")
    with nogil:
        for r in range(nrows):
            if rep_row[r] == r:
                continue
            a = tstart[r]
            b = tstart[rep_row[r]]
            n = tstart[r + 1] - a
            if n != tstart[rep_row[r] + 1] - b:
                ok = 0
                break
            for i in range(n):
                if pslot[a + i] != pslot[b + i]:
                    ok = 0
                    break
                for o in range(nout):
                    if okp[a + i, o] != okp[b + i, o]:
                        ok = 0
                        break
                if not ok:
                    break
            if not ok:
                break
    return bool(ok)


def fill_cells(const int64_t[::1] row_order, const int64_t[::1] tstart,
               const uint8_t[:, ::1] okp, const int32_t[::1] pslot, const int32_t[::1] cslot_of,
               const int64_t[::1] drow, const int64_t[::1] srow, int nout, list ys, list xcols, const int64_t[::1] xo0,
               const int64_t[::1] xst, list maps, const int64_t[::1] qoff, int32_t[::1] slot_out,
               double[::1] y_out, index_t[::1] obs_out, double[:, ::1] Xc_out):
    """The cells in the final order (the units of ``tstart``'s rows in ``row_order``, each
    row's units in order, each unit's observed outcomes in order): slot
    (``cslot_of[pslot[u] * nout + o]``), y (``ys[o]``
    at the unit's data row ``drow``), the stacked row (``srow * nout + o``; ``drow``,
    ``srow`` empty: the unit's own number) and the compact
    design (outcome o's columns j = ``qoff[o]`` .. ``qoff[o+1]`` first, zero after): column
    j's value at design row r is ``xcols[j][xo0[j] + r * xst[j]]``, r = ``maps[o][drow]``
    (``maps[o]`` empty: the data row itself)."""
    cdef Py_ssize_t nrows = row_order.shape[0], r, u, c = 0, m = slot_out.shape[0]
    cdef Py_ssize_t nu = okp.shape[0]
    cdef int o, a, j, qm = Xc_out.shape[1], q
    cdef int64_t src, xr
    if nout < 1 or nout > 64 or len(ys) != nout or len(maps) != nout or qoff.shape[0] != nout + 1:
        raise ValueError("fill_cells: one y and map per outcome (1 to 64)")
    q = <int>qoff[nout]
    if len(xcols) != q or xo0.shape[0] != q or xst.shape[0] != q or q > 4096:
        raise ValueError("fill_cells: one column, offset and stride per design column")
    if y_out.shape[0] != m or obs_out.shape[0] != m or Xc_out.shape[0] != m \
            or tstart.shape[0] != nrows + 1 or pslot.shape[0] != nu or okp.shape[1] != nout \
            or (drow.shape[0] != nu and drow.shape[0] != 0) \
            or (srow.shape[0] != nu and srow.shape[0] != 0):
        raise ValueError("fill_cells: shapes do not agree")
    cdef bint hasd = drow.shape[0] > 0, hass = srow.shape[0] > 0
    for o in range(nout):
        if qoff[o + 1] - qoff[o] > qm or qoff[o + 1] < qoff[o]:
            raise ValueError("fill_cells: an outcome has more columns than the compact design")
    for r in range(nrows):
        if row_order[r] < 0 or row_order[r] >= nrows or tstart[r] > tstart[r + 1]:
            raise ValueError("fill_cells: row_order or tstart out of range")
    if tstart[0] != 0 or tstart[nrows] != nu:
        raise ValueError("fill_cells: tstart is not a range of the units")
    cdef const double* yp[64]
    cdef const int64_t* mp[64]
    cdef const double** xp = <const double**>malloc(max(q, 1) * sizeof(double*))
    if xp == NULL:
        raise MemoryError()
    cdef const double[::1] yv
    cdef const int64_t[::1] mv
    try:
        for o in range(nout):
            yv = ys[o]
            yp[o] = &yv[0]
            mv = maps[o]
            mp[o] = &mv[0] if mv.shape[0] > 0 else NULL
        for j in range(q):
            yv = xcols[j]
            xp[j] = &yv[0]
        with nogil:
            for r in range(nrows):
                for u in range(tstart[row_order[r]], tstart[row_order[r] + 1]):
                    src = drow[u] if hasd else u
                    for o in range(nout):
                        if not okp[u, o] or c >= m:
                            continue
                        slot_out[c] = cslot_of[<int64_t>pslot[u] * nout + o]
                        y_out[c] = yp[o][src]
                        obs_out[c] = <index_t>((srow[u] if hass else u) * nout + o)
                        xr = mp[o][src] if mp[o] != NULL else src
                        a = 0
                        for j in range(<int>qoff[o], <int>qoff[o + 1]):
                            Xc_out[c, a] = xp[j][xo0[j] + xr * xst[j]]
                            a += 1
                        while a < qm:
                            Xc_out[c, a] = 0.0
                            a += 1
                        c += 1
    finally:
        free(xp)
    if c != m:
        raise ValueError(f"fill_cells: {c} cells written, {m} expected")
    return 0
# --- end mprep2 ---
