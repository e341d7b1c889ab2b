# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled linear passes of mlsem.data.prepfast (rows in id order).

Each function has a NumPy twin in mlsem.data.prepfast (``_np_*``) giving the
same arrays; tests/data/test_prepfast.py compares them.  Nothing here knows
about the model: these are run-length passes over integer arrays.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, int32_t, uint64_t

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
