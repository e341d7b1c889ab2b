# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Per-pattern Gaussian FIML kernel (DESIGN.md section 5).

Two paths over the same CSR layout (rows grouped by missing pattern):

* ``factor_loglik``: Theta diagonal; Sigma_o = Lambda_o F F' Lambda_o' + Theta_o (F any factor of Phi whose
  nonzeros stay inside the latent blocks [blk_start, blk_end))
  handled through the Woodbury identity with a (c x c) matrix
  K = I + F_o' A F_o, A = Lambda_o' Theta_o^-1 Lambda_o.
* ``dense_loglik``: any Sigma_o = Lambda_o Phi Lambda_o' + Theta_oo, one
  Cholesky factorisation per pattern (LAPACK dpotrf) and two triangular solves
  per row.

Both return, per thread, the log-likelihood, dl/dPhi (M x M, every entry treated
as a separate argument, so the matrix is symmetric), dl/dTheta and, per
observation, the weighted w = wrow * Sigma_o^-1 (y_o - mu_o) = dl/dmu.  The chain
rule to parameters is the caller's (mlsem.model).  The NumPy oracle in
``mlsem._oracle`` computes the same quantities and is what the tests compare
against.

Conventions: caller-allocated outputs, no Python objects in the loops, the
pattern loop in ``nogil`` with ``prange`` (OpenMP when the build has it).  A
non-positive residual variance or a failed factorisation sets ``status`` != 0 so
that the optimiser backs off; no NaN is produced.
"""
from cython.parallel cimport prange, parallel, threadid
import numpy as np
from libc.math cimport log, sqrt
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset
from scipy.linalg.cython_lapack cimport dpotrf, dpotri
from scipy.linalg.cython_blas cimport dtrsv

cdef extern from *:
    """
    #ifdef _OPENMP
    #define MLSEM_HAVE_OPENMP 1
    #else
    #define MLSEM_HAVE_OPENMP 0
    #endif
    """
    int MLSEM_HAVE_OPENMP

HAVE_OPENMP = bool(MLSEM_HAVE_OPENMP)

cdef double LOG2PI = 1.8378770664093453


cdef inline int chol_lower(double* K, int c) noexcept nogil:
    """In-place Cholesky of the row-major c x c matrix K (lower triangle used).
    Returns 0 on success, 1 if not positive definite."""
    cdef int i, j, k
    cdef double s
    for j in range(c):
        s = K[j * c + j]
        for k in range(j):
            s -= K[j * c + k] * K[j * c + k]
        if not (s > 0.0):
            return 1
        s = sqrt(s)
        K[j * c + j] = s
        for i in range(j + 1, c):
            K[i * c + j] = K[i * c + j]
            for k in range(j):
                K[i * c + j] -= K[i * c + k] * K[j * c + k]
            K[i * c + j] /= s
    return 0


cdef void hess_accum(int m, const int* glob, const double* S, const double* U, double wsum,
                     const int* hidx, int M, double* H, int nh, int* ent, double* R) noexcept nogil:
    """One pattern's share of d2l / dpsi_k dpsi_l for the parameters linear in Phi,
    summed into H (nh x nh); k = hidx[a * M + b] >= 0 is the parameter of Phi
    entry (a, b) (symmetric).  With S = Lambda' Sigma^-1 Lambda (m x m),
    U = sum_r w_r u u' (u = Lambda' Sigma^-1 e) and wsum = sum_r w_r, every entry of
    Phi a separate argument:  d2l / dPhi_ab dPhi_cd = wsum/2 S_bc S_ad
    - 1/2 (S_ac U_db + S_bc U_ad).  Summed over the orderings of {a, b} and {c, d}
    (half for a diagonal entry) with R = wsum/2 S - U this is
    S_ac R_bd + R_ac S_bd + S_ad R_bc + R_ad S_bc: O(e^2 / 2) work for the e
    entries a <= b that carry a parameter.  R: m x m scratch."""
    cdef int a, b, c, d, e1, e2, k1, k2, ne = 0
    cdef int* ea = ent
    cdef int* eb = ent + m * m
    cdef int* ek = ent + 2 * m * m
    cdef double hw = 0.5 * wsum, val, f1
    for a in range(m * m):
        R[a] = hw * S[a] - U[a]
    for a in range(m):
        for b in range(a, m):
            k1 = hidx[glob[a] * M + glob[b]]
            if k1 >= 0:
                ea[ne] = a
                eb[ne] = b
                ek[ne] = k1
                ne += 1
    for e1 in range(ne):
        a = ea[e1]
        b = eb[e1]
        k1 = ek[e1]
        f1 = 0.5 if a == b else 1.0
        for e2 in range(e1, ne):
            c = ea[e2]
            d = eb[e2]
            k2 = ek[e2]
            val = (S[a * m + c] * R[b * m + d] + R[a * m + c] * S[b * m + d]
                   + S[a * m + d] * R[b * m + c] + R[a * m + d] * S[b * m + c])
            val *= f1
            if c == d:
                val *= 0.5
            H[k1 * nh + k2] += val
            if e2 != e1:
                H[k2 * nh + k1] += val


cdef void grad_tail(int m, const int* glob, const double* S, const double* U, double wsum,
                    double* gphi, int M, int n, const int[::1] slot, long long o0,
                    const double* W2, const double* sinv, double* gth,
                    const int* hidx, double* hphi, int nh, double* R, int* ent) noexcept nogil:
    """The end of every factor path, from one pattern's S = Lambda' Sigma^-1 Lambda,
    U = sum_r w_r u u', wsum, W2 and diag(Sigma^-1) (sinv): dl/dPhi += (U - wsum S)/2,
    dl/dtheta += (W2 - wsum sinv)/2, and in Hessian mode (hphi not NULL) the exact
    d2l/dPhi2 block (hess_accum; R: m x m scratch)."""
    cdef int a, a2, t
    for a in range(m):
        for a2 in range(m):
            gphi[glob[a] * M + glob[a2]] += 0.5 * U[a * m + a2] - 0.5 * wsum * S[a * m + a2]
    for t in range(n):
        gth[slot[o0 + t]] += 0.5 * W2[t] - 0.5 * wsum * sinv[t]
    if hphi != NULL:
        hess_accum(m, glob, S, U, wsum, hidx, M, hphi, nh, ent, R)


def _check_layout(const long long[::1] pat_ptr, const long long[::1] row_ptr,
                  const int[::1] slot, Py_ssize_t nobs, Py_ssize_t nrows_w, int P,
                  const int[:, ::1] slot_lat, int nl, int M, int maxn, int same_slots):
    """The CSR layout the kernels index without bounds checks (issue 13): pattern
    and row pointers nondecreasing and inside their arrays, every row of a pattern
    with the pattern's number of observations (and, when ``same_slots``, its
    slots), at most ``maxn`` of them, slots in [0, P) and in slot_lat, slot_lat
    entries in [-1, M).  Raises ValueError naming what is wrong; O(observations)."""
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1, nrows = row_ptr.shape[0] - 1, p, r, t
    cdef long long o0, o, n, n0
    cdef int s, k, g
    if npat < 0 or nrows < 0:
        raise ValueError("pat_ptr and row_ptr need at least one entry")
    if npat == 0:
        return
    if pat_ptr[0] < 0 or pat_ptr[npat] > nrows:
        raise ValueError(f"pat_ptr spans rows {pat_ptr[0]}..{pat_ptr[npat]}, outside the "
                         f"{nrows} rows of row_ptr")
    if nrows_w < pat_ptr[npat]:
        raise ValueError(f"wrow has {nrows_w} entries for rows up to {pat_ptr[npat]}")
    if slot_lat.shape[1] < nl:
        raise ValueError(f"slot_lat has {slot_lat.shape[1]} columns, load {nl}")
    for s in range(slot_lat.shape[0]):
        for k in range(slot_lat.shape[1]):
            g = slot_lat[s, k]
            if g < -1 or g >= M:
                raise ValueError(f"slot_lat[{s}, {k}] = {g} is not a latent index in [-1, {M})")
    for p in range(npat):
        if pat_ptr[p + 1] < pat_ptr[p]:
            raise ValueError(f"pat_ptr decreases at pattern {p}")
        if pat_ptr[p + 1] == pat_ptr[p]:
            continue
        r = pat_ptr[p]
        o0 = row_ptr[r]
        n0 = row_ptr[r + 1] - o0
        if n0 > maxn:
            raise ValueError(f"row {r} has {n0} observations, more than maxn = {maxn}")
        for r in range(pat_ptr[p], pat_ptr[p + 1]):
            o = row_ptr[r]
            n = row_ptr[r + 1] - o
            if o < 0 or n < 0 or row_ptr[r + 1] > nobs:
                raise ValueError(f"row_ptr[{r}:{r + 2}] = ({o}, {row_ptr[r + 1]}) is not a "
                                 f"range of the {nobs} observations")
            if n != n0:
                raise ValueError(f"row {r} has {n} observations, its pattern {p} {n0}")
            for t in range(n):
                s = slot[o + t]
                if s < 0 or s >= P or s >= slot_lat.shape[0]:
                    raise ValueError(f"slot[{o + t}] = {s} is not a slot index in [0, "
                                     f"{min(P, slot_lat.shape[0])})")
                if same_slots and s != slot[o0 + t]:
                    raise ValueError(f"row {r} does not have the slots of its pattern {p}")


cdef int USE_ARROWHEAD = 1


cdef int USE_SINGLE = 1


def set_single(bint enabled):
    """Enable (default) or disable the one-latent-per-slot fast path of the factor
    kernel (for tests and before/after benchmarks); returns the previous setting."""
    global USE_SINGLE
    cdef int old = USE_SINGLE
    USE_SINGLE = 1 if enabled else 0
    return bool(old)


def set_arrowhead(bint enabled):
    """Enable (default) or disable the arrowhead fast path of the factor kernel
    (for tests and before/after benchmarks); returns the previous setting."""
    global USE_ARROWHEAD
    cdef int old = USE_ARROWHEAD
    USE_ARROWHEAD = 1 if enabled else 0
    return bool(old)


cdef int arrow_pattern(
        Py_ssize_t p,
        const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid,
        const double[:, ::1] load, const double[:, ::1] F,
        const double[::1] wrow, double[::1] w_out, double* ll, double* gphi, double* gth,
        int M, int need_grad, int n, int m, double logth,
        const int* glob, const int* latloc,
        double* Dv, double* sinv, double* W2, double* dvec,
        double* A0, double* Ad, double* fv, double* gs, double* td, double* ag,
        double* U, double* b, double* h, double* u,
        const int* hidx, double* hphi, int nh, double* hS, int* ent, int unit) noexcept nogil:
    """Nested random intercepts (every slot loads on the pattern's one top latent,
    local index 0, and on one lower latent; F diagonal there): A = Lambda_o' D Lambda_o
    is an arrowhead matrix, and so is K = I + F A F.  With s = K00 - v' Dg^-1 v,
    K^-1 = diag(0, Dg^-1) + z z' / s, so T = F K^-1 F = diag(td) + gs gs' (diagonal
    plus rank one): O(m) per row and O(m^2) per pattern instead of O(m^3).
    Same outputs as the generic path (factor_pattern)."""
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef long long o0 = row_ptr[r0], o
    cdef int t, a, a2
    cdef double sK, logdet, acc, e, d, wt, wr, wsum = 0.0, quad, gb, llp = 0.0, l0, l1, va, da
    cdef double b0, bacc
    cdef int cur
    # A (arrowhead): A0[0] = A00, A0[a] = A0a; Ad[a] = Aaa (a >= 1)
    for a in range(m):
        A0[a] = 0.0
        Ad[a] = 0.0
        fv[a] = F[glob[a], glob[a]]
    for t in range(n):
        a = latloc[2 * t + 1]
        l0 = load[o0 + t, 0]
        l1 = load[o0 + t, 1]
        A0[0] += Dv[t] * l0 * l0
        A0[a] += Dv[t] * l0 * l1
        Ad[a] += Dv[t] * l1 * l1
    # K = I + F A F: k0 = 1 + f0^2 A00, v_a = f0 f_a A0a, Dg_a = 1 + f_a^2 Aaa
    sK = 1.0 + fv[0] * fv[0] * A0[0]
    logdet = logth
    gs[0] = fv[0]
    td[0] = 0.0
    for a in range(1, m):
        va = fv[0] * fv[a] * A0[a]
        da = 1.0 + fv[a] * fv[a] * Ad[a]
        logdet += log(da)
        sK -= va * va / da
        td[a] = fv[a] * fv[a] / da
        gs[a] = -fv[a] * va / da
    if not (sK > 0.0):
        return 2
    logdet += log(sK)
    acc = 1.0 / sqrt(sK)
    for a in range(m):
        gs[a] *= acc
    if need_grad:
        # diag of Sigma^-1: D_t - D_t^2 lambda_t' T lambda_t
        for t in range(n):
            a = latloc[2 * t + 1]
            l0 = load[o0 + t, 0]
            l1 = load[o0 + t, 1]
            acc = l0 * gs[0] + l1 * gs[a]
            sinv[t] = Dv[t] - Dv[t] * Dv[t] * (acc * acc + l1 * l1 * td[a])
            W2[t] = 0.0
        for a in range(m * m):
            U[a] = 0.0
    for r in range(r0, r1):
        o = row_ptr[r]
        wr = wrow[r]
        quad = 0.0
        for a in range(m):
            b[a] = 0.0
        # slots are sorted, so a lower latent's observations are consecutive:
        # accumulate in registers (b0, bacc), not through memory
        b0 = 0.0
        bacc = 0.0
        cur = latloc[1]
        for t in range(n):
            e = resid[o + t]
            d = Dv[t] * e
            dvec[t] = d
            quad += e * d
            b0 += (1.0 if unit else load[o + t, 0]) * d
            a = latloc[2 * t + 1]
            if a != cur:
                b[cur] += bacc
                bacc = 0.0
                cur = a
            bacc += (1.0 if unit else load[o + t, 1]) * d
        b[cur] += bacc
        b[0] = b0
        gb = 0.0
        for a in range(m):
            gb += gs[a] * b[a]
        for a in range(m):
            h[a] = td[a] * b[a] + gs[a] * gb
            quad -= b[a] * h[a]
        llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
        wsum += wr
        if need_grad:
            for a in range(m):
                u[a] = 0.0
            b0 = 0.0
            bacc = 0.0
            cur = latloc[1]
            for t in range(n):
                a = latloc[2 * t + 1]
                if unit:
                    wt = dvec[t] - Dv[t] * (h[0] + h[a])
                else:
                    wt = dvec[t] - Dv[t] * (load[o + t, 0] * h[0] + load[o + t, 1] * h[a])
                w_out[o + t] = wr * wt
                W2[t] += wr * wt * wt
                b0 += (1.0 if unit else load[o + t, 0]) * wt
                if a != cur:
                    u[cur] += bacc
                    bacc = 0.0
                    cur = a
                bacc += (1.0 if unit else load[o + t, 1]) * wt
            u[cur] += bacc
            u[0] = b0
            for a in range(m):
                acc = wr * u[a]
                for a2 in range(m):
                    U[a * m + a2] += acc * u[a2]
    ll[0] += llp
    if need_grad:
        # ASA = A - A T A = A - A diag(td) A - ag ag', ag = A gs
        ag[0] = A0[0] * gs[0]
        for a in range(1, m):
            ag[0] += A0[a] * gs[a]
            ag[a] = A0[a] * gs[0] + Ad[a] * gs[a]
        # A diag(td) A: [0,0] = sum A0a^2 td_a; [0,a] = A0a td_a Aaa; [a,a] = Aaa^2 td_a
        acc = 0.0
        for a in range(1, m):
            acc += A0[a] * A0[a] * td[a]
        # S = Lambda' Sigma^-1 Lambda written out (O(m^2)) into the scratch hS
        hS[0] = A0[0] - acc - ag[0] * ag[0]
        for a in range(1, m):
            d = A0[a] - A0[a] * td[a] * Ad[a] - ag[0] * ag[a]
            hS[a] = d
            hS[a * m] = d
            for a2 in range(1, m):
                d = -ag[a] * ag[a2]
                if a2 == a:
                    d += Ad[a] - Ad[a] * Ad[a] * td[a]
                hS[a * m + a2] = d
        grad_tail(m, glob, hS, U, wsum, gphi, M, n, slot, o0, W2, sinv, gth,
                  hidx, hphi, nh, hS + m * m, ent)
    return 0


cdef inline double apply_T(const double* T, const double* b, double* h, int m) noexcept nogil:
    """h = T b (m x m times m); returns b' T b."""
    cdef int a, a2
    cdef double acc, q = 0.0
    for a in range(m):
        acc = 0.0
        for a2 in range(m):
            acc += T[a * m + a2] * b[a2]
        h[a] = acc
        q += b[a] * acc
    return q


cdef int woodbury_T(double* K, const double* Lp, double* Z, double* T, int m, int c,
                    double* logdet) noexcept nogil:
    """From K = I + Lp' A Lp (c x c, overwritten by its Cholesky factor C): adds
    log|K| to logdet and fills T = Lp K^-1 Lp' (m x m) through Z = C^-1 Lp'
    (c x m).  Returns 2 if K is not positive definite."""
    cdef int a, a2, j, j2
    cdef double acc
    if chol_lower(K, c) != 0:
        return 2
    for j in range(c):
        logdet[0] += 2.0 * log(K[j * c + j])
    for a in range(m):
        for j in range(c):
            acc = Lp[a * c + j]
            for j2 in range(j):
                acc -= K[j * c + j2] * Z[j2 * m + a]
            Z[j * m + a] = acc / K[j * c + j]
    for a in range(m):
        for a2 in range(a + 1):
            acc = 0.0
            for j in range(c):
                acc += Z[j * m + a] * Z[j * m + a2]
            T[a * m + a2] = acc
            T[a2 * m + a] = acc
    return 0


cdef int single_pattern(
        Py_ssize_t p,
        const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid, const double[:, ::1] load,
        const double[::1] wrow, double[::1] w_out, double* ll, double* gphi, double* gth,
        int M, int need_grad, int n, int m, int c, double logth,
        const int* glob, const int* latloc,
        double* Dv, double* sinv, double* W2, double* dvec, const double* Lp,
        double* Ad, double* K, double* Z, double* T, double* S,
        double* U, double* b, double* h, double* u,
        const int* hidx, double* hphi, int nh, double* hS, int* ent, int unit) noexcept nogil:
    """Every slot loads on exactly one latent (independent or correlated effects of
    one level, no effect above them): A = Lambda_o' D Lambda_o is diagonal (Ad), so
    K = I + Lp' diag(Ad) Lp, S = Lambda' Sigma^-1 Lambda = diag(Ad) - diag(Ad) T
    diag(Ad) in O(m^2), and u = Lambda' Sigma^-1 e = b - Ad * h needs no second
    sum over the observations.  A latent's observations are summed in a register
    (consecutive when the slots are sorted; correct in any order).  Same outputs
    as the generic path."""
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef long long o0 = row_ptr[r0], o
    cdef int t, a, a2, j, j2, cur
    cdef double acc, logdet, quad, wr, wsum = 0.0, e, d, wt, l, llp = 0.0, bacc
    for a in range(m):
        Ad[a] = 0.0
    for t in range(n):
        l = load[o0 + t, 0]
        Ad[latloc[t]] += Dv[t] * l * l
    # K = I + Lp' diag(Ad) Lp (c x c)
    for j in range(c):
        for j2 in range(j + 1):
            acc = 0.0
            for a in range(m):
                acc += Lp[a * c + j] * Ad[a] * Lp[a * c + j2]
            K[j * c + j2] = acc
            K[j2 * c + j] = acc
        K[j * c + j] += 1.0
    logdet = logth
    if woodbury_T(K, Lp, Z, T, m, c, &logdet) != 0:
        return 2
    if need_grad:
        for a in range(m):
            for a2 in range(m):
                S[a * m + a2] = -Ad[a] * T[a * m + a2] * Ad[a2]
                U[a * m + a2] = 0.0
            S[a * m + a] += Ad[a]
        for t in range(n):
            l = load[o0 + t, 0]
            sinv[t] = Dv[t] - Dv[t] * Dv[t] * l * l * T[latloc[t] * (m + 1)]
            W2[t] = 0.0
    for r in range(r0, r1):
        o = row_ptr[r]
        wr = wrow[r]
        quad = 0.0
        for a in range(m):
            b[a] = 0.0
        bacc = 0.0
        cur = latloc[0]
        for t in range(n):
            e = resid[o + t]
            d = Dv[t] * e
            dvec[t] = d
            quad += e * d
            a = latloc[t]
            if a != cur:
                b[cur] += bacc
                bacc = 0.0
                cur = a
            bacc += (1.0 if unit else load[o + t, 0]) * d
        b[cur] += bacc
        quad -= apply_T(T, b, h, m)
        llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
        wsum += wr
        if need_grad:
            for t in range(n):
                wt = dvec[t] - Dv[t] * (1.0 if unit else load[o + t, 0]) * h[latloc[t]]
                w_out[o + t] = wr * wt
                W2[t] += wr * wt * wt
            for a in range(m):
                u[a] = b[a] - Ad[a] * h[a]
            for a in range(m):
                acc = wr * u[a]
                for a2 in range(m):
                    U[a * m + a2] += acc * u[a2]
    ll[0] += llp
    if need_grad:
        grad_tail(m, glob, S, U, wsum, gphi, M, n, slot, o0, W2, sinv, gth,
                  hidx, hphi, nh, hS + m * m, ent)
    return 0


cdef int factor_pattern(
        Py_ssize_t p,
        const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid,
        const double[:, ::1] load, const int[:, ::1] slot_lat,
        const double[:, ::1] F, const int[::1] blk_start, const int[::1] blk_end,
        const double[::1] theta, const double[::1] wrow,
        double[::1] w_out, double* ll, double* gphi, double* gth,
        int M, int need_grad,
        int* loc, int* colloc, int* glob, int* colglob, int* latloc,
        double* Dv, double* sinv, double* W2, double* dvec,
        double* Lp, double* A, double* AL, double* K, double* Z, double* T,
        double* ASA, double* U, double* b, double* h, double* u,
        const double* thinfo,
        const int* hidx, double* hphi, int nh, double* hS, int* ent, int unit) noexcept nogil:
    # thinfo: 1 / theta_s (P values), then log theta_s (P values), once per evaluation
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef int P = theta.shape[0]
    cdef long long o0 = row_ptr[r0], o
    cdef int n = <int>(row_ptr[r0 + 1] - o0)
    cdef int nl = load.shape[1]
    cdef int m = 0, c = 0, t, k, k2, a, a2, g, g2, j, j2, s, status = 0, arrow, single
    cdef double th, logth = 0.0, logdet, la, quad0, quad, wr, wsum = 0.0, acc, e, d, wt
    cdef double llp = 0.0
    # slots, inverse residual variances, local latents
    for t in range(n):
        s = slot[o0 + t]
        th = theta[s]
        if not (th > 0.0):
            status = 1
            break
        Dv[t] = thinfo[s]
        logth += thinfo[P + s]
        for k in range(nl):
            g = slot_lat[s, k]
            if g < 0:
                latloc[t * nl + k] = -1
                continue
            if loc[g] < 0:
                loc[g] = m
                glob[m] = g
                m += 1
            latloc[t * nl + k] = loc[g]
    if status == 0 and USE_ARROWHEAD and nl == 2:
        arrow = 1
        for t in range(n):
            if latloc[2 * t] != 0 or latloc[2 * t + 1] < 1:
                arrow = 0
                break
        if arrow:
            for a in range(m):
                g = glob[a]
                if blk_end[g] - blk_start[g] != 1:
                    arrow = 0
                    break
        if arrow:
            status = arrow_pattern(p, pat_ptr, row_ptr, slot, resid, load, F, wrow, w_out,
                                   ll, gphi, gth, M, need_grad, n, m, logth, glob, latloc,
                                   Dv, sinv, W2, dvec, A, AL, K, Z, T, ASA, U, b, h, u,
                                   hidx, hphi, nh, hS, ent, unit)
            for a in range(m):
                loc[glob[a]] = -1
            return status
    if status == 0:
        # columns of F that the touched latents use
        for a in range(m):
            g = glob[a]
            for g2 in range(blk_start[g], blk_end[g]):
                if F[g, g2] != 0.0 and colloc[g2] < 0:
                    colloc[g2] = c
                    colglob[c] = g2
                    c += 1
        for a in range(m):
            for j in range(c):
                Lp[a * c + j] = F[glob[a], colglob[j]]
        single = nl == 1 and USE_SINGLE
        if single:
            for t in range(n):
                if latloc[t] < 0:
                    single = 0
                    break
        if single:
            status = single_pattern(p, pat_ptr, row_ptr, slot, resid, load, wrow, w_out,
                                    ll, gphi, gth, M, need_grad, n, m, c, logth, glob, latloc,
                                    Dv, sinv, W2, dvec, Lp, A, K, Z, T, ASA, U, b, h, u,
                                    hidx, hphi, nh, hS, ent, unit)
            for a in range(m):
                loc[glob[a]] = -1
            for j in range(c):
                colloc[colglob[j]] = -1
            return status
        # A = Lambda_o' D Lambda_o
        memset(A, 0, m * m * sizeof(double))
        for t in range(n):
            for k in range(nl):
                a = latloc[t * nl + k]
                if a < 0:
                    continue
                la = load[o0 + t, k] * Dv[t]
                for k2 in range(nl):
                    a2 = latloc[t * nl + k2]
                    if a2 >= 0:
                        A[a * m + a2] += la * load[o0 + t, k2]
        # AL = A Lp (m x c); K = I + Lp' AL (c x c)
        for a in range(m):
            for j in range(c):
                acc = 0.0
                for a2 in range(m):
                    acc += A[a * m + a2] * Lp[a2 * c + j]
                AL[a * c + j] = acc
        for j in range(c):
            for j2 in range(j + 1):
                acc = 0.0
                for a in range(m):
                    acc += Lp[a * c + j] * AL[a * c + j2]
                K[j * c + j2] = acc
                K[j2 * c + j] = acc
            K[j * c + j] += 1.0
        logdet = logth
        status = woodbury_T(K, Lp, Z, T, m, c, &logdet)
    if status == 0:
        if need_grad:
            # ASA = A - A T A = Lambda' Sigma^-1 Lambda ; reuse AL as AT (m x m)
            for a in range(m):
                for a2 in range(m):
                    acc = 0.0
                    for j in range(m):
                        acc += A[a * m + j] * T[j * m + a2]
                    AL[a * m + a2] = acc
            for a in range(m):
                for a2 in range(m):
                    acc = 0.0
                    for j in range(m):
                        acc += AL[a * m + j] * A[j * m + a2]
                    ASA[a * m + a2] = A[a * m + a2] - acc
                    U[a * m + a2] = 0.0
            # diag of Sigma^-1: D_t - D_t^2 lambda_t' T lambda_t
            for t in range(n):
                acc = 0.0
                for k in range(nl):
                    a = latloc[t * nl + k]
                    if a < 0:
                        continue
                    for k2 in range(nl):
                        a2 = latloc[t * nl + k2]
                        if a2 >= 0:
                            acc += load[o0 + t, k] * load[o0 + t, k2] * T[a * m + a2]
                sinv[t] = Dv[t] - Dv[t] * Dv[t] * acc
                W2[t] = 0.0
        # rows of the pattern
        for r in range(r0, r1):
            o = row_ptr[r]
            wr = wrow[r]
            quad0 = 0.0
            for a in range(m):
                b[a] = 0.0
            for t in range(n):
                e = resid[o + t]
                d = Dv[t] * e
                dvec[t] = d
                quad0 += e * d
                for k in range(nl):
                    a = latloc[t * nl + k]
                    if a >= 0:
                        b[a] += load[o + t, k] * d
            quad = quad0 - apply_T(T, b, h, m)
            llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
            wsum += wr
            if need_grad:
                for a in range(m):
                    u[a] = 0.0
                for t in range(n):
                    acc = 0.0
                    for k in range(nl):
                        a = latloc[t * nl + k]
                        if a >= 0:
                            acc += load[o + t, k] * h[a]
                    wt = dvec[t] - Dv[t] * acc
                    w_out[o + t] = wr * wt
                    W2[t] += wr * wt * wt
                    for k in range(nl):
                        a = latloc[t * nl + k]
                        if a >= 0:
                            u[a] += load[o + t, k] * wt
                for a in range(m):
                    for a2 in range(m):
                        U[a * m + a2] += wr * u[a] * u[a2]
        ll[0] += llp
        if need_grad:
            grad_tail(m, glob, ASA, U, wsum, gphi, M, n, slot, o0, W2, sinv, gth,
                      hidx, hphi, nh, hS + m * m, ent)
    # reset the markers
    for a in range(m):
        loc[glob[a]] = -1
    for j in range(c):
        colloc[colglob[j]] = -1
    return status


cdef enum:
    ALLOC_FAIL = 9

ALLOC_FAILED = ALLOC_FAIL     # status_t value of a thread whose scratch allocation failed


def _raise_alloc(const int[::1] status_t, Py_ssize_t nbytes):
    cdef Py_ssize_t i
    for i in range(status_t.shape[0]):
        if status_t[i] == ALLOC_FAIL:
            raise MemoryError(f"mlsem kernel: a thread's scratch of about {nbytes} bytes could "
                              "not be allocated (maxn / maxm / maxc too large for this machine)")


def _check_outputs(Py_ssize_t nres, Py_ssize_t nload, Py_ssize_t nw, Py_ssize_t nslot,
                   Py_ssize_t nll, Py_ssize_t ngphi, Py_ssize_t gphi_w, Py_ssize_t ngth,
                   Py_ssize_t gth_w, Py_ssize_t nstatus, int nthreads, int M, Py_ssize_t gth_need,
                   int need_grad):
    """Per-observation arrays of one length; per-thread outputs with a row per thread
    and room for M * M (dl/dPhi) and ``gth_need`` (dl/dTheta) entries."""
    if not (nres == nload == nw == nslot):
        raise ValueError(f"per-observation arrays differ in length: resid {nres}, load {nload}, "
                         f"w_out {nw}, slot {nslot}")
    if nll < nthreads or nstatus < nthreads or ngphi < nthreads or ngth < nthreads:
        raise ValueError(f"per-thread outputs need {nthreads} rows: ll_t {nll}, status_t "
                         f"{nstatus}, gphi_t {ngphi}, gth_t {ngth}")
    if need_grad and (gphi_w < <Py_ssize_t>M * M or gth_w < gth_need):
        raise ValueError(f"gphi_t rows need M * M = {M * M} entries (have {gphi_w}), gth_t rows "
                         f"{gth_need} (have {gth_w})")


def factor_loglik(const long long[::1] pat_ptr, const long long[::1] row_ptr,
                  const int[::1] slot, double[::1] resid,
                  const double[:, ::1] load, const int[:, ::1] slot_lat,
                  const double[:, ::1] F, const int[::1] blk_start, const int[::1] blk_end,
                  const double[::1] theta, const double[::1] wrow,
                  double[::1] w_out, double[::1] ll_t, double[:, ::1] gphi_t,
                  double[:, ::1] gth_t, int[::1] status_t,
                  int maxn, int maxm, int maxc, int nthreads, int need_grad,
                  const double[::1] y=None, const double[:, ::1] X=None,
                  const double[::1] beta=None, double[:, ::1] gbeta_t=None,
                  const int[::1] hidx=None, double[:, ::1] hphi_t=None, bint unit_load=False,
                  bint validate=True):
    """Factor (Woodbury) path. Per-thread outputs: ll_t[nt], gphi_t[nt, M*M],
    gth_t[nt, P] (dl/dtheta per slot), status_t[nt]; w_out[nobs] (weighted w).

    Fused mode (y, X, beta and gbeta_t given): ``resid`` is an output buffer,
    filled per pattern with y - X beta just before the pattern is evaluated, and
    gbeta_t[tid, :q] receives the thread's share of X' w (= dl/dbeta) just after:
    one pass over the observations per evaluation instead of three, with each
    pattern's rows still in cache.

    Hessian mode (hidx and hphi_t given, need_grad set): hidx[a * M + b] is the
    index, among nh = sqrt(hphi_t.shape[1]) parameters linear in Phi, of the
    parameter of Phi entry (a, b) (-1: none), and hphi_t[tid] (nh x nh) receives
    the thread's share of d2l / dpsi_k dpsi_l for those parameters (hess_accum).

    ``unit_load``: every loading of a present latent is 1 (random intercepts); the
    row loops of the arrowhead and single-latent paths then do not read ``load``
    (16 bytes less memory traffic per observation).

    ``validate`` (default): check the shapes of every array against each other
    and the CSR layout (``_check_layout``, one pass over the observations) and
    raise ValueError instead of reading or writing out of bounds; a caller that
    evaluates the same layout many times checks it once.  A per-thread scratch
    allocation that fails raises MemoryError (not a non-positive-definite status)."""
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1, p
    cdef int M = F.shape[0], tid, nl = load.shape[1], i, st, c, ci
    cdef int fused = y is not None, q = 0
    cdef long long o, o_lo, o_hi
    cdef double acc
    cdef double* gb
    if fused:
        if X is None or beta is None or gbeta_t is None:
            raise ValueError("fused mode needs y, X, beta and gbeta_t")
        q = X.shape[1]
        if beta.shape[0] != q or gbeta_t.shape[1] < q or X.shape[0] != resid.shape[0]:
            raise ValueError("fused mode: shapes of X, beta, gbeta_t do not agree")
    cdef int* loc
    cdef int* colloc
    cdef int* ibuf
    cdef double* dbuf
    cdef int nh = 0, hess = hphi_t is not None and need_grad != 0
    cdef const int* hidx_p = NULL
    cdef double* hphi_p
    cdef double* hS
    cdef int* ent
    if hess:
        if hidx is None or hidx.shape[0] != F.shape[0] * F.shape[0]:
            raise ValueError("Hessian mode needs hidx with M * M entries")
        nh = <int>(sqrt(<double>hphi_t.shape[1]) + 0.5)
        if nh < 1 or nh * nh != hphi_t.shape[1] or hphi_t.shape[0] < (nthreads if nthreads > 0 else 1):
            raise ValueError("Hessian mode: hphi_t must be (nthreads, nh * nh), nh >= 1")
        for i in range(hidx.shape[0]):
            if hidx[i] >= nh:
                raise ValueError(f"Hessian mode: hidx[{i}] = {hidx[i]} is not below nh = {nh}")
        hidx_p = &hidx[0]
    cdef Py_ssize_t mm = maxm if maxm > 0 else 1
    cdef Py_ssize_t cc = maxc if maxc > 0 else 1
    cdef Py_ssize_t nn = maxn if maxn > 0 else 1
    cdef Py_ssize_t big = mm if mm > cc else cc
    cdef Py_ssize_t nd = 4 * nn + mm * cc * 2 + cc * cc + cc * mm + 4 * mm * mm + big * big + 3 * mm
    if nthreads < 1:
        nthreads = 1
    if not MLSEM_HAVE_OPENMP:
        nthreads = 1
    cdef Py_ssize_t P = theta.shape[0], s
    if validate:
        _check_outputs(resid.shape[0], load.shape[0], w_out.shape[0], slot.shape[0],
                       ll_t.shape[0], gphi_t.shape[0], gphi_t.shape[1], gth_t.shape[0],
                       gth_t.shape[1], status_t.shape[0], nthreads, M, P, need_grad)
        if F.shape[1] != M or blk_start.shape[0] < M or blk_end.shape[0] < M:
            raise ValueError(f"F must be square (M = {M}) and blk_start, blk_end have M entries")
        for i in range(M):
            if blk_start[i] < 0 or blk_end[i] > M or blk_start[i] > i or blk_end[i] <= i:
                raise ValueError(f"latent {i}: block [{blk_start[i]}, {blk_end[i]}) does not hold it")
        if maxm < (M if M < maxn * nl else maxn * nl) or maxc < M:
            raise ValueError(f"maxm = {maxm} and maxc = {maxc}: scratch for min(M, maxn * nl) "
                             f"latents and M = {M} factor columns is needed")
        if fused and gbeta_t.shape[0] < nthreads:
            raise ValueError(f"gbeta_t has {gbeta_t.shape[0]} rows for {nthreads} threads")
        _check_layout(pat_ptr, row_ptr, slot, resid.shape[0], wrow.shape[0], <int>P, slot_lat,
                      nl, M, maxn, 1)
    cdef double* thinfo = <double*>malloc((2 * P + 1) * sizeof(double))
    if thinfo == NULL:
        raise MemoryError()
    for s in range(P):
        if theta[s] > 0.0:
            thinfo[s] = 1.0 / theta[s]
            thinfo[P + s] = log(theta[s])
        else:
            thinfo[s] = 0.0
            thinfo[P + s] = 0.0
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        loc = <int*>malloc((2 * M + 2 * mm + cc + nn * nl + 4 + 3 * mm * mm) * sizeof(int))
        dbuf = <double*>malloc((nd + 16 + q + 2 * mm * mm) * sizeof(double))
        # (sizes in Py_ssize_t: maxm = 50,000 overflowed an int)
        if loc != NULL and dbuf != NULL:
            colloc = loc + M
            ibuf = colloc + M
            gb = dbuf + nd + 16
            hS = gb + q
            ent = ibuf + 2 * mm + cc + nn * nl + 4
            hphi_p = NULL
            if hess:
                hphi_p = &hphi_t[tid, 0]
            for i in range(2 * M):
                loc[i] = -1
            for c in range(q):
                gb[c] = 0.0
            for p in prange(npat, schedule='dynamic', chunksize=16):
                if status_t[tid] == 0:
                    o_lo = row_ptr[pat_ptr[p]]
                    o_hi = row_ptr[pat_ptr[p + 1]]
                    if fused:
                        for o in range(o_lo, o_hi):
                            acc = y[o]
                            for ci in range(q):
                                acc = acc - X[o, ci] * beta[ci]
                            resid[o] = acc
                    st = factor_pattern(
                        p, pat_ptr, row_ptr, slot, resid, load, slot_lat, F, blk_start, blk_end,
                        theta, wrow, w_out, &ll_t[tid], &gphi_t[tid, 0], &gth_t[tid, 0],
                        M, need_grad, loc, colloc, ibuf, ibuf + mm, ibuf + mm + cc,
                        dbuf, dbuf + nn, dbuf + 2 * nn, dbuf + 3 * nn,
                        dbuf + 4 * nn,                                   # Lp  m*c
                        dbuf + 4 * nn + mm * cc,                         # A   m*m
                        dbuf + 4 * nn + mm * cc + mm * mm,               # AL  max(m*c, m*m)
                        dbuf + 4 * nn + mm * cc + mm * mm + big * big,   # K   c*c
                        dbuf + 4 * nn + mm * cc + mm * mm + big * big + cc * cc,            # Z c*m
                        dbuf + 4 * nn + 2 * mm * cc + mm * mm + big * big + cc * cc,        # T m*m
                        dbuf + 4 * nn + 2 * mm * cc + 2 * mm * mm + big * big + cc * cc,    # ASA
                        dbuf + 4 * nn + 2 * mm * cc + 3 * mm * mm + big * big + cc * cc,    # U
                        dbuf + 4 * nn + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc,    # b
                        dbuf + 4 * nn + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc + mm,
                        dbuf + 4 * nn + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc + 2 * mm,
                        thinfo, hidx_p, hphi_p, nh, hS, ent, unit_load)
                    if st != 0:
                        status_t[tid] = st
                    elif fused and need_grad:
                        for ci in range(q):
                            acc = 0.0      # a register accumulator, not gb[ci]
                            for o in range(o_lo, o_hi):
                                acc = acc + X[o, ci] * w_out[o]
                            gb[ci] += acc
            for c in range(q):
                gbeta_t[tid, c] = gb[c]
        else:
            status_t[tid] = ALLOC_FAIL
        free(loc)
        free(dbuf)
    free(thinfo)
    _raise_alloc(status_t, (nd + 16 + q + 2 * mm * mm) * sizeof(double))
    return 0


def residuals(const double[::1] y, const double[:, ::1] X, const double[::1] beta,
              double[::1] out, int nthreads):
    """out = y - X beta, one parallel pass (no temporaries)."""
    cdef Py_ssize_t n = y.shape[0], i
    cdef int q = X.shape[1], c
    if X.shape[0] != n or out.shape[0] != n or beta.shape[0] != q:
        raise ValueError(f"residuals: y {n}, X {X.shape[0]} x {q}, beta {beta.shape[0]}, "
                         f"out {out.shape[0]} do not agree")
    cdef double acc
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    with nogil:
        for i in prange(n, schedule='static', num_threads=nthreads):
            acc = y[i]
            for c in range(q):
                acc = acc - X[i, c] * beta[c]
            out[i] = acc
    return 0


def xt_w(const double[:, ::1] X, const double[::1] w, double[:, ::1] out_t, int nthreads,
         int[::1] status=None):
    """out_t[ch] = X' w over the ch-th of out_t.shape[0] chunks of rows (the caller
    sums the rows).  ``status[ch]`` (if given, one entry per chunk) is set to
    ALLOC_FAILED where a chunk's accumulator could not be allocated, 0 otherwise;
    either way a failed allocation raises MemoryError (no unwritten row is
    left to be summed)."""
    cdef Py_ssize_t n = X.shape[0], i, lo, hi, chunk, ch
    cdef Py_ssize_t nch = out_t.shape[0]
    cdef int q = X.shape[1], c
    cdef double* acc
    if w.shape[0] != n:
        raise ValueError(f"xt_w: w has {w.shape[0]} entries, X {n} rows")
    if out_t.shape[1] < q or nch < 1:
        raise ValueError(f"xt_w: out_t ({out_t.shape[0]} x {out_t.shape[1]}) needs at least one "
                         f"row of {q} entries")
    cdef int[::1] st = status if status is not None else np.zeros(nch, dtype=np.int32)
    if st.shape[0] < nch:
        raise ValueError(f"xt_w: status has {st.shape[0]} entries for {nch} chunks")
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    chunk = (n + nch - 1) // nch
    with nogil:
        for ch in prange(nch, schedule='static', num_threads=nthreads):
            acc = <double*>malloc((q + 1) * sizeof(double))
            if acc != NULL:
                for c in range(q):
                    acc[c] = 0.0
                lo = ch * chunk
                hi = lo + chunk
                if hi > n:
                    hi = n
                for i in range(lo, hi):
                    for c in range(q):
                        acc[c] += X[i, c] * w[i]
                for c in range(q):
                    out_t[ch, c] = acc[c]
                free(acc)
                st[ch] = 0
            else:
                st[ch] = ALLOC_FAIL
    _raise_alloc(st, (q + 1) * sizeof(double))
    return 0


cdef int dense_pattern(
        Py_ssize_t p,
        const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid,
        const double[:, ::1] load, const int[:, ::1] slot_lat,
        const double[:, ::1] Phi, const double[:, ::1] Theta,
        const double[::1] wrow, double[::1] w_out,
        double* ll, double* gphi, double* gth, int M, int P, int need_grad,
        double* S, double* Si, double* WW, double* v) noexcept nogil:
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef long long o0 = row_ptr[r0], o
    cdef int n = <int>(row_ptr[r0 + 1] - o0)
    cdef int nl = load.shape[1]
    cdef int t, t2, k, k2, g, g2, info = 0, one = 1
    cdef double acc, logdet = 0.0, quad, wr, wsum = 0.0, gv, llp = 0.0
    cdef char lo = b'L'
    cdef char nt = b'N'
    cdef char tt = b'T'
    # S (column-major, lower used) = Theta_oo + Lambda_o Phi Lambda_o'
    for t in range(n):
        for t2 in range(t, n):
            acc = Theta[slot[o0 + t], slot[o0 + t2]]
            for k in range(nl):
                g = slot_lat[slot[o0 + t], k]
                if g < 0:
                    continue
                for k2 in range(nl):
                    g2 = slot_lat[slot[o0 + t2], k2]
                    if g2 >= 0:
                        acc += load[o0 + t, k] * load[o0 + t2, k2] * Phi[g, g2]
            S[t * n + t2] = acc      # column t, row t2 (lower)
            S[t2 * n + t] = acc
    dpotrf(&lo, &n, S, &n, &info)
    if info != 0:
        return 2
    for t in range(n):
        logdet += 2.0 * log(S[t * n + t])
    if need_grad:
        for t in range(n * n):
            Si[t] = S[t]
            WW[t] = 0.0
        dpotri(&lo, &n, Si, &n, &info)
        if info != 0:
            return 2
    for r in range(r0, r1):
        o = row_ptr[r]
        wr = wrow[r]
        for t in range(n):
            v[t] = resid[o + t]
        # v <- L^-1 e ; quad = |v|^2 ; v <- L^-T v = Sigma^-1 e
        dtrsv(&lo, &nt, &nt, &n, S, &n, v, &one)
        quad = 0.0
        for t in range(n):
            quad += v[t] * v[t]
        llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
        wsum += wr
        if need_grad:
            dtrsv(&lo, &tt, &nt, &n, S, &n, v, &one)
            for t in range(n):
                w_out[o + t] = wr * v[t]
                for t2 in range(t, n):
                    WW[t * n + t2] += wr * v[t] * v[t2]
    ll[0] += llp
    if need_grad:
        for t in range(n):
            for t2 in range(t, n):
                gv = 0.5 * (WW[t * n + t2] - wsum * Si[t * n + t2])
                gth[slot[o0 + t] * P + slot[o0 + t2]] += gv
                if t2 != t:
                    gth[slot[o0 + t2] * P + slot[o0 + t]] += gv
                for k in range(nl):
                    g = slot_lat[slot[o0 + t], k]
                    if g < 0:
                        continue
                    for k2 in range(nl):
                        g2 = slot_lat[slot[o0 + t2], k2]
                        if g2 < 0:
                            continue
                        acc = gv * load[o0 + t, k] * load[o0 + t2, k2]
                        gphi[g * M + g2] += acc
                        if t2 != t:
                            gphi[g2 * M + g] += acc
    return 0


def dense_loglik(const long long[::1] pat_ptr, const long long[::1] row_ptr,
                 const int[::1] slot, const double[::1] resid,
                 const double[:, ::1] load, const int[:, ::1] slot_lat,
                 const double[:, ::1] Phi, const double[:, ::1] Theta,
                 const double[::1] wrow,
                 double[::1] w_out, double[::1] ll_t, double[:, ::1] gphi_t,
                 double[:, ::1] gth_t, int[::1] status_t,
                 int maxn, int nthreads, int need_grad, bint validate=True):
    """Dense path. Per-thread outputs: ll_t[nt], gphi_t[nt, M*M],
    gth_t[nt, P*P] (dl/dTheta), status_t[nt]; w_out[nobs] (weighted w).
    ``validate``: as factor_loglik's (shapes and layout checked, ValueError);
    a failed scratch allocation raises MemoryError."""
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1, p
    cdef int M = Phi.shape[0], P = Theta.shape[0], tid, st
    cdef Py_ssize_t nn = maxn if maxn > 0 else 1
    cdef double* buf
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    if validate:
        _check_outputs(resid.shape[0], load.shape[0], w_out.shape[0], slot.shape[0],
                       ll_t.shape[0], gphi_t.shape[0], gphi_t.shape[1], gth_t.shape[0],
                       gth_t.shape[1], status_t.shape[0], nthreads, M, <Py_ssize_t>P * P, need_grad)
        if Phi.shape[1] != M or Theta.shape[1] != P:
            raise ValueError(f"Phi ({Phi.shape[0]} x {Phi.shape[1]}) and Theta ({Theta.shape[0]} "
                             f"x {Theta.shape[1]}) must be square")
        _check_layout(pat_ptr, row_ptr, slot, resid.shape[0], wrow.shape[0], P, slot_lat,
                      load.shape[1], M, maxn, 1)
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        buf = <double*>malloc((3 * nn * nn + nn + 8) * sizeof(double))
        if buf != NULL:
            for p in prange(npat, schedule='dynamic', chunksize=4):
                if status_t[tid] == 0:
                    st = dense_pattern(p, pat_ptr, row_ptr, slot, resid, load, slot_lat,
                                       Phi, Theta, wrow, w_out, &ll_t[tid], &gphi_t[tid, 0],
                                       &gth_t[tid, 0], M, P, need_grad,
                                       buf, buf + nn * nn, buf + 2 * nn * nn, buf + 3 * nn * nn)
                    if st != 0:
                        status_t[tid] = st
        else:
            status_t[tid] = ALLOC_FAIL
        free(buf)
    _raise_alloc(status_t, (3 * nn * nn + nn + 8) * sizeof(double))
    return 0


# ---- several outcomes: Theta block-diagonal per observation unit (issue 15) -------------------
#
# Slots are (unit, outcome) pairs; the slots of one unit (a pupil) are consecutive and share
# ``spup[s]``; ``sout[s]`` is the slot's outcome.  Theta_o is block-diagonal: the block of a unit
# with observed outcomes S is R[S, S] (R: the nout x nout residual covariance), so D = Theta_o^-1
# is applied block by block (the caller passes R[S, S]^-1 and log|R[S, S]| for every subset S,
# indexed by its bit mask) and the Woodbury algebra of factor_pattern carries over with D no
# longer diagonal.  dl/dR (nout x nout, every entry a separate argument) replaces dl/dtheta.

cdef int mfactor_pattern(
        Py_ssize_t p,
        const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid,
        const double[:, ::1] load, const int[:, ::1] slot_lat,
        const double[:, ::1] F, const int[::1] blk_start, const int[::1] blk_end,
        const int[::1] spup, const int[::1] sout, int nout,
        const double* rinv, const double* rlogdet, const double[::1] wrow,
        double[::1] w_out, double* ll, double* gphi, double* gR, int M, int need_grad,
        int* loc, int* colloc, int* glob, int* colglob, int* latloc, int* tb, int* tbn,
        double* Dm, double* sinvb, double* W2b, double* dvec, double* lh, double* wv,
        double* Q, double* Lp, double* A, double* AL, double* K, double* Z, double* T,
        double* ASA, double* U, double* b, double* h, double* u,
        int unit, int* jt, int* jnode, double* Sb, int maxj,
        const int* hidx, double* hphi, int nh, int* ent, int* hglob) noexcept nogil:
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef long long o0 = row_ptr[r0], o
    cdef int n = <int>(row_ptr[r0 + 1] - o0)
    cdef int nl = load.shape[1], nn2 = nout * nout
    cdef int m = 0, c = 0, t, t2, k, k2, a, a2, g, g2, j, j2, s, bs, bn, mask, x, z
    cdef int status = 0
    cdef double logth = 0.0, logdet, la, quad0, quad, wr, wsum = 0.0, acc, e, dd
    cdef double llp = 0.0
    # unit blocks, D = Theta_o^-1 block by block, local latents
    t = 0
    while t < n:
        bs = t
        mask = 0
        while t < n and spup[slot[o0 + t]] == spup[slot[o0 + bs]]:
            mask |= 1 << sout[slot[o0 + t]]
            t += 1
        bn = t - bs
        logth += rlogdet[mask]
        for j in range(bn):
            tb[bs + j] = bs
            tbn[bs + j] = bn
            for j2 in range(bn):
                Dm[(bs + j) * nout + j2] = rinv[mask * nn2 + j * nout + j2]
    if USE_BARROW and nl == 2:
        status = barrow_pattern(p, pat_ptr, row_ptr, slot, resid, load, slot_lat, F, blk_start, blk_end,
                                sout, nout, wrow, w_out, ll, gphi, gR, M, need_grad, n, logth,
                                tb, tbn, Dm, rinv, jt, jnode, sinvb, W2b, dvec, lh, wv, Sb, maxj,
                                hidx, hphi, nh, ASA, U, AL, ent, hglob)
        if status >= 0:
            return status
        status = 0
    for t in range(n):
        s = slot[o0 + t]
        for k in range(nl):
            g = slot_lat[s, k]
            if g < 0:
                latloc[t * nl + k] = -1
                continue
            if loc[g] < 0:
                loc[g] = m
                glob[m] = g
                m += 1
            latloc[t * nl + k] = loc[g]
    for a in range(m):
        g = glob[a]
        for g2 in range(blk_start[g], blk_end[g]):
            if F[g, g2] != 0.0 and colloc[g2] < 0:
                colloc[g2] = c
                colglob[c] = g2
                c += 1
    for a in range(m):
        for j in range(c):
            Lp[a * c + j] = F[glob[a], colglob[j]]
    # A = Lambda_o' D Lambda_o (D block-diagonal)
    memset(A, 0, m * m * sizeof(double))
    for t in range(n):
        bs = tb[t]
        for j in range(tbn[t]):
            t2 = bs + j
            dd = Dm[t * nout + j]
            for k in range(nl):
                a = latloc[t * nl + k]
                if a < 0:
                    continue
                la = load[o0 + t, k] * dd
                for k2 in range(nl):
                    a2 = latloc[t2 * nl + k2]
                    if a2 >= 0:
                        A[a * m + a2] += la * load[o0 + t2, k2]
    for a in range(m):
        for j in range(c):
            acc = 0.0
            for a2 in range(m):
                acc += A[a * m + a2] * Lp[a2 * c + j]
            AL[a * c + j] = acc
    for j in range(c):
        for j2 in range(j + 1):
            acc = 0.0
            for a in range(m):
                acc += Lp[a * c + j] * AL[a * c + j2]
            K[j * c + j2] = acc
            K[j2 * c + j] = acc
        K[j * c + j] += 1.0
    logdet = logth
    status = woodbury_T(K, Lp, Z, T, m, c, &logdet)
    if status == 0:
        if need_grad:
            for a in range(m):
                for a2 in range(m):
                    acc = 0.0
                    for j in range(m):
                        acc += A[a * m + j] * T[j * m + a2]
                    AL[a * m + a2] = acc
            for a in range(m):
                for a2 in range(m):
                    acc = 0.0
                    for j in range(m):
                        acc += AL[a * m + j] * A[j * m + a2]
                    ASA[a * m + a2] = A[a * m + a2] - acc
                    U[a * m + a2] = 0.0
            # the blocks of Sigma_o^-1 on the units: D - D Q D, Q = Lambda_b T Lambda_b'
            t = 0
            while t < n:
                bs = t
                bn = tbn[t]
                for x in range(bn):
                    for z in range(bn):
                        acc = 0.0
                        for k in range(nl):
                            a = latloc[(bs + x) * nl + k]
                            if a < 0:
                                continue
                            for k2 in range(nl):
                                a2 = latloc[(bs + z) * nl + k2]
                                if a2 >= 0:
                                    acc += load[o0 + bs + x, k] * load[o0 + bs + z, k2] * T[a * m + a2]
                        Q[x * nout + z] = acc
                for j in range(bn):
                    for j2 in range(bn):
                        acc = Dm[(bs + j) * nout + j2]
                        for x in range(bn):
                            for z in range(bn):
                                acc -= Dm[(bs + j) * nout + x] * Q[x * nout + z] * Dm[(bs + z) * nout + j2]
                        sinvb[(bs + j) * nout + j2] = acc
                        W2b[(bs + j) * nout + j2] = 0.0
                t += bn
        for r in range(r0, r1):
            o = row_ptr[r]
            wr = wrow[r]
            quad0 = 0.0
            for a in range(m):
                b[a] = 0.0
            for t in range(n):
                bs = tb[t]
                acc = 0.0
                for j in range(tbn[t]):
                    acc += Dm[t * nout + j] * resid[o + bs + j]
                dvec[t] = acc
                quad0 += resid[o + t] * acc
                for k in range(nl):
                    a = latloc[t * nl + k]
                    if a >= 0:
                        b[a] += load[o + t, k] * acc
            quad = quad0 - apply_T(T, b, h, m)
            llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
            wsum += wr
            if need_grad:
                for t in range(n):
                    acc = 0.0
                    for k in range(nl):
                        a = latloc[t * nl + k]
                        if a >= 0:
                            acc += load[o + t, k] * h[a]
                    lh[t] = acc
                for a in range(m):
                    u[a] = 0.0
                for t in range(n):
                    bs = tb[t]
                    acc = dvec[t]
                    for j in range(tbn[t]):
                        acc -= Dm[t * nout + j] * lh[bs + j]
                    wv[t] = acc
                    w_out[o + t] = wr * acc
                    for k in range(nl):
                        a = latloc[t * nl + k]
                        if a >= 0:
                            u[a] += load[o + t, k] * acc
                for t in range(n):
                    bs = tb[t]
                    for j in range(tbn[t]):
                        W2b[t * nout + j] += wr * wv[t] * wv[bs + j]
                for a in range(m):
                    for a2 in range(m):
                        U[a * m + a2] += wr * u[a] * u[a2]
        ll[0] += llp
        if need_grad:
            for a in range(m):
                for a2 in range(m):
                    gphi[glob[a] * M + glob[a2]] += 0.5 * U[a * m + a2] - 0.5 * wsum * ASA[a * m + a2]
            for t in range(n):
                bs = tb[t]
                x = sout[slot[o0 + t]]
                for j in range(tbn[t]):
                    z = sout[slot[o0 + bs + j]]
                    gR[x * nout + z] += 0.5 * W2b[t * nout + j] - 0.5 * wsum * sinvb[t * nout + j]
            if hphi != NULL:
                hess_accum(m, glob, ASA, U, wsum, hidx, M, hphi, nh, ent, AL)
    for a in range(m):
        loc[glob[a]] = -1
    for j in range(c):
        colloc[colglob[j]] = -1
    return status



# ---- block arrowhead (several outcomes, random intercepts at two nested levels) -----------------
#
# A pattern whose cells all load (with loading 1) on the latents of one top node U (one per
# outcome, b = nout of them) and of one school node V_j each: A = Lambda' D Lambda is then a block
# arrowhead with b x b blocks (A_UU = sum_j A_j, A_U,Vj = A_Vj,Vj = A_j), and so is K.  Ordered
# V_1 .. V_J, U its Cholesky factor is [[C_j, 0], [E_j, C_U]] (C_j C_j' = K_j, E_j = K_U,Vj C_j^-T,
# C_U C_U' = K_UU - sum E_j E_j'): O(J b^3) per pattern instead of O((J b)^3), every solve
# O(J b^2).  Only the diagonal blocks (U, U) and (V_j, V_j) of Lambda' Sigma^-1 Lambda carry
# parameters (Phi has no U-V entries), and the within-unit blocks of Sigma^-1 need T = F K^-1 F'
# on the blocks (U, U), (U, V_j), (V_j, V_j) only.

cdef inline void b_tn(const double* A, const double* B, double* out, int b) noexcept nogil:
    """out = A' B (b x b, row-major)."""
    cdef int i, j, k
    cdef double acc
    for i in range(b):
        for j in range(b):
            acc = 0.0
            for k in range(b):
                acc += A[k * b + i] * B[k * b + j]
            out[i * b + j] = acc


cdef inline void b_nn(const double* A, const double* B, double* out, int b) noexcept nogil:
    """out = A B."""
    cdef int i, j, k
    cdef double acc
    for i in range(b):
        for j in range(b):
            acc = 0.0
            for k in range(b):
                acc += A[i * b + k] * B[k * b + j]
            out[i * b + j] = acc


cdef inline void b_fwd(const double* C, double* X, int b) noexcept nogil:
    """X <- C^-1 X in place (C lower triangular b x b, X b x b)."""
    cdef int i, j, k
    cdef double acc
    for j in range(b):
        for i in range(b):
            acc = X[i * b + j]
            for k in range(i):
                acc -= C[i * b + k] * X[k * b + j]
            X[i * b + j] = acc / C[i * b + i]


cdef inline void v_fwd(const double* C, double* x, int b) noexcept nogil:
    cdef int i, k
    cdef double acc
    for i in range(b):
        acc = x[i]
        for k in range(i):
            acc -= C[i * b + k] * x[k]
        x[i] = acc / C[i * b + i]


cdef inline void v_bwd(const double* C, double* x, int b) noexcept nogil:
    """x <- C^-T x."""
    cdef int i, k
    cdef double acc
    for i in range(b - 1, -1, -1):
        acc = x[i]
        for k in range(i + 1, b):
            acc -= C[k * b + i] * x[k]
        x[i] = acc / C[i * b + i]


cdef int barrow_pattern(
        Py_ssize_t p, const long long[::1] pat_ptr, const long long[::1] row_ptr,
        const int[::1] slot, const double[::1] resid, const double[:, ::1] load,
        const int[:, ::1] slot_lat,
        const double[:, ::1] F, const int[::1] blk_start, const int[::1] blk_end,
        const int[::1] sout, int nout, const double[::1] wrow,
        double[::1] w_out, double* ll, double* gphi, double* gR, int M, int need_grad,
        int n, double logth, const int* tb, const int* tbn, const double* Dm, const double* rinv,
        int* jt, int* jnode, double* sinvb, double* W2b, double* dvec, double* lh, double* wv,
        double* S, int maxj, const int* hidx, double* hphi, int nh, double* HS, double* HU,
        double* HR, int* ent, int* hglob) noexcept nogil:
    """One pattern on the block-arrowhead path; returns 0, 2 (K not positive definite)
    or -1 (the pattern does not have the structure: the caller takes the general path).
    A cell's two loadings are one value l_t, the same for every cell of a unit (1 on the
    data; sqrt(n) on the grouped data of mlsem.model.mreduced): A_j gains l_t l_t' D,
    Lambda' d and u gain l_t, and a unit's block of Sigma^-1 is D - l^2 D Q_j D."""
    cdef Py_ssize_t r0 = pat_ptr[p], r1 = pat_ptr[p + 1], r
    cdef long long o0 = row_ptr[r0], o
    cdef int b = nout, bb = nout * nout, J = 0, t, j, i, x, z, jj, bs, bn, gu, vb, ox, oz, s
    cdef double logdet = logth, acc, quad, quad0, wr, wsum = 0.0, llp = 0.0
    cdef int* ot = jnode + maxj
    cdef int hm = 0, mask, nmask = 1 << nout
    cdef int sel[16]
    cdef double* cnt
    cdef const double* Dp
    cdef double* Wacc = S + 11 * bb
    cdef double lt
    s = slot[o0]
    if slot_lat[s, 0] < 0:
        return -1
    gu = (slot_lat[s, 0] // b) * b
    for t in range(n):
        s = slot[o0 + t]
        if slot_lat[s, 0] < 0 or slot_lat[s, 1] < 0 or (slot_lat[s, 0] // b) * b != gu:
            return -1
        vb = (slot_lat[s, 1] // b) * b
        if vb == gu:
            return -1
        if J == 0 or jnode[J - 1] != vb:
            for j in range(J):
                if jnode[j] == vb:
                    return -1      # a node's cells are not contiguous
            if J == maxj:
                return -1
            jnode[J] = vb
            J += 1
        jt[t] = J - 1
        ot[t] = sout[s]
        lt = load[o0 + t, 0]
        if load[o0 + t, 1] != lt or load[o0 + tb[t], 0] != lt:
            return -1      # (mfast) loadings not one value per unit
    # the latents node * b .. node * b + b - 1 of a node, their factor inside the node
    for x in range(b):
        if blk_start[gu + x] < gu or blk_end[gu + x] > gu + b:
            return -1
        for j in range(J):
            if blk_start[jnode[j] + x] < jnode[j] or blk_end[jnode[j] + x] > jnode[j] + b:
                return -1
    # scratch: the top node's b x b blocks, then 9 b x b blocks and 6 b-vectors per school
    cdef double* FU = S
    cdef double* CU = S + bb
    cdef double* PU = S + 2 * bb
    cdef double* AS = S + 3 * bb
    cdef double* TUU = S + 4 * bb
    cdef double* GUU = S + 5 * bb
    cdef double* UUU = S + 6 * bb
    cdef double* t1 = S + 7 * bb
    cdef double* t2 = S + 8 * bb
    cdef double* accEY = S + 9 * bb
    cdef double* accYY = S + 10 * bb
    cdef double* bU = S + 12 * bb
    cdef double* xU = bU + b
    cdef double* hU = bU + 2 * b
    cdef double* uU = bU + 3 * b
    cdef double* base = bU + 4 * b
    cdef int VOFF = 11 * bb
    cdef int per = VOFF + 6 * b + 2 * (1 << nout)
    cdef double* Aj
    cdef double* Fj
    cdef double* Cj
    cdef double* Ej
    cdef double* Yj
    cdef double* Nj
    cdef double* Qj
    cdef double* Gj
    cdef double* UUj
    cdef double* bj
    cdef double* xj
    cdef double* hj
    cdef double* uj
    for x in range(b):
        for z in range(b):
            FU[x * b + z] = F[gu + x, gu + z]
            AS[x * b + z] = 0.0
    for j in range(J):
        Aj = base + j * per
        Fj = Aj + bb
        for x in range(b):
            for z in range(b):
                Aj[x * b + z] = 0.0
                Fj[x * b + z] = F[jnode[j] + x, jnode[j] + z]
    # A_j = Lambda_j' D Lambda_j
    for t in range(n):
        Aj = base + jt[t] * per
        ox = ot[t]
        bs = tb[t]
        lt = load[o0 + t, 0]
        lt = lt * lt
        for jj in range(tbn[t]):
            oz = ot[bs + jj]
            Aj[ox * b + oz] += lt * Dm[t * nout + jj]
    # K_j, C_j, E_j; K_U
    for x in range(b):
        for z in range(b):
            t1[x * b + z] = 0.0
    for j in range(J):
        Aj = base + j * per
        Fj = Aj + bb
        Cj = Aj + 2 * bb
        Ej = Aj + 3 * bb
        for x in range(bb):
            AS[x] += Aj[x]
        b_nn(Aj, Fj, t2, b)              # A_j F_j
        b_tn(Fj, t2, Cj, b)              # F_j' A_j F_j
        for x in range(b):
            Cj[x * b + x] += 1.0
        if chol_lower(Cj, b) != 0:
            return 2
        for x in range(b):
            logdet += 2.0 * log(Cj[x * b + x])
        b_tn(t2, FU, Ej, b)              # (A_j F_j)' F_U = F_j' A_j F_U = B_j'
        b_fwd(Cj, Ej, b)                 # C_j^-1 B_j' = E_j'
        for x in range(b):               # t1 += E_j E_j' = (E_j')' (E_j')
            for z in range(b):
                acc = 0.0
                for i in range(b):
                    acc += Ej[i * b + x] * Ej[i * b + z]
                t1[x * b + z] += acc
        for x in range(b):               # store E_j (not its transpose)
            for z in range(x + 1, b):
                acc = Ej[x * b + z]
                Ej[x * b + z] = Ej[z * b + x]
                Ej[z * b + x] = acc
    b_nn(AS, FU, t2, b)
    b_tn(FU, t2, CU, b)
    for x in range(bb):
        CU[x] -= t1[x]
    for x in range(b):
        CU[x * b + x] += 1.0
    if chol_lower(CU, b) != 0:
        return 2
    for x in range(b):
        logdet += 2.0 * log(CU[x * b + x])
    if need_grad:
        # T blocks: P_U = C_U^-1 F_U', T_UU = P_U' P_U; per school Y_j = C_j^-1 F_j',
        # N_j = C_U^-1 E_j Y_j, Q_j = T_UU - P_U' N_j - N_j' P_U + Y_j' Y_j + N_j' N_j
        for x in range(b):
            for z in range(b):
                PU[x * b + z] = FU[z * b + x]
        b_fwd(CU, PU, b)
        b_tn(PU, PU, TUU, b)
        for x in range(bb):
            accEY[x] = 0.0
            accYY[x] = 0.0
            UUU[x] = 0.0
        for j in range(J):
            Aj = base + j * per
            Fj = Aj + bb
            Cj = Aj + 2 * bb
            Ej = Aj + 3 * bb
            Yj = Aj + 4 * bb
            Nj = Aj + 5 * bb
            Qj = Aj + 6 * bb
            Gj = Aj + 7 * bb
            UUj = Aj + 8 * bb
            for x in range(b):
                for z in range(b):
                    Yj[x * b + z] = Fj[z * b + x]
                    UUj[x * b + z] = 0.0
            b_fwd(Cj, Yj, b)
            b_nn(Ej, Yj, Nj, b)
            b_fwd(CU, Nj, b)
            b_tn(PU, Nj, t1, b)          # P_U' N_j = -T_U,Vj
            b_tn(Yj, Yj, Qj, b)
            b_tn(Nj, Nj, t2, b)
            for x in range(b):
                for z in range(b):
                    Qj[x * b + z] += t2[x * b + z] + TUU[x * b + z] - t1[x * b + z] - t1[z * b + x]
            # G_jj = A_j - Y2' Y2 - YU2' YU2, Y2 = C_j^-1 F_j' A_j, YU2 = C_U^-1 (F_U' A_j - E_j Y2)
            b_tn(Fj, Aj, t1, b)
            b_fwd(Cj, t1, b)             # t1 = Y2
            for x in range(bb):
                (Aj + 9 * bb)[x] = t1[x]
            b_tn(t1, t1, Gj, b)
            for x in range(bb):
                accYY[x] += Gj[x]
            b_nn(Ej, t1, t2, b)          # E_j Y2
            for x in range(bb):
                accEY[x] += t2[x]
            b_tn(FU, Aj, t1, b)
            for x in range(bb):
                t1[x] -= t2[x]
            b_fwd(CU, t1, b)
            for x in range(bb):
                (Aj + 10 * bb)[x] = t1[x]    # YU2_j = C_U^-1 (F_U' A_j - E_j Y2_j)
            b_tn(t1, t1, t2, b)
            for x in range(bb):
                Gj[x] = Aj[x] - Gj[x] - t2[x]
        b_tn(FU, AS, t1, b)
        for x in range(bb):
            t1[x] -= accEY[x]
        b_fwd(CU, t1, b)
        b_tn(t1, t1, t2, b)
        for x in range(bb):
            GUU[x] = AS[x] - accYY[x] - t2[x]
        if hphi != NULL:
            hm = b * (J + 1)
            # S = Lambda' Sigma^-1 Lambda in full, local order U, V_1 .. V_J (t1 = YU)
            for x in range(b):
                hglob[x] = gu + x
                for z in range(b):
                    HS[x * hm + z] = GUU[x * b + z]
            for j in range(J):
                Aj = base + j * per
                for x in range(b):
                    hglob[(j + 1) * b + x] = jnode[j] + x
                b_tn(Aj + 9 * bb, Aj + 9 * bb, t2, b)       # Y2' Y2
                for x in range(b):
                    for z in range(b):
                        acc = 0.0
                        for i in range(b):
                            acc += t1[i * b + x] * (Aj + 10 * bb)[i * b + z]
                        acc = Aj[x * b + z] - t2[x * b + z] - acc
                        HS[x * hm + (j + 1) * b + z] = acc
                        HS[((j + 1) * b + z) * hm + x] = acc
                        HS[((j + 1) * b + x) * hm + (j + 1) * b + z] = (Aj + 7 * bb)[x * b + z]
                for i in range(j):
                    Nj = base + i * per + 10 * bb
                    for x in range(b):
                        for z in range(b):
                            acc = 0.0
                            for jj in range(b):
                                acc -= Nj[jj * b + x] * (Aj + 10 * bb)[jj * b + z]
                            HS[((i + 1) * b + x) * hm + (j + 1) * b + z] = acc
                            HS[((j + 1) * b + z) * hm + (i + 1) * b + x] = acc
            for x in range(hm * hm):
                HU[x] = 0.0
        # the within-unit blocks of Sigma^-1, D - D Q_j D, depend on the school and the unit's
        # outcomes only: count the units per (school, outcome set); their sum enters dl/dR
        for j in range(J):
            cnt = base + j * per + VOFF + 6 * b
            for x in range(2 * nmask):
                cnt[x] = 0.0
        t = 0
        while t < n:
            bs = t
            bn = tbn[t]
            mask = 0
            for x in range(bn):
                mask = mask | (1 << ot[bs + x])
            cnt = base + jt[bs] * per + VOFF + 6 * b
            cnt[mask] += 1.0
            lt = load[o0 + bs, 0]
            cnt[nmask + mask] += lt * lt           # (mfast) sum of l^2 per outcome set
            t += bn
        for x in range(bb):
            Wacc[x] = 0.0
    for r in range(r0, r1):
        o = row_ptr[r]
        wr = wrow[r]
        quad0 = 0.0
        for x in range(b):
            bU[x] = 0.0
        for j in range(J):
            bj = base + j * per + VOFF
            for x in range(b):
                bj[x] = 0.0
        for t in range(n):
            bs = tb[t]
            acc = 0.0
            for jj in range(tbn[t]):
                acc += Dm[t * nout + jj] * resid[o + bs + jj]
            dvec[t] = acc
            quad0 += resid[o + t] * acc
            ox = ot[t]
            acc = acc * load[o0 + t, 0]
            bU[ox] += acc
            (base + jt[t] * per + VOFF)[ox] += acc
        # beta = F' Lambda' d; forward solve (schools, then U), back solve
        quad = 0.0
        for x in range(b):
            acc = 0.0
            for z in range(b):
                acc += FU[z * b + x] * bU[z]
            t1[x] = acc
        for j in range(J):
            Aj = base + j * per
            Fj = Aj + bb
            Cj = Aj + 2 * bb
            Ej = Aj + 3 * bb
            bj = Aj + VOFF
            xj = bj + b
            for x in range(b):
                acc = 0.0
                for z in range(b):
                    acc += Fj[z * b + x] * bj[z]
                xj[x] = acc
            v_fwd(Cj, xj, b)             # y_j
            for x in range(b):
                quad += xj[x] * xj[x]
                acc = 0.0
                for z in range(b):
                    acc += Ej[x * b + z] * xj[z]
                t1[x] -= acc
        v_fwd(CU, t1, b)                 # y_U
        for x in range(b):
            quad += t1[x] * t1[x]
        quad = quad0 - quad
        llp += wr * (-0.5) * (n * LOG2PI + logdet + quad)
        wsum += wr
        if need_grad:
            for x in range(b):
                xU[x] = t1[x]
            v_bwd(CU, xU, b)
            for x in range(b):
                acc = 0.0
                for z in range(b):
                    acc += FU[x * b + z] * xU[z]
                hU[x] = acc
                uU[x] = 0.0
            for j in range(J):
                Aj = base + j * per
                Fj = Aj + bb
                Cj = Aj + 2 * bb
                Ej = Aj + 3 * bb
                bj = Aj + VOFF
                xj = bj + b
                hj = bj + 2 * b
                uj = bj + 3 * b
                for x in range(b):       # y_j - E_j' x_U
                    acc = 0.0
                    for z in range(b):
                        acc += Ej[z * b + x] * xU[z]
                    xj[x] -= acc
                v_bwd(Cj, xj, b)
                for x in range(b):
                    acc = 0.0
                    for z in range(b):
                        acc += Fj[x * b + z] * xj[z]
                    hj[x] = acc
                    uj[x] = 0.0
            for t in range(n):
                ox = ot[t]
                lh[t] = load[o0 + t, 0] * (hU[ox] + (base + jt[t] * per + VOFF + 2 * b)[ox])
            for t in range(n):
                bs = tb[t]
                acc = dvec[t]
                for jj in range(tbn[t]):
                    acc -= Dm[t * nout + jj] * lh[bs + jj]
                wv[t] = acc
                w_out[o + t] = wr * acc
                ox = ot[t]
                acc = acc * load[o0 + t, 0]
                uU[ox] += acc
                (base + jt[t] * per + VOFF + 3 * b)[ox] += acc
            for t in range(n):
                bs = tb[t]
                ox = ot[t]
                for jj in range(tbn[t]):
                    Wacc[ox * b + ot[bs + jj]] += wr * wv[t] * wv[bs + jj]
            for x in range(b):
                for z in range(b):
                    UUU[x * b + z] += wr * uU[x] * uU[z]
            if hphi != NULL:
                for x in range(b):
                    HR[x] = uU[x]
                for j in range(J):
                    uj = base + j * per + VOFF + 3 * b
                    for x in range(b):
                        HR[(j + 1) * b + x] = uj[x]
                for x in range(hm):
                    for z in range(hm):
                        HU[x * hm + z] += wr * HR[x] * HR[z]
            for j in range(J):
                UUj = base + j * per + 8 * bb
                uj = base + j * per + VOFF + 3 * b
                for x in range(b):
                    for z in range(b):
                        UUj[x * b + z] += wr * uj[x] * uj[z]
    ll[0] += llp
    if need_grad:
        for x in range(b):
            for z in range(b):
                gphi[(gu + x) * M + gu + z] += 0.5 * UUU[x * b + z] - 0.5 * wsum * GUU[x * b + z]
        for j in range(J):
            Gj = base + j * per + 7 * bb
            UUj = base + j * per + 8 * bb
            for x in range(b):
                for z in range(b):
                    gphi[(jnode[j] + x) * M + jnode[j] + z] += (0.5 * UUj[x * b + z]
                                                                - 0.5 * wsum * Gj[x * b + z])
        for x in range(b):
            for z in range(b):
                gR[x * nout + z] += 0.5 * Wacc[x * b + z]
        for j in range(J):
            Qj = base + j * per + 6 * bb
            cnt = base + j * per + VOFF + 6 * b
            for mask in range(1, nmask):
                if cnt[mask] == 0.0:
                    continue
                bn = 0
                for x in range(b):
                    if (mask >> x) & 1:
                        sel[bn] = x
                        bn += 1
                Dp = rinv + mask * bb
                for i in range(bn):
                    for jj in range(bn):
                        acc = 0.0
                        for x in range(bn):
                            for z in range(bn):
                                acc += Dp[i * b + x] * Qj[sel[x] * b + sel[z]] * Dp[z * b + jj]
                        gR[sel[i] * nout + sel[jj]] -= 0.5 * wsum * (cnt[mask] * Dp[i * b + jj]
                                                                     - cnt[nmask + mask] * acc)
        if hphi != NULL:
            hess_accum(hm, hglob, HS, HU, wsum, hidx, M, hphi, nh, ent, HR)
    return 0


cdef int USE_BARROW = 1


def set_block_arrowhead(bint enabled):
    """Turn the block-arrowhead path of mfactor_loglik on or off (tests); returns the
    previous setting."""
    global USE_BARROW
    cdef int old = USE_BARROW
    USE_BARROW = 1 if enabled else 0
    return bool(old)


def mfactor_loglik(const long long[::1] pat_ptr, const long long[::1] row_ptr,
                   const int[::1] slot, double[::1] resid,
                   const double[:, ::1] load, const int[:, ::1] slot_lat,
                   const double[:, ::1] F, const int[::1] blk_start, const int[::1] blk_end,
                   const int[::1] spup, const int[::1] sout, int nout,
                   const double[:, :, ::1] rinv, const double[::1] rlogdet,
                   const double[::1] wrow, double[::1] w_out, double[::1] ll_t,
                   double[:, ::1] gphi_t, double[:, ::1] gR_t, int[::1] status_t,
                   int maxn, int maxm, int maxc, int nthreads, int need_grad,
                   const double[::1] y=None, const double[:, ::1] X=None,
                   const double[::1] beta=None, double[:, ::1] gbeta_t=None,
                   bint unit_load=False, const int[::1] hidx=None, double[:, ::1] hphi_t=None,
                   const int[::1] xoff=None, bint validate=True):
    """Factor path with Theta block-diagonal per unit (several outcomes).

    ``spup[s]``: the unit of slot s (a unit's slots are consecutive slot numbers and so
    consecutive within every row); ``sout[s]``: its outcome in [0, nout).  ``rinv[mask]``
    (2^nout, nout, nout): R[S, S]^-1 for the outcomes S of bit mask ``mask``, in the order
    of S, and ``rlogdet[mask]`` log|R[S, S]|.  Outputs as factor_loglik's, with gR_t[nt,
    nout * nout] = dl/dR instead of dl/dtheta; fused mode (y, X, beta, gbeta_t) as there.
    O(observations * (latents touched + nout)) per evaluation, no dense per-row matrix.
    Two latent columns (random intercepts at two nested levels, latent g of outcome o of
    node v numbered v * nout + o) with a cell's two loadings one value, the same for every
    cell of a unit (1 on the data, sqrt(n) on grouped data): the block-arrowhead path
    (barrow_pattern), O(schools * nout^3) per pattern; ``unit_load`` is not needed for it.  Hessian mode (hidx, hphi_t) as
    factor_loglik's: d2l/dpsi2 of the parameters linear in Phi.  ``xoff`` (nout + 1 column
    offsets): X is compact, a cell of outcome o holding its outcome's design columns
    xoff[o] .. xoff[o + 1] - 1 (of beta) in its first xoff[o + 1] - xoff[o] columns."""
    cdef int compact = xoff is not None, oc, c0, qo
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1, p
    cdef int M = F.shape[0], tid, nl = load.shape[1], i, st, c, ci
    cdef int fused = y is not None, q = 0
    cdef long long o, o_lo, o_hi
    cdef double acc
    cdef double* gb
    cdef int* loc
    cdef int* ibuf
    cdef double* dbuf
    cdef Py_ssize_t P = slot_lat.shape[0], s
    cdef int nh = 0, hess = hphi_t is not None and need_grad != 0
    cdef const int* hidx_p = NULL
    cdef double* hphi_p
    if fused:
        if X is None or beta is None or gbeta_t is None:
            raise ValueError("fused mode needs y, X, beta and gbeta_t")
        q = X.shape[1]
        if compact:
            q = beta.shape[0]
            if xoff.shape[0] != nout + 1 or xoff[0] != 0 or xoff[nout] != q:
                raise ValueError("xoff must hold nout + 1 column offsets from 0 to len(beta)")
            for i in range(nout):
                if xoff[i + 1] < xoff[i] or xoff[i + 1] - xoff[i] > X.shape[1]:
                    raise ValueError(f"xoff: outcome {i} has {xoff[i + 1] - xoff[i]} columns, X {X.shape[1]}")
        if beta.shape[0] != q or gbeta_t.shape[1] < q or X.shape[0] != resid.shape[0]:
            raise ValueError("fused mode: shapes of X, beta, gbeta_t do not agree")
    if nout < 1 or nout > 16:
        raise ValueError(f"nout = {nout} outcomes: 1 to 16 are supported")
    if hess:
        if hidx is None or hidx.shape[0] != F.shape[0] * F.shape[0]:
            raise ValueError("Hessian mode needs hidx with M * M entries")
        nh = <int>(sqrt(<double>hphi_t.shape[1]) + 0.5)
        if nh < 1 or nh * nh != hphi_t.shape[1] or hphi_t.shape[0] < (nthreads if nthreads > 0 else 1):
            raise ValueError("Hessian mode: hphi_t must be (nthreads, nh * nh), nh >= 1")
        for i in range(hidx.shape[0]):
            if hidx[i] >= nh:
                raise ValueError(f"Hessian mode: hidx[{i}] = {hidx[i]} is not below nh = {nh}")
        hidx_p = &hidx[0]
    cdef Py_ssize_t mm = maxm if maxm > 0 else 1
    cdef Py_ssize_t cc = maxc if maxc > 0 else 1
    cdef Py_ssize_t nn = maxn if maxn > 0 else 1
    cdef Py_ssize_t big = mm if mm > cc else cc
    cdef Py_ssize_t no = nout
    cdef Py_ssize_t nd = (3 * nn * no + 3 * nn + no * no + mm * cc * 2 + cc * cc + big * big
                          + 4 * mm * mm + 3 * mm)
    cdef Py_ssize_t nsb = 12 * no * no + 4 * no + nn * (11 * no * no + 6 * no + 2 * (1 << nout))
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    if validate:
        _check_outputs(resid.shape[0], load.shape[0], w_out.shape[0], slot.shape[0],
                       ll_t.shape[0], gphi_t.shape[0], gphi_t.shape[1], gR_t.shape[0],
                       gR_t.shape[1], status_t.shape[0], nthreads, M, nout * nout, need_grad)
        if F.shape[1] != M or blk_start.shape[0] < M or blk_end.shape[0] < M:
            raise ValueError(f"F must be square (M = {M}) and blk_start, blk_end have M entries")
        for i in range(M):
            if blk_start[i] < 0 or blk_end[i] > M or blk_start[i] > i or blk_end[i] <= i:
                raise ValueError(f"latent {i}: block [{blk_start[i]}, {blk_end[i]}) does not hold it")
        if maxm < (M if M < maxn * nl else maxn * nl) or maxc < M:
            raise ValueError(f"maxm = {maxm} and maxc = {maxc}: scratch for min(M, maxn * nl) "
                             f"latents and M = {M} factor columns is needed")
        if rinv.shape[0] < (1 << nout) or rinv.shape[1] < nout or rinv.shape[2] < nout \
                or rlogdet.shape[0] < (1 << nout):
            raise ValueError(f"rinv must be (2^nout, nout, nout) and rlogdet 2^nout long")
        if spup.shape[0] < P or sout.shape[0] < P:
            raise ValueError(f"spup and sout need one entry per slot ({P})")
        for s in range(P):
            if sout[s] < 0 or sout[s] >= nout:
                raise ValueError(f"sout[{s}] = {sout[s]} is not an outcome in [0, {nout})")
            if s > 0 and spup[s] == spup[s - 1] and sout[s] <= sout[s - 1]:
                raise ValueError(f"slots {s - 1}, {s} of one unit are not in increasing outcome order")
        if fused and gbeta_t.shape[0] < nthreads:
            raise ValueError(f"gbeta_t has {gbeta_t.shape[0]} rows for {nthreads} threads")
        _check_layout(pat_ptr, row_ptr, slot, resid.shape[0], wrow.shape[0], <int>P, slot_lat,
                      nl, M, maxn, 1)
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        loc = <int*>malloc((2 * M + 2 * mm + cc + nn * nl + 5 * nn + 4 + 3 * mm * mm + mm) * sizeof(int))
        dbuf = <double*>malloc((nd + 16 + q + nsb) * sizeof(double))
        if loc != NULL and dbuf != NULL:
            ibuf = loc + 2 * M
            gb = dbuf + nd + 16
            hphi_p = NULL
            if hess:
                hphi_p = &hphi_t[tid, 0]
            for i in range(2 * M):
                loc[i] = -1
            for c in range(q):
                gb[c] = 0.0
            for p in prange(npat, schedule='dynamic', chunksize=16):
                if status_t[tid] == 0:
                    o_lo = row_ptr[pat_ptr[p]]
                    o_hi = row_ptr[pat_ptr[p + 1]]
                    if fused and compact:
                        for o in range(o_lo, o_hi):
                            oc = sout[slot[o]]
                            c0 = xoff[oc]
                            qo = xoff[oc + 1] - c0
                            acc = y[o]
                            for ci in range(qo):
                                acc = acc - X[o, ci] * beta[c0 + ci]
                            resid[o] = acc
                    elif fused:
                        for o in range(o_lo, o_hi):
                            acc = y[o]
                            for ci in range(q):
                                acc = acc - X[o, ci] * beta[ci]
                            resid[o] = acc
                    st = mfactor_pattern(
                        p, pat_ptr, row_ptr, slot, resid, load, slot_lat, F, blk_start, blk_end,
                        spup, sout, nout, &rinv[0, 0, 0], &rlogdet[0], wrow, w_out,
                        &ll_t[tid], &gphi_t[tid, 0], &gR_t[tid, 0], M, need_grad,
                        loc, loc + M, ibuf, ibuf + mm, ibuf + mm + cc,
                        ibuf + mm + cc + nn * nl, ibuf + mm + cc + nn * nl + nn,
                        dbuf,                                   # Dm    n*nout
                        dbuf + nn * no,                         # sinvb n*nout
                        dbuf + 2 * nn * no,                     # W2b   n*nout
                        dbuf + 3 * nn * no,                     # dvec  n
                        dbuf + 3 * nn * no + nn,                # lh    n
                        dbuf + 3 * nn * no + 2 * nn,            # wv    n
                        dbuf + 3 * nn * no + 3 * nn,            # Q     nout*nout
                        dbuf + 3 * nn * no + 3 * nn + no * no,  # Lp    m*c
                        dbuf + 3 * nn * no + 3 * nn + no * no + mm * cc,                    # A
                        dbuf + 3 * nn * no + 3 * nn + no * no + mm * cc + mm * mm,          # AL
                        dbuf + 3 * nn * no + 3 * nn + no * no + mm * cc + mm * mm + big * big,  # K
                        dbuf + 3 * nn * no + 3 * nn + no * no + mm * cc + mm * mm + big * big + cc * cc,  # Z
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + mm * mm + big * big + cc * cc,  # T
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + 2 * mm * mm + big * big + cc * cc,  # ASA
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + 3 * mm * mm + big * big + cc * cc,  # U
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc,  # b
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc + mm,
                        dbuf + 3 * nn * no + 3 * nn + no * no + 2 * mm * cc + 4 * mm * mm + big * big + cc * cc + 2 * mm,
                        unit_load, ibuf + mm + cc + nn * nl + 2 * nn, ibuf + mm + cc + nn * nl + 3 * nn,
                        gb + q, <int>nn, hidx_p, hphi_p, nh,
                        ibuf + mm + cc + nn * nl + 5 * nn + 4,
                        ibuf + mm + cc + nn * nl + 5 * nn + 4 + 3 * mm * mm)
                    if st != 0:
                        status_t[tid] = st
                    elif fused and need_grad and compact:
                        for o in range(o_lo, o_hi):
                            oc = sout[slot[o]]
                            c0 = xoff[oc]
                            qo = xoff[oc + 1] - c0
                            acc = w_out[o]
                            for ci in range(qo):
                                gb[c0 + ci] += X[o, ci] * acc
                    elif fused and need_grad:
                        for ci in range(q):
                            acc = 0.0
                            for o in range(o_lo, o_hi):
                                acc = acc + X[o, ci] * w_out[o]
                            gb[ci] += acc
            for c in range(q):
                gbeta_t[tid, c] = gb[c]
        else:
            status_t[tid] = ALLOC_FAIL
        free(loc)
        free(dbuf)
    _raise_alloc(status_t, (nd + 16 + q + nsb) * sizeof(double))
    return 0


# ---- grouped data (issue 14, mlsem.model.reduced) ------------------------------
# One pass over the observations: the runs of equal slot code within each unit
# (a group: observations sharing their latents and residual variance), their
# sums of the columns of Z = [X y], and per representative slot the weighted
# within-group cross products of Z, centred on each group's own mean.

def group_count(const long long[::1] row_ptr, const int[::1] slot,
                const long long[::1] code_of_slot):
    """The number of groups (runs of one ``code_of_slot[slot]`` within a unit)."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r
    cdef long long o, ng = 0
    with nogil:
        for r in range(nrows):
            for o in range(row_ptr[r], row_ptr[r + 1]):
                if o == row_ptr[r] or code_of_slot[slot[o]] != code_of_slot[slot[o - 1]]:
                    ng += 1
    return ng


def group_sums(const long long[::1] row_ptr, const int[::1] slot,
               const long long[::1] code_of_slot, const double[:, ::1] X,
               const double[::1] y, const double[::1] wrow,
               long long[::1] start, long long[::1] grow, double[:, ::1] sums,
               double[:, :, ::1] within):
    """Fills, per group g (``group_count`` of them): ``start[g]`` its first
    observation, ``grow[g]`` its unit, ``sums[g]`` the sums of [X y]; and adds
    wrow * sum (z - mean_g)(z - mean_g)' to ``within[slot of its first
    observation]`` (P x k x k, k = q + 1)."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r
    cdef int q = X.shape[1], k = q + 1, i, j, s
    cdef long long o, o0, o1, g = 0, n, ng = start.shape[0]
    cdef double wr, zi, zj
    if sums.shape[0] != ng or grow.shape[0] != ng or sums.shape[1] != k:
        raise ValueError("group_sums: outputs sized for group_count groups and q + 1 columns")
    if within.shape[1] != k or within.shape[2] != k or X.shape[0] != y.shape[0] \
            or slot.shape[0] != y.shape[0] or wrow.shape[0] < nrows:
        raise ValueError("group_sums: shapes of X, y, slot, wrow, within do not agree")
    if nrows > 0 and (row_ptr[0] != 0 or row_ptr[nrows] > y.shape[0]):
        raise ValueError("group_sums: row_ptr is not a range of the observations")
    for o in range(slot.shape[0]):
        if slot[o] < 0 or slot[o] >= code_of_slot.shape[0] or slot[o] >= within.shape[0]:
            raise ValueError(f"group_sums: slot[{o}] = {slot[o]} out of range")
    cdef double* mean = <double*>malloc(k * sizeof(double))
    if mean == NULL:
        raise MemoryError()
    with nogil:
        for r in range(nrows):
            wr = wrow[r]
            o0 = row_ptr[r]
            while o0 < row_ptr[r + 1] and g < ng:
                o1 = o0 + 1
                while o1 < row_ptr[r + 1] and code_of_slot[slot[o1]] == code_of_slot[slot[o0]]:
                    o1 += 1
                n = o1 - o0
                for i in range(k):
                    mean[i] = 0.0
                for o in range(o0, o1):
                    for i in range(q):
                        mean[i] += X[o, i]
                    mean[q] += y[o]
                start[g] = o0
                grow[g] = r
                for i in range(k):
                    sums[g, i] = mean[i]
                    mean[i] /= n
                if n > 1:
                    s = slot[o0]
                    for o in range(o0, o1):
                        for i in range(k):
                            zi = (X[o, i] if i < q else y[o]) - mean[i]
                            for j in range(i, k):
                                zj = (X[o, j] if j < q else y[o]) - mean[j]
                                within[s, i, j] += wr * zi * zj
                g += 1
                o0 = o1
    free(mean)
    for s in range(within.shape[0]):
        for i in range(k):
            for j in range(i):
                within[s, i, j] = within[s, j, i]
    return g


# ==== survey pseudo-likelihood, nested random intercepts (issue 17; mlsem.model.pseudo) ====
# The closed-form level-by-level integral of mlsem.model.pseudo (its NumPy code is the
# oracle) for the case every level has one random intercept and every loading is 1:
# a unit of level d carries c, a (d + 1), B ((d + 1) x (d + 1)) over its path's latents.

def pseudo_intercepts(const double[::1] r, const double[::1] wobs, list obs_ptr_py,
                      list child_ptr, list wlev, const double[::1] f, double theta,
                      double[::1] v_out, double[::1] gphi_out):
    """Returns (ll, dl/dtheta) and fills v_out (per observation W_i w_i (r_i - z_i' mu) /
    theta, for X'v) and gphi_out (dl/dphi_d per level); ``obs_ptr_py[0]``: the lowest
    level's units as runs of observations (n + 1 pointers); ``child_ptr[d]`` (d >= 1):
    level d's units as runs under each unit of level d - 1; ``wlev[d]``: the units' weights
    (level 0: the top weights).  None where a K is not positive."""
    cdef int L = f.shape[0], d, k, l, D
    cdef Py_ssize_t u, i, n_u, p, lo, hi
    cdef const long long[::1] optr = obs_ptr_py[0]
    cdef const long long[::1] cptr
    cdef const double[::1] wd
    cdef double s0, s1, s2, ao, Boo, K, T, fd, c, lin, g, G, IBT, acc, acc2, th2 = theta * theta
    cdef double ll = 0.0, gth = 0.0, fit, zsz, W
    cdef double log2pith = LOG2PI + log(theta)
    # per level: c (n), A (n, L), B (n, L, L); saved: ao, Boo, Bpo (n, L), T (n)
    cs, As, Bs, sav = [None] * L, [None] * L, [None] * L, [None] * L
    cdef double[::1] cv, pcv
    cdef double[:, ::1] Av, Sa, PA, mu, mup
    cdef double[:, :, ::1] Bv, PB, Sg, Sgp
    n_u = optr.shape[0] - 1
    d = L - 1
    cv = np.zeros(n_u)
    Av = np.zeros((n_u, L))
    Bv = np.zeros((n_u, L, L))
    for u in range(n_u):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for i in range(optr[u], optr[u + 1]):
            s0 += wobs[i] * r[i]
            s1 += wobs[i]
            s2 += wobs[i] * r[i] * r[i]
        cv[u] = -0.5 * s1 * log2pith - 0.5 * s2 / theta
        for k in range(L):
            Av[u, k] = s0 / theta
            for l in range(L):
                Bv[u, k, l] = s1 / theta
    for d in range(L - 1, -1, -1):
        n_u = cv.shape[0]
        fd = f[d]
        Sa = np.zeros((n_u, d + 3))     # ao, Boo, T, Bpo[0..d-1]
        for u in range(n_u):
            ao = Av[u, d]
            Boo = Bv[u, d, d]
            K = 1.0 + fd * fd * Boo
            if not (K > 0.0):
                return None
            T = fd * fd / K
            cv[u] += 0.5 * fd * fd * ao * ao / K - 0.5 * log(K)
            Sa[u, 0] = ao
            Sa[u, 1] = Boo
            Sa[u, 2] = T
            for k in range(d):
                Sa[u, 3 + k] = Bv[u, k, d]
            for k in range(d):
                Av[u, k] -= Bv[u, k, d] * T * ao
            for k in range(d):
                for l in range(d):
                    Bv[u, k, l] -= Sa[u, 3 + k] * T * Sa[u, 3 + l]
        sav[d] = Sa
        wd = wlev[d]
        if d == 0:
            for u in range(n_u):
                ll += wd[u] * cv[u]
            break
        cptr = child_ptr[d]
        p = cptr.shape[0] - 1
        pcv = np.zeros(p)
        PA = np.zeros((p, L))
        PB = np.zeros((p, L, L))
        for i in range(p):
            for u in range(cptr[i], cptr[i + 1]):
                pcv[i] += wd[u] * cv[u]
                for k in range(d):
                    PA[i, k] += wd[u] * Av[u, k]
                    for l in range(d):
                        PB[i, k, l] += wd[u] * Bv[u, k, l]
        cv = pcv
        Av = PA
        Bv = PB
    # top-down: the path posterior (mu, Sigma) of every unit and dl/dphi_d
    cdef double[::1] Wp, Wc
    mup = np.zeros((1, L))
    Sgp = np.zeros((1, L, L))
    Wp = np.ones(1)
    for d in range(L):
        Sa = sav[d]
        n_u = Sa.shape[0]
        wd = wlev[d]
        mu = np.zeros((n_u, L))
        Sg = np.zeros((n_u, L, L))
        Wc = np.zeros(n_u)
        if d >= 1:
            cptr = child_ptr[d]
        acc2 = 0.0
        for i in range(Wp.shape[0] if d >= 1 else 1):
            lo = cptr[i] if d >= 1 else 0
            hi = cptr[i + 1] if d >= 1 else n_u
            for u in range(lo, hi):
                W = (Wp[i] if d >= 1 else 1.0) * wd[u]
                Wc[u] = W
                ao = Sa[u, 0]
                Boo = Sa[u, 1]
                T = Sa[u, 2]
                lin = ao
                for k in range(d):
                    lin -= Sa[u, 3 + k] * mup[i, k]
                IBT = 1.0 - Boo * T
                g = IBT * lin
                G = Boo - Boo * Boo * T
                acc = 0.0           # H Sigma_p H', H_k = -IBT Bpo_k
                for k in range(d):
                    for l in range(d):
                        acc += Sa[u, 3 + k] * Sgp[i, k, l] * Sa[u, 3 + l]
                acc2 += 0.5 * W * (g * g + IBT * IBT * acc - G)
                for k in range(d):
                    mu[u, k] = mup[i, k]
                    for l in range(d):
                        Sg[u, k, l] = Sgp[i, k, l]
                mu[u, d] = T * lin
                zsz = 0.0           # TBo' Sigma_p TBo
                for k in range(d):
                    s0 = 0.0        # (Sigma_p TBo)_k
                    for l in range(d):
                        s0 += Sgp[i, k, l] * T * Sa[u, 3 + l]
                    Sg[u, k, d] = -s0
                    Sg[u, d, k] = -s0
                    zsz += T * Sa[u, 3 + k] * s0
                Sg[u, d, d] = T + zsz
        gphi_out[d] = acc2
        mup = mu
        Sgp = Sg
        Wp = Wc
    # observations
    optr = obs_ptr_py[0]
    for u in range(optr.shape[0] - 1):
        s0 = 0.0
        zsz = 0.0
        for k in range(L):
            s0 += mup[u, k]
            for l in range(L):
                zsz += Sgp[u, k, l]
        for i in range(optr[u], optr[u + 1]):
            W = Wp[u] * wobs[i]
            fit = r[i] - s0
            gth += W * (-0.5 / theta + 0.5 * (fit * fit + zsz) / th2)
            v_out[i] = W * fit / theta
    return ll, gth
# ==== end of the survey pseudo-likelihood ====


# --- mfast --- grouped data of several outcomes (issue 15, mlsem.model.mreduced) ------------------
# A unit (a pupil: consecutive cells of one spup within a row) belongs to the group of its innermost
# node (a school: ``snode[slot]``, runs within a row) and its set of observed outcomes (bit mask).
# One pass: per group its first unit's first cell, size, mask, row and the sums of the centred
# [y, X] per outcome; per mask the weighted within-group cross products of [y, X] over the
# outcomes (nout * k square, k = 1 + X's columns), and the weighted count of contrasts.

def mgroup_count(const long long[::1] row_ptr, const int[::1] slot, const int[::1] spup,
                 const int[::1] sout, const int[::1] snode, int nout):
    """(units, groups, the most groups of one row)."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r
    cdef long long o, o1, nu = 0, ng = 0, rg, maxg = 0
    cdef int mask, node, cur, nm = 1 << nout
    if nout < 1 or nout > 16:
        raise ValueError("mgroup_count: 1 to 16 outcomes")
    for o in range(slot.shape[0]):
        if slot[o] < 0 or slot[o] >= spup.shape[0] or slot[o] >= sout.shape[0] \
                or slot[o] >= snode.shape[0]:
            raise ValueError(f"mgroup_count: slot[{o}] = {slot[o]} out of range")
        if sout[slot[o]] < 0 or sout[slot[o]] >= nout:
            raise ValueError(f"mgroup_count: outcome of slot {slot[o]} out of range")
    cdef int* seen = <int*>malloc(nm * sizeof(int))
    if seen == NULL:
        raise MemoryError()
    with nogil:
        for mask in range(nm):
            seen[mask] = 0
        for r in range(nrows):
            o = row_ptr[r]
            cur = -1
            rg = 0
            while o < row_ptr[r + 1]:
                node = snode[slot[o]]
                if node != cur:
                    for mask in range(nm):
                        seen[mask] = 0
                    cur = node
                mask = 0
                o1 = o
                while o1 < row_ptr[r + 1] and spup[slot[o1]] == spup[slot[o]]:
                    mask = mask | (1 << sout[slot[o1]])
                    o1 += 1
                nu += 1
                if not seen[mask]:
                    seen[mask] = 1
                    ng += 1
                    rg += 1
                o = o1
            if rg > maxg:
                maxg = rg
    free(seen)
    return nu, ng, maxg


def mgroup_sums(const long long[::1] row_ptr, const int[::1] slot, const int[::1] spup,
                const int[::1] sout, const int[::1] snode, int nout, const double[::1] y,
                const double[:, ::1] X, const double[:, ::1] mu, const double[::1] wrow,
                long long[::1] gfirst, long long[::1] gn, int[::1] gmask, long long[::1] grow,
                double[:, ::1] gsum, double[:, :, ::1] C, double[::1] ccount):
    """Fills per group g (``mgroup_count``'s number, in the order of their first units
    within each node): ``gfirst[g]`` its first unit's first cell, ``gn[g]`` its units,
    ``gmask[g]`` their outcomes, ``grow[g]`` its row and ``gsum[g, o * k + i]`` the sum
    of z_i - mu[o, i] over its units' cells of outcome o (z = [y, X], k = 1 + X's
    columns); adds wrow * sum (z - mean_g)(z - mean_g)' over the outcome pairs of each
    unit to ``C[mask]`` (nout * k square) and wrow * (n - 1) to ``ccount[mask]``."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r
    cdef int kx = X.shape[1], k = kx + 1, nk = nout * k, nm = 1 << nout
    cdef long long o, o1, oa, ob, gg, g = 0, ng = gfirst.shape[0]
    cdef int mask, node, cur, i, j, a, b, na, m, li
    cdef double wr, va, n
    if y.shape[0] != slot.shape[0] or X.shape[0] != slot.shape[0] or mu.shape[0] != nout \
            or mu.shape[1] != k or wrow.shape[0] < nrows:
        raise ValueError("mgroup_sums: shapes of y, X, mu, wrow do not agree")
    if gn.shape[0] != ng or gmask.shape[0] != ng or grow.shape[0] != ng or gsum.shape[0] != ng \
            or gsum.shape[1] != nk or C.shape[0] != nm or C.shape[1] != nk or C.shape[2] != nk \
            or ccount.shape[0] != nm:
        raise ValueError("mgroup_sums: outputs sized for mgroup_count groups, nout * k columns")
    if nrows > 0 and (row_ptr[0] != 0 or row_ptr[nrows] > y.shape[0]):
        raise ValueError("mgroup_sums: row_ptr is not a range of the cells")
    # per node: the group of each mask (-1 none), the masks in order of appearance
    cdef long long* gof = <long long*>malloc(nm * sizeof(long long))
    cdef int* order = <int*>malloc(nm * sizeof(int))
    cdef double* v = <double*>malloc(nk * sizeof(double))
    cdef int* oc = <int*>malloc(nout * sizeof(int))
    cdef double* vl = <double*>malloc(nk * sizeof(double))     # (mprep2)
    cdef int* ix = <int*>malloc(nk * sizeof(int))
    cdef double* Cm
    cdef double* Cr
    cdef double* gs
    cdef int nv
    cdef double* cc = <double*>calloc(nm * nk * nk, sizeof(double))
    if gof == NULL or order == NULL or v == NULL or oc == NULL or vl == NULL or ix == NULL \
            or cc == NULL:
        free(gof); free(order); free(v); free(oc); free(vl); free(ix); free(cc)
        raise MemoryError()
    with nogil:
        for m in range(nm):
            gof[m] = -1
        for r in range(nrows):
            wr = wrow[r]
            o = row_ptr[r]
            cur = -1
            li = 0
            while o <= row_ptr[r + 1]:
                node = snode[slot[o]] if o < row_ptr[r + 1] else -2
                if node != cur:
                    # close the previous node's groups: subtract n mean mean'
                    for i in range(li):
                        m = order[i]
                        gg = gof[m]
                        n = <double>gn[gg]
                        for a in range(nk):
                            if gsum[gg, a] == 0.0:
                                continue
                            va = wr * gsum[gg, a] / n
                            for b in range(a, nk):      # (mprep2: the upper triangle, mirrored below)
                                C[m, a, b] -= va * gsum[gg, b]
                        ccount[m] += wr * (n - 1.0)
                        gof[m] = -1
                    li = 0
                    cur = node
                if o == row_ptr[r + 1]:
                    break
                mask = 0
                na = 0
                o1 = o
                while o1 < row_ptr[r + 1] and spup[slot[o1]] == spup[slot[o]]:
                    mask = mask | (1 << sout[slot[o1]])
                    oc[na] = sout[slot[o1]]
                    na += 1
                    o1 += 1
                if gof[mask] < 0:
                    if g >= ng:
                        break
                    gof[mask] = g
                    order[li] = mask
                    li += 1
                    gfirst[g] = o
                    gn[g] = 0
                    gmask[g] = mask
                    grow[g] = r
                    for a in range(nk):
                        gsum[g, a] = 0.0
                    g += 1
                ob = gof[mask]
                gn[ob] += 1
                # the unit's centred values, then its cross products
                # (mprep2: packed in a local vector, indices increasing, the upper triangle
                # accumulated through a row pointer, mirrored below: half the products)
                nv = 0
                for a in range(na):
                    oa = o + a
                    vl[nv] = y[oa] - mu[oc[a], 0]
                    ix[nv] = oc[a] * k
                    nv += 1
                    for i in range(kx):
                        vl[nv] = X[oa, i] - mu[oc[a], 1 + i]
                        ix[nv] = oc[a] * k + 1 + i
                        nv += 1
                # (the products in the mask's compact layout, nv x nv: contiguous rows;
                # added to C's rows and columns of the mask's outcomes at the end)
                Cm = cc + mask * nk * nk
                gs = &gsum[ob, 0]
                for a in range(nv):
                    va = vl[a]
                    gs[ix[a]] += va
                    va = wr * va
                    Cr = Cm + a * nv
                    for b in range(a, nv):
                        Cr[b] += va * vl[b]
                o = o1
    for m in range(nm):             # (mprep2) the compact products into C's upper triangle
        nv = 0
        for a in range(nout):
            if (m >> a) & 1:
                for i in range(k):
                    ix[nv] = a * k + i
                    nv += 1
        for a in range(nv):
            for b in range(a, nv):
                C[m, ix[a], ix[b]] += cc[m * nk * nk + a * nv + b]
    free(gof); free(order); free(v); free(oc); free(vl); free(ix); free(cc)
    if g != ng:
        raise ValueError(f"mgroup_sums: {g} groups found, {ng} expected (mgroup_count's)")
    for m in range(nm):             # (mprep2) the lower triangle from the upper
        for a in range(nk):
            for b in range(a):
                C[m, a, b] = C[m, b, a]
    return 0
# --- end mfast ---

# --- opt ---------------------------------------------------------------------------------------
# Grouped random intercepts at two nested levels (issue 14, mlsem.model.reduced): per unit,
# Sigma = D + gamma a a' with D diagonal (D_i = l1_i^2 tau_i + theta_i, a_i = l0_i), so that
# log|Sigma|, the quadratic form, the gradient and the WHOLE Hessian (variance parameters and
# fixed effects, cross terms included) are closed-form sums over the unit's pseudo-observations:
# O(m (q^2 + 1)) per unit plus O(k^2) for the k variance parameters the unit touches.

cdef int ri2_unit(long long o0, long long o1, double wr,
                  const int* slot, const double* y, const double* X,
                  const double* beta, const double* l0, const double* l1,
                  const double* tau_s, const double* theta_s,
                  const int* ptau_s, const int* pth_s, double gamma, int pgam,
                  int q, int nv, int need_grad, int need_hess,
                  double* ll, double* gv, double* gb, double* hvv, double* hvb, double* hbb,
                  double* dv, double* ev, double* A, double* B, int* flag, int* touched,
                  double* hx) noexcept nogil:
    cdef long long o
    cdef int t, c, c2, m = <int>(o1 - o0), ntouch = 0, i, j, pt, ph, k, p
    cdef double D, dd, e, f, s = 0.0, g = 0.0, logdet = 0.0, quad = 0.0, kap, rho, gk
    cdef double r, Pii, c1, gi, tt, hgi, xr, cc, prod = 1.0
    # log|D| as the log of a running product (one log per unit, not per row), flushed
    # before it could leave the range of doubles
    for t in range(m):
        o = o0 + t
        D = l1[o] * l1[o] * tau_s[slot[o]] + theta_s[slot[o]]
        if not (D > 0.0):
            return 2
        dd = 1.0 / D
        e = y[o]
        for c in range(q):
            e = e - X[o * q + c] * beta[c]
        f = l0[o] * dd
        s += l0[o] * f
        g += f * e
        prod *= D
        if prod > 1e150 or prod < 1e-150:
            logdet += log(prod)
            prod = 1.0
        quad += dd * e * e
        dv[t] = dd
        ev[t] = e
    kap = 1.0 + gamma * s
    if not (kap > 0.0):
        return 2
    rho = gamma / kap
    logdet += log(prod * kap)
    quad -= rho * g * g
    ll[0] += wr * (-0.5) * (m * LOG2PI + logdet + quad)
    if not need_grad:
        return 0
    gk = g / kap
    if pgam >= 0:
        gv[pgam] += -0.5 * wr * (s / kap - gk * gk)
    for c in range(q):
        hx[c] = 0.0
    for t in range(m):
        o = o0 + t
        dd = dv[t]
        f = l0[o] * dd
        r = dd * ev[t] - rho * f * g
        Pii = dd - rho * f * f
        pt = ptau_s[slot[o]]
        ph = pth_s[slot[o]]
        c1 = l1[o] * l1[o]
        gi = -0.5 * wr * (Pii - r * r)
        if pt >= 0:
            gv[pt] += c1 * gi
        if ph >= 0:
            gv[ph] += gi
        for c in range(q):
            gb[c] += wr * X[o * q + c] * r
            hx[c] += f * X[o * q + c]
        if need_hess:
            tt = wr * (0.5 * (dd * dd - 2.0 * rho * dd * f * f) - dd * r * r)
            hgi = wr / (kap * kap) * (0.5 * f * f - g * f * r)
            for k in range(2):
                p = pt if k == 0 else ph
                cc = c1 if k == 0 else 1.0
                if p < 0:
                    continue
                if flag[p] == 0:
                    flag[p] = 1
                    touched[ntouch] = p
                    ntouch += 1
                    A[p] = 0.0
                    B[p] = 0.0
                A[p] += cc * f * f
                B[p] += cc * r * f
                if pgam >= 0:
                    hvv[pgam * nv + p] += cc * hgi
                    hvv[p * nv + pgam] += cc * hgi
                xr = -wr * cc * dd * r
                for c in range(q):
                    hvb[p * q + c] += xr * X[o * q + c]
            if pt >= 0:
                hvv[pt * nv + pt] += c1 * c1 * tt
            if ph >= 0:
                hvv[ph * nv + ph] += tt
            if pt >= 0 and ph >= 0:
                hvv[pt * nv + ph] += c1 * tt
                hvv[ph * nv + pt] += c1 * tt
            for c in range(q):
                xr = -wr * dd * X[o * q + c]
                for c2 in range(c + 1):
                    hbb[c * q + c2] += xr * X[o * q + c2]
    if need_hess:
        if pgam >= 0:
            hvv[pgam * nv + pgam] += wr * (0.5 * (s / kap) * (s / kap) - gk * gk * s / kap)
            for c in range(q):
                hvb[pgam * q + c] += -wr * g / (kap * kap) * hx[c]
        for i in range(ntouch):
            p = touched[i]
            for j in range(ntouch):
                k = touched[j]
                hvv[p * nv + k] += wr * (0.5 * rho * rho * A[p] * A[k] + rho * B[p] * B[k])
            for c in range(q):
                hvb[p * q + c] += wr * rho * hx[c] * B[p]
            flag[p] = 0
        for c in range(q):
            for c2 in range(c + 1):
                hbb[c * q + c2] += wr * rho * hx[c] * hx[c2]
    return 0


def ri2_eval(const long long[::1] row_ptr, const int[::1] slot, const double[::1] y,
             const double[:, ::1] X, const double[::1] beta, const double[::1] l0,
             const double[::1] l1, const double[::1] tau_s, const double[::1] theta_s,
             const int[::1] ptau_s, const int[::1] pth_s, double gamma, int pgam,
             const double[::1] wrow, double[::1] ll_t, double[:, ::1] gv_t, double[:, ::1] gb_t,
             double[:, ::1] hvv_t, double[:, ::1] hvb_t, double[:, ::1] hbb_t,
             int[::1] status_t, int nthreads, int need_grad, int need_hess):
    """Log-likelihood (``ll_t``), gradient (``gv_t``: variance parameters, indexed by
    ``pgam``, ``ptau_s``, ``pth_s`` in [0, nv), -1 for none; ``gb_t``: dl/dbeta) and, with
    ``need_hess``, the whole Hessian (``hvv_t`` nv x nv, ``hvb_t`` nv x q, ``hbb_t`` q x q,
    lower triangle) of the grouped random-intercept model; per-thread rows, summed by the
    caller.  Unit r holds pseudo-observations row_ptr[r]..row_ptr[r+1]-1, each with its own
    lower latent (loading l1, variance tau_s[slot]) and the unit's top latent (loading l0,
    variance gamma); residual variance theta_s[slot].  status_t != 0: Sigma of some unit
    is not positive definite (2) or scratch allocation failed."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r, P = tau_s.shape[0]
    cdef long long nobs = y.shape[0], o
    cdef int q = X.shape[1], nv = gv_t.shape[1], tid, st, i, maxn = 1
    cdef double* dbuf
    cdef int* ibuf
    cdef double* loc
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    if X.shape[0] != nobs or slot.shape[0] != nobs or l0.shape[0] != nobs or l1.shape[0] != nobs:
        raise ValueError("ri2_eval: per-observation arrays differ in length")
    if beta.shape[0] != q or theta_s.shape[0] != P or ptau_s.shape[0] != P or pth_s.shape[0] != P:
        raise ValueError("ri2_eval: shapes of beta or the per-slot arrays do not agree")
    if (ll_t.shape[0] < nthreads or gv_t.shape[0] < nthreads or gb_t.shape[0] < nthreads
            or status_t.shape[0] < nthreads or gb_t.shape[1] < q
            or (need_hess and (hvv_t.shape[0] < nthreads or hvb_t.shape[0] < nthreads
                               or hbb_t.shape[0] < nthreads or hvv_t.shape[1] < nv * nv
                               or hvb_t.shape[1] < nv * q or hbb_t.shape[1] < q * q))):
        raise ValueError("ri2_eval: per-thread outputs too small")
    if wrow.shape[0] < nrows or (nrows > 0 and (row_ptr[0] != 0 or row_ptr[nrows] != nobs)):
        raise ValueError("ri2_eval: row_ptr / wrow do not describe the observations")
    if pgam >= nv:
        raise ValueError("ri2_eval: pgam out of range")
    for r in range(nrows):
        if row_ptr[r + 1] < row_ptr[r]:
            raise ValueError("ri2_eval: row_ptr is not increasing")
        if row_ptr[r + 1] - row_ptr[r] > maxn:
            maxn = <int>(row_ptr[r + 1] - row_ptr[r])
    for i in range(P):
        if ptau_s[i] >= nv or pth_s[i] >= nv:
            raise ValueError("ri2_eval: a parameter index is not below nv")
    for o in range(nobs):
        if slot[o] < 0 or slot[o] >= P:
            raise ValueError(f"ri2_eval: slot[{o}] = {slot[o]} out of range")
    cdef Py_ssize_t nd = 2 * maxn + 2 * nv + q + 1 + nv + q + nv * nv + nv * q + q * q
    # raw pointers into the unit loop (memoryview arguments of a nogil function are
    # reference-counted atomically on every call: threads then fight over the counters)
    cdef double dummy = 0.0
    cdef const int* slot_p = &slot[0] if nobs > 0 else NULL
    cdef const double* y_p = &y[0] if nobs > 0 else NULL
    cdef const double* X_p = &X[0, 0] if nobs > 0 and q > 0 else &dummy
    cdef const double* beta_p = &beta[0] if q > 0 else &dummy
    cdef const double* l0_p = &l0[0] if nobs > 0 else NULL
    cdef const double* l1_p = &l1[0] if nobs > 0 else NULL
    cdef const double* tau_p = &tau_s[0] if P > 0 else NULL
    cdef const double* theta_p = &theta_s[0] if P > 0 else NULL
    cdef const int* ptau_p = &ptau_s[0] if P > 0 else NULL
    cdef const int* pth_p = &pth_s[0] if P > 0 else NULL
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        dbuf = <double*>malloc(nd * sizeof(double))
        ibuf = <int*>malloc((2 * nv + 1) * sizeof(int))
        if dbuf != NULL and ibuf != NULL:
            memset(dbuf, 0, nd * sizeof(double))
            memset(ibuf, 0, (2 * nv + 1) * sizeof(int))
            # layout: dv, ev (maxn), A, B (nv), hx (q), ll (1), gv (nv), gb (q), hvv, hvb, hbb
            loc = dbuf + 2 * maxn + 2 * nv + q
            for r in prange(nrows, schedule='dynamic', chunksize=256):
                if status_t[tid] == 0:
                    st = ri2_unit(row_ptr[r], row_ptr[r + 1], wrow[r], slot_p, y_p, X_p, beta_p,
                                  l0_p, l1_p, tau_p, theta_p, ptau_p, pth_p, gamma, pgam, q, nv,
                                  need_grad, need_hess, loc, loc + 1, loc + 1 + nv,
                                  loc + 1 + nv + q, loc + 1 + nv + q + nv * nv,
                                  loc + 1 + nv + q + nv * nv + nv * q,
                                  dbuf, dbuf + maxn, dbuf + 2 * maxn, dbuf + 2 * maxn + nv,
                                  ibuf, ibuf + nv, dbuf + 2 * maxn + 2 * nv)
                    if st != 0:
                        status_t[tid] = st
            ll_t[tid] = loc[0]
            for i in range(nv):
                gv_t[tid, i] = loc[1 + i]
            for i in range(q):
                gb_t[tid, i] = loc[1 + nv + i]
            if need_hess:
                for i in range(nv * nv):
                    hvv_t[tid, i] = loc[1 + nv + q + i]
                for i in range(nv * q):
                    hvb_t[tid, i] = loc[1 + nv + q + nv * nv + i]
                for i in range(q * q):
                    hbb_t[tid, i] = loc[1 + nv + q + nv * nv + nv * q + i]
        else:
            status_t[tid] = ALLOC_FAIL
        free(dbuf)
        free(ibuf)
    _raise_alloc(status_t, nd * sizeof(double))
    return 0
# --- end opt ---

# --- semfast --- the expected information of a general SEM's FIML (mlsem.model.seminfo) ------------------
from scipy.linalg.cython_blas cimport dgemm


def sem_expected_info(const long long[::1] pat_ptr, const long long[::1] row_ptr, const int[::1] slot,
                      const double[:, ::1] Sigma, const double[:, :, ::1] dS, const double[:, :, ::1] dM,
                      const double[::1] wrow, double[:, ::1] Ic, double[:, ::1] Im):
    """Adds, per missing-data pattern (S = Sigma_O^-1, w_p its rows' summed weights),
    Ic[k, l] += w_p / 2 tr(S dS_k,OO S dS_l,OO) (dS: (kc, P, P)) and, per row r,
    Im[k, l] += w_r dM_k,r,O' S dM_l,r,O (dM: (km, nrows, P)).  Serial: a few
    operations per pattern.  Returns 0, or 1 when some Sigma_O is not positive
    definite (the outputs are then incomplete)."""
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1
    cdef int P = Sigma.shape[0]
    cdef int kc = dS.shape[0], km = dM.shape[0]
    cdef int m, a, b, c, k, l, status = 0
    cdef long long p, r, o0
    cdef double wp, acc
    cdef double one = 1.0, zero = 0.0
    cdef char nn = b'N'
    if Ic.shape[0] != kc or Ic.shape[1] != kc or Im.shape[0] != km or Im.shape[1] != km:
        raise ValueError("sem_expected_info: Ic must be (kc, kc) and Im (km, km)")
    if (kc and (dS.shape[1] != P or dS.shape[2] != P)) or (km and (dM.shape[1] < pat_ptr[npat] or dM.shape[2] != P)):
        raise ValueError("sem_expected_info: dS must be (kc, P, P) and dM (km, nrows, P)")
    if row_ptr.shape[0] < pat_ptr[npat] + 1 or wrow.shape[0] < pat_ptr[npat]:
        raise ValueError("sem_expected_info: row_ptr and wrow must cover every row")
    cdef double[::1] Sb = np.empty(P * P)
    cdef double[::1] Lib = np.empty(P * P)
    cdef double[::1] Gb = np.empty(P * P)
    cdef double[::1] Ab = np.empty(max(kc, 1) * P * P)
    cdef double[::1] Db = np.empty(max(km, 1) * P)
    cdef double[::1] SDb = np.empty(max(km, 1) * P)
    cdef int[::1] idxb = np.empty(max(P, 1), dtype=np.int32)
    cdef double* S = &Sb[0]
    cdef double* Li = &Lib[0]
    cdef double* G = &Gb[0]
    cdef double* A = &Ab[0]
    cdef double* D = &Db[0]
    cdef double* SD = &SDb[0]
    cdef int* idx = &idxb[0]
    with nogil:
        for p in range(npat):
            o0 = row_ptr[pat_ptr[p]]
            m = <int>(row_ptr[pat_ptr[p] + 1] - o0)
            if m <= 0:
                continue
            for a in range(m):
                idx[a] = slot[o0 + a]
                if idx[a] < 0 or idx[a] >= P:
                    status = 2
            if status:
                break
            wp = 0.0
            for r in range(pat_ptr[p], pat_ptr[p + 1]):
                wp += wrow[r]
            for a in range(m):
                for b in range(m):
                    S[a * m + b] = Sigma[idx[a], idx[b]]
            # S^-1 = L^-T L^-1 (own loops: LAPACK's call overhead, and its
            # threads, cost more than the work on matrices this small)
            if chol_lower(S, m):
                status = 1
                break
            for b in range(m):               # Li = L^-1 (row-major, lower triangle)
                for a in range(b, m):
                    acc = 1.0 if a == b else 0.0
                    for c in range(b, a):
                        acc = acc - S[a * m + c] * Li[c * m + b]
                    Li[a * m + b] = acc / S[a * m + a]
            for a in range(m):
                for b in range(a + 1):
                    acc = 0.0
                    for c in range(a, m):
                        acc = acc + Li[c * m + a] * Li[c * m + b]
                    S[a * m + b] = acc
                    S[b * m + a] = acc
            # the covariance part: A_k = S dS_k,OO
            for k in range(kc):
                for c in range(m):                       # G = dS_k,OO, contiguous
                    for b in range(m):
                        G[c * m + b] = dS[k, idx[c], idx[b]]
                # A_k = S G (row-major); in BLAS's column-major terms A' = G' S
                dgemm(&nn, &nn, &m, &m, &m, &one, G, &m, S, &m, &zero, &A[k * m * m], &m)
            for k in range(kc):
                for l in range(k + 1):
                    acc = 0.0
                    for a in range(m):
                        for b in range(m):
                            acc = acc + A[(k * m + a) * m + b] * A[(l * m + b) * m + a]
                    Ic[k, l] += 0.5 * wp * acc
                    if l != k:
                        Ic[l, k] += 0.5 * wp * acc
            # the mean part, per row
            if km == 0:
                continue
            for r in range(pat_ptr[p], pat_ptr[p + 1]):
                for k in range(km):
                    for a in range(m):
                        D[k * m + a] = dM[k, r, idx[a]]
                for k in range(km):
                    for a in range(m):
                        acc = 0.0
                        for b in range(m):
                            acc = acc + S[a * m + b] * D[k * m + b]
                        SD[k * m + a] = acc
                for k in range(km):
                    for l in range(k + 1):
                        acc = 0.0
                        for a in range(m):
                            acc = acc + D[k * m + a] * SD[l * m + a]
                        Im[k, l] += wrow[r] * acc
                        if l != k:
                            Im[l, k] += wrow[r] * acc
    if status == 2:
        raise ValueError("sem_expected_info: a slot index outside 0..P-1")
    return status
# --- end semfast ---
# --- unst --------------------------------------------------------------------------------------
# Grouped random intercepts with a general covariance of the latents (issue 14, mlsem.model.unst):
# per unit (m pseudo-observations) Sigma = L Phi_c L' + D is formed and factored (m x m), and
# the unit's log-likelihood, its derivatives in Phi (entry-level), theta and beta, and every
# second derivative except the Phi-Phi block are accumulated per thread.  The Phi-Phi block is
# sum_units of products of K = L'Sigma^-1 L and g g' (g = L'Sigma^-1 e): the kernel writes each
# unit's vech(K) and vech(g g') (times sqrt(weight)) into rows of Kv, Gv, and the caller forms
# Kv'Kv and Kv'Gv with one matrix product each (see mlsem.model.unst for the algebra).

cdef inline void unst_chol_inv(double* A, double* W, int m) noexcept nogil:
    """A holds the lower Cholesky factor L (row-major m x m); on return A = (L L')^-1
    (both triangles).  W: m x m scratch (gets L^-1 in its lower triangle)."""
    cdef int i, j, k, a, b
    cdef double s
    for j in range(m):
        W[j * m + j] = 1.0 / A[j * m + j]
        for i in range(j + 1, m):
            s = 0.0
            for k in range(j, i):
                s -= A[i * m + k] * W[k * m + j]
            W[i * m + j] = s / A[i * m + i]
    for a in range(m):
        for b in range(a + 1):
            s = 0.0
            for k in range(a, m):
                s += W[k * m + a] * W[k * m + b]
            A[a * m + b] = s
            A[b * m + a] = s


cdef int unst_unit(long long o0, long long o1, double wr, double sw, int nl, int M, int q, int nt,
                   const int* slot, const double* y, const double* X, const double* beta,
                   const double* load, const int* lat, const double* Phi, const double* theta_s,
                   const int* pth, int need_hess, const int* vi, int ne,
                   double* acc, double* kvrow, double* gvrow, double* vout, double* rout,
                   double* S, double* W, double* e, double* rr, double* V, double* K, double* g,
                   double* XS, double* Z, int* lst, int* flag) noexcept nogil:
    cdef int m = <int>(o1 - o0), nq = 0, t, u, c, c1, c2, a, b, i, j, st, su, pt, pu, ret = 0
    cdef long long ot, ou
    cdef double v, la, th, logdet = 0.0, quad = 0.0, s
    cdef double* gphi = acc + 1
    cdef double* gth = gphi + M * M
    cdef double* gb = gth + nt
    cdef double* htt = gb + q
    cdef double* htb = htt + nt * nt
    cdef double* hbb = htb + nt * q
    cdef double* hpb = hbb + q * q
    for t in range(m):
        ot = o0 + t
        st = slot[ot]
        if not (theta_s[st] > 0.0):
            ret = 2
        v = y[ot]
        for c in range(q):
            v -= X[ot * q + c] * beta[c]
        e[t] = v
        for c in range(nl):
            a = lat[st * nl + c]
            if a >= 0 and flag[a] == 0:
                flag[a] = 1
                lst[nq] = a
                nq = nq + 1
    if ret == 0:
        for t in range(m):
            ot = o0 + t
            st = slot[ot]
            for u in range(t + 1):
                ou = o0 + u
                su = slot[ou]
                v = 0.0
                for c1 in range(nl):
                    a = lat[st * nl + c1]
                    if a < 0:
                        continue
                    la = load[ot * nl + c1]
                    for c2 in range(nl):
                        b = lat[su * nl + c2]
                        if b >= 0:
                            v += la * load[ou * nl + c2] * Phi[a * M + b]
                if u == t:
                    v += theta_s[st]
                S[t * m + u] = v
                S[u * m + t] = v
        if chol_lower(S, m) != 0:
            ret = 2
    if ret != 0:
        for i in range(nq):
            flag[lst[i]] = 0
        return ret
    for t in range(m):
        logdet += 2.0 * log(S[t * m + t])
    unst_chol_inv(S, W, m)
    for t in range(m):
        v = 0.0
        for u in range(m):
            v += S[t * m + u] * e[u]
        rr[t] = v
        quad += e[t] * v
    acc[0] += wr * (-0.5) * (m * LOG2PI + logdet + quad)
    # V = Sigma^-1 L (m x M, the unit's latents only), K = L'V, g = L'r
    for t in range(m):
        for i in range(nq):
            V[t * M + lst[i]] = 0.0
    for i in range(nq):
        g[lst[i]] = 0.0
        for j in range(nq):
            K[lst[i] * M + lst[j]] = 0.0
    for u in range(m):
        ou = o0 + u
        su = slot[ou]
        for c in range(nl):
            a = lat[su * nl + c]
            if a < 0:
                continue
            la = load[ou * nl + c]
            g[a] += la * rr[u]
            for t in range(m):
                V[t * M + a] += S[t * m + u] * la
    for u in range(m):
        ou = o0 + u
        su = slot[ou]
        for c in range(nl):
            a = lat[su * nl + c]
            if a < 0:
                continue
            la = load[ou * nl + c]
            for j in range(nq):
                b = lst[j]
                K[a * M + b] += la * V[u * M + b]
    for i in range(ne):
        kvrow[i] = 0.0
        gvrow[i] = 0.0
    for i in range(nq):
        a = lst[i]
        for j in range(nq):
            b = lst[j]
            gphi[a * M + b] += 0.5 * wr * (g[a] * g[b] - K[a * M + b])
            kvrow[vi[a * M + b]] = sw * K[a * M + b]
            gvrow[vi[a * M + b]] = sw * g[a] * g[b]
    for t in range(m):
        rout[t] = rr[t]
        for a in range(2 * M):
            vout[t * 2 * M + a] = 0.0
        for i in range(nq):
            a = lst[i]
            vout[t * 2 * M + a] = V[t * M + a]
            vout[t * 2 * M + M + a] = rr[t] * g[a]
    for t in range(m):
        ot = o0 + t
        pt = pth[slot[ot]]
        gth[pt] += 0.5 * wr * (rr[t] * rr[t] - S[t * m + t])
        for c in range(q):
            gb[c] += wr * X[ot * q + c] * rr[t]
    if need_hess:
        for c in range(q):
            for u in range(m):
                v = 0.0
                for t in range(m):
                    v += X[(o0 + t) * q + c] * S[t * m + u]
                XS[c * m + u] = v
            for c2 in range(c + 1):
                v = 0.0
                for u in range(m):
                    v += XS[c * m + u] * X[(o0 + u) * q + c2]
                hbb[c * q + c2] -= wr * v
            # Z = X'V (q x M) and the Phi-beta block -Z_a g_b
            for i in range(nq):
                a = lst[i]
                v = 0.0
                for t in range(m):
                    v += X[(o0 + t) * q + c] * V[t * M + a]
                Z[c * M + a] = v
        for i in range(nq):
            a = lst[i]
            for j in range(nq):
                b = lst[j]
                for c in range(q):
                    hpb[(a * M + b) * q + c] -= wr * Z[c * M + a] * g[b]
        for t in range(m):
            pt = pth[slot[o0 + t]]
            for u in range(m):
                pu = pth[slot[o0 + u]]
                s = S[t * m + u]
                htt[pt * nt + pu] += wr * (0.5 * s * s - rr[t] * rr[u] * s)
            for c in range(q):
                htb[pt * q + c] -= wr * XS[c * m + t] * rr[t]
    for i in range(nq):
        flag[lst[i]] = 0
    return 0


def unst_eval(const long long[::1] row_ptr, long long r0, long long r1, const int[::1] slot,
              const double[::1] y, const double[:, ::1] X, const double[::1] beta,
              const double[:, ::1] load, const int[:, ::1] lat, const double[:, ::1] Phi,
              const double[::1] theta_s, const int[::1] pth_s, const double[::1] wrow,
              const int[:, ::1] vi, double[:, ::1] acc_t, double[:, ::1] Kv, double[:, ::1] Gv,
              double[:, ::1] Vo, double[::1] ro,
              int[::1] status_t, int nthreads, int need_hess):
    """Units r0..r1-1 of the grouped model with a general Phi (mlsem.model.unst).  Unit r holds
    pseudo-observations row_ptr[r]..row_ptr[r+1]-1; pseudo-observation o of slot s loads
    load[o, c] on latent lat[s, c] (c < nl, -1 none), has residual variance theta_s[s] (compact
    parameter pth_s[s] < nt) and mean X[o] beta.  Adds, per thread, to acc_t[tid] the layout
    [ll | dl/dPhi (M*M, entries) | dl/dtheta (nt) | dl/dbeta (q) | H theta-theta (nt*nt) |
    H theta-beta (nt*q) | H beta-beta (q*q, lower) | H Phi-beta (M*M*q, entries)]
    (the Hessian parts with ``need_hess``) and writes row r - r0 of Kv, Gv: sqrt(wrow[r]) times
    vech(K) and vech(g g') (vech index vi[a, b] < ne), and per pseudo-observation o (row
    o - row_ptr[r0] of Vo (2M), ro) its row of V = Sigma^-1 L (M), then r_o g (M, g its unit's),
    and its r = (Sigma^-1 e)_o, from which the caller forms the Phi-theta block.  status_t != 0: a unit's Sigma is not
    positive definite (2) or scratch allocation failed."""
    cdef long long nrows = row_ptr.shape[0] - 1, r, o, nobs = y.shape[0]
    cdef int q = X.shape[1], nl = lat.shape[1], M = Phi.shape[0], P = theta_s.shape[0]
    cdef int ne = Kv.shape[1], nt = 0, tid, st, i, maxn = 1
    cdef Py_ssize_t nacc
    cdef double* dbuf
    cdef int* ibuf
    cdef double* loc
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    if r0 < 0 or r1 > nrows or r1 < r0 or Kv.shape[0] < r1 - r0 or Gv.shape[0] < r1 - r0 or Gv.shape[1] != ne:
        raise ValueError("unst_eval: unit range or Kv / Gv rows do not agree")
    if X.shape[0] != nobs or slot.shape[0] != nobs or load.shape[0] != nobs or load.shape[1] != nl:
        raise ValueError("unst_eval: per-observation arrays differ in length")
    if beta.shape[0] != q or pth_s.shape[0] != P or lat.shape[0] != P or Phi.shape[1] != M:
        raise ValueError("unst_eval: shapes of beta, Phi or the per-slot arrays do not agree")
    if vi.shape[0] != M or vi.shape[1] != M:
        raise ValueError("unst_eval: vi must be M x M")
    for i in range(M * M):
        if vi[i // M, i % M] < 0 or vi[i // M, i % M] >= ne:
            raise ValueError("unst_eval: a vech index is out of range")
    for i in range(P):
        if pth_s[i] < 0:
            raise ValueError("unst_eval: a slot without a residual variance parameter")
        if pth_s[i] + 1 > nt:
            nt = pth_s[i] + 1
        for st in range(nl):
            if lat[i, st] >= M:
                raise ValueError("unst_eval: a latent index is not below M")
    nacc = 1 + M * M + nt + q + nt * nt + nt * q + q * q + M * M * q
    cdef long long ob = row_ptr[r0] if nrows > 0 else 0, no = (row_ptr[r1] if nrows > 0 else 0) - ob
    if Vo.shape[0] < no or ro.shape[0] < no or Vo.shape[1] != 2 * M:
        raise ValueError("unst_eval: Vo / ro too small")
    if acc_t.shape[0] < nthreads or status_t.shape[0] < nthreads or acc_t.shape[1] < nacc:
        raise ValueError("unst_eval: per-thread outputs too small")
    if wrow.shape[0] < nrows or (nrows > 0 and (row_ptr[0] != 0 or row_ptr[nrows] != nobs)):
        raise ValueError("unst_eval: row_ptr / wrow do not describe the observations")
    for r in range(nrows):
        if row_ptr[r + 1] < row_ptr[r]:
            raise ValueError("unst_eval: row_ptr is not increasing")
        if r >= r0 and r < r1 and row_ptr[r + 1] - row_ptr[r] > maxn:
            maxn = <int>(row_ptr[r + 1] - row_ptr[r])
    for o in range(nobs):
        if slot[o] < 0 or slot[o] >= P:
            raise ValueError(f"unst_eval: slot[{o}] = {slot[o]} out of range")
    cdef Py_ssize_t nd = nacc + 2 * maxn * maxn + 2 * maxn + maxn * M + M * M + M + q * maxn + q * M
    cdef double dummy = 0.0
    cdef const int* slot_p = &slot[0] if nobs > 0 else NULL
    cdef const double* y_p = &y[0] if nobs > 0 else NULL
    cdef const double* X_p = &X[0, 0] if nobs > 0 and q > 0 else &dummy
    cdef const double* beta_p = &beta[0] if q > 0 else &dummy
    cdef const double* load_p = &load[0, 0] if nobs > 0 and nl > 0 else &dummy
    cdef const int* lat_p = &lat[0, 0] if P > 0 and nl > 0 else NULL
    cdef const double* Phi_p = &Phi[0, 0] if M > 0 else &dummy
    cdef const double* theta_p = &theta_s[0] if P > 0 else NULL
    cdef const int* pth_p = &pth_s[0] if P > 0 else NULL
    cdef const int* vi_p = &vi[0, 0] if M > 0 else NULL
    cdef double* kv_p = &Kv[0, 0] if r1 > r0 and ne > 0 else &dummy
    cdef double* gv_p = &Gv[0, 0] if r1 > r0 and ne > 0 else &dummy
    cdef double* vo_p = &Vo[0, 0] if no > 0 and M > 0 else &dummy
    cdef double* ro_p = &ro[0] if no > 0 else &dummy
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        dbuf = <double*>malloc(nd * sizeof(double))
        ibuf = <int*>malloc((2 * M + 1) * sizeof(int))
        if dbuf != NULL and ibuf != NULL:
            memset(dbuf, 0, nd * sizeof(double))
            memset(ibuf, 0, (2 * M + 1) * sizeof(int))
            loc = dbuf + (nd - nacc)
            for r in prange(r0, r1, schedule='dynamic', chunksize=256):
                if status_t[tid] == 0:
                    st = unst_unit(row_ptr[r], row_ptr[r + 1], wrow[r], sqrt(wrow[r]), nl, M, q, nt,
                                   slot_p, y_p, X_p, beta_p, load_p, lat_p, Phi_p, theta_p, pth_p,
                                   need_hess, vi_p, ne, loc, kv_p + (r - r0) * ne, gv_p + (r - r0) * ne,
                                   vo_p + (row_ptr[r] - ob) * 2 * M, ro_p + (row_ptr[r] - ob),
                                   dbuf, dbuf + maxn * maxn, dbuf + 2 * maxn * maxn,
                                   dbuf + 2 * maxn * maxn + maxn,
                                   dbuf + 2 * maxn * maxn + 2 * maxn,
                                   dbuf + 2 * maxn * maxn + 2 * maxn + maxn * M,
                                   dbuf + 2 * maxn * maxn + 2 * maxn + maxn * M + M * M,
                                   dbuf + 2 * maxn * maxn + 2 * maxn + maxn * M + M * M + M,
                                   dbuf + 2 * maxn * maxn + 2 * maxn + maxn * M + M * M + M + q * maxn,
                                   ibuf, ibuf + M)
                    if st != 0:
                        status_t[tid] = st
            for i in range(nacc):
                acc_t[tid, i] += loc[i]
        else:
            status_t[tid] = ALLOC_FAIL
        free(dbuf)
        free(ibuf)
    _raise_alloc(status_t, nd * sizeof(double))
    return nt
# --- end unst ---

# --- mprep2 --- several outcomes: each outcome's least-squares cross products in one pass ---------
# (mlsem.model.multivariate.MultiModel.outcome_ols; tests/model/test_multivariate_prep.py checks
# them against lstsq on each outcome's gathered cells)

def outcome_cross(const int[::1] slot, const int[::1] sout, const double[::1] y,
                  const double[:, ::1] Xc, const int[::1] qo, double[:, :, ::1] P, int[::1] ocell):
    """Adds to P[o] (k x k, k >= 2 + max qo) the cross products of z = [1, Xc[c, :qo[o]], y[c]]
    over the cells c of outcome o = sout[slot[c]] (P[o]'s leading qo[o] + 2 square); writes
    ocell[c] = o."""
    cdef Py_ssize_t c, m = slot.shape[0]
    cdef int o, a, b, n, nout = qo.shape[0], k = P.shape[1], qx = Xc.shape[1]
    cdef double z[66]
    if y.shape[0] != m or Xc.shape[0] != m or ocell.shape[0] != m or P.shape[0] != nout \
            or P.shape[2] != k:
        raise ValueError("outcome_cross: shapes do not agree")
    for o in range(nout):
        if qo[o] < 0 or qo[o] > qx or qo[o] + 2 > k or qo[o] > 64:
            raise ValueError("outcome_cross: an outcome's columns exceed the compact design's")
    for c in range(m):
        if slot[c] < 0 or slot[c] >= sout.shape[0] or sout[slot[c]] < 0 or sout[slot[c]] >= nout:
            raise ValueError(f"outcome_cross: slot or outcome of cell {c} out of range")
    with nogil:
        for c in range(m):
            o = sout[slot[c]]
            ocell[c] = o
            n = qo[o] + 2
            z[0] = 1.0
            for a in range(qo[o]):
                z[1 + a] = Xc[c, a]
            z[n - 1] = y[c]
            for a in range(n):
                for b in range(a, n):
                    P[o, a, b] += z[a] * z[b]
        for o in range(nout):
            n = qo[o] + 2
            for a in range(n):
                for b in range(a):
                    P[o, a, b] = P[o, b, a]
    return 0
# --- end mprep2 ---

# --- semfast2 --- the exact observed information of a linear SEM's FIML (mlsem.model.seminfo) -----------


def sem_observed_info(const long long[::1] pat_ptr, const long long[::1] row_ptr, const int[::1] slot,
                      const double[:, ::1] Sigma, const double[:, :, ::1] dS, const double[:, :, ::1] dM,
                      const double[::1] resid, const double[::1] wrow, double[:, ::1] Ic,
                      double[:, ::1] Im, double[:, ::1] Icm):
    """-d2l/dpsi2 of the FIML log-likelihood where Sigma and the row means are
    linear in the parameters (their second derivatives vanish).  Per pattern
    (S = Sigma_O^-1, w_p its rows' summed weights, A_k = S dS_k,OO) and per row r
    (weight w_r, e = resid_r, s = S e, v_k = dS_k,OO s, D_j = dM_j,r,O):

        Ic[k, l]  += w_r v_k' S v_l - w_p / 2 tr(A_k A_l)
        Im[j, h]  += w_r D_j' S D_h
        Icm[k, j] += w_r v_k' S D_j

    (dS: (kc, P, P), dM: (km, nrows, P), resid: per observation, in the
    rows' slot order).  Serial.  Returns 0, or 1 when some Sigma_O is not
    positive definite (the outputs are then incomplete)."""
    cdef Py_ssize_t npat = pat_ptr.shape[0] - 1
    cdef int P = Sigma.shape[0]
    cdef int kc = dS.shape[0], km = dM.shape[0]
    cdef int m, a, b, c, k, l, status = 0
    cdef long long p, r, o0, orow
    cdef double wp, acc, wr
    cdef double one = 1.0, zero = 0.0
    cdef char nn = b'N'
    if (Ic.shape[0] != kc or Ic.shape[1] != kc or Im.shape[0] != km or Im.shape[1] != km
            or Icm.shape[0] != kc or Icm.shape[1] != km):
        raise ValueError("sem_observed_info: Ic must be (kc, kc), Im (km, km) and Icm (kc, km)")
    if (kc and (dS.shape[1] != P or dS.shape[2] != P)) or (km and (dM.shape[1] < pat_ptr[npat] or dM.shape[2] != P)):
        raise ValueError("sem_observed_info: dS must be (kc, P, P) and dM (km, nrows, P)")
    if row_ptr.shape[0] < pat_ptr[npat] + 1 or wrow.shape[0] < pat_ptr[npat]:
        raise ValueError("sem_observed_info: row_ptr and wrow must cover every row")
    if resid.shape[0] < row_ptr[pat_ptr[npat]] or slot.shape[0] < row_ptr[pat_ptr[npat]]:
        raise ValueError("sem_observed_info: resid and slot must cover every observation")
    cdef double[::1] Sb = np.empty(P * P)
    cdef double[::1] Lib = np.empty(P * P)
    cdef double[::1] Gb = np.empty(max(kc, 1) * P * P)
    cdef double[::1] Ab = np.empty(max(kc, 1) * P * P)
    cdef double[::1] Db = np.empty(max(km, 1) * P)
    cdef double[::1] SDb = np.empty(max(km, 1) * P)
    cdef double[::1] Vb = np.empty(max(kc, 1) * P)
    cdef double[::1] SVb = np.empty(max(kc, 1) * P)
    cdef double[::1] sb = np.empty(max(P, 1))
    cdef int[::1] idxb = np.empty(max(P, 1), dtype=np.int32)
    cdef double* S = &Sb[0]
    cdef double* Li = &Lib[0]
    cdef double* G = &Gb[0]
    cdef double* A = &Ab[0]
    cdef double* D = &Db[0]
    cdef double* SD = &SDb[0]
    cdef double* V = &Vb[0]
    cdef double* SV = &SVb[0]
    cdef double* s = &sb[0]
    cdef int* idx = &idxb[0]
    with nogil:
        for p in range(npat):
            o0 = row_ptr[pat_ptr[p]]
            m = <int>(row_ptr[pat_ptr[p] + 1] - o0)
            if m <= 0:
                continue
            for a in range(m):
                idx[a] = slot[o0 + a]
                if idx[a] < 0 or idx[a] >= P:
                    status = 2
            for r in range(pat_ptr[p], pat_ptr[p + 1]):
                if row_ptr[r + 1] - row_ptr[r] != m:
                    status = 3
                else:
                    for a in range(m):
                        if slot[row_ptr[r] + a] != idx[a]:
                            status = 3
            if status:
                break
            wp = 0.0
            for r in range(pat_ptr[p], pat_ptr[p + 1]):
                wp += wrow[r]
            for a in range(m):
                for b in range(m):
                    S[a * m + b] = Sigma[idx[a], idx[b]]
            if chol_lower(S, m):
                status = 1
                break
            for b in range(m):               # Li = L^-1 (row-major, lower triangle)
                for a in range(b, m):
                    acc = 1.0 if a == b else 0.0
                    for c in range(b, a):
                        acc = acc - S[a * m + c] * Li[c * m + b]
                    Li[a * m + b] = acc / S[a * m + a]
            for a in range(m):
                for b in range(a + 1):
                    acc = 0.0
                    for c in range(a, m):
                        acc = acc + Li[c * m + a] * Li[c * m + b]
                    S[a * m + b] = acc
                    S[b * m + a] = acc
            for k in range(kc):
                for c in range(m):                       # G_k = dS_k,OO, contiguous
                    for b in range(m):
                        G[(k * m + c) * m + b] = dS[k, idx[c], idx[b]]
                # A_k = S G_k (row-major); in BLAS's column-major terms A' = G' S
                dgemm(&nn, &nn, &m, &m, &m, &one, &G[k * m * m], &m, S, &m, &zero, &A[k * m * m], &m)
            for k in range(kc):
                for l in range(k + 1):
                    acc = 0.0
                    for a in range(m):
                        for b in range(m):
                            acc = acc + A[(k * m + a) * m + b] * A[(l * m + b) * m + a]
                    Ic[k, l] -= 0.5 * wp * acc
                    if l != k:
                        Ic[l, k] -= 0.5 * wp * acc
            for r in range(pat_ptr[p], pat_ptr[p + 1]):
                wr = wrow[r]
                orow = row_ptr[r]
                for a in range(m):                       # s = S e
                    acc = 0.0
                    for b in range(m):
                        acc = acc + S[a * m + b] * resid[orow + b]
                    s[a] = acc
                for k in range(kc):                      # v_k = G_k s, S v_k = A_k s
                    for a in range(m):
                        acc = 0.0
                        for b in range(m):
                            acc = acc + G[(k * m + a) * m + b] * s[b]
                        V[k * m + a] = acc
                        acc = 0.0
                        for b in range(m):
                            acc = acc + A[(k * m + a) * m + b] * s[b]
                        SV[k * m + a] = acc
                for k in range(kc):
                    for l in range(k + 1):
                        acc = 0.0
                        for a in range(m):
                            acc = acc + V[k * m + a] * SV[l * m + a]
                        Ic[k, l] += wr * acc
                        if l != k:
                            Ic[l, k] += wr * acc
                if km == 0:
                    continue
                for k in range(km):
                    for a in range(m):
                        D[k * m + a] = dM[k, r, idx[a]]
                for k in range(km):
                    for a in range(m):
                        acc = 0.0
                        for b in range(m):
                            acc = acc + S[a * m + b] * D[k * m + b]
                        SD[k * m + a] = acc
                for k in range(km):
                    for l in range(k + 1):
                        acc = 0.0
                        for a in range(m):
                            acc = acc + D[k * m + a] * SD[l * m + a]
                        Im[k, l] += wr * acc
                        if l != k:
                            Im[l, k] += wr * acc
                for k in range(kc):
                    for l in range(km):
                        acc = 0.0
                        for a in range(m):
                            acc = acc + V[k * m + a] * SD[l * m + a]
                        Icm[k, l] += wr * acc
    if status == 2:
        raise ValueError("sem_observed_info: a slot index outside 0..P-1")
    if status == 3:
        raise ValueError("sem_observed_info: the rows of a pattern do not share its observed slots")
    return status
# --- end semfast2 ---

# --- mri2 --------------------------------------------------------------------------------------
# Grouped random intercepts of several outcomes at two nested levels (issue 15, mlsem.model.mri2):
# per top unit (county), schools j of cells (pseudo-unit, outcome), Sigma = blockdiag_j Sigma_j
# + A Gam A', Sigma_j = B_j Tau B_j' + blockdiag_u R[S_u, S_u].  Each school is dense (a few
# cells); the county's effect is integrated out in closed form, F(Gam, M, a) with
# M = sum_j A_j' Sigma_j^-1 A_j, a = sum_j A_j' Sigma_j^-1 e_j (nout x nout algebra).  Returns the
# log-likelihood, the gradient and the whole Hessian in the entries of Gam, Tau, R and beta.

cdef inline int mri2_inv(double* S, double* Y, double* T, int n, double* logdet) noexcept nogil:
    """S (n x n SPD, row-major) -> its Cholesky factor in place, Y = S^-1, T scratch
    (n x n); logdet = log|S|.  Returns 1 if S is not positive definite."""
    cdef int i, j, k
    cdef double s
    if chol_lower(S, n) != 0:
        return 1
    logdet[0] = 0.0
    for i in range(n):
        logdet[0] += 2.0 * log(S[i * n + i])
    # T = L^-1 (lower)
    for i in range(n):
        for j in range(n):
            T[i * n + j] = 0.0
    for j in range(n):
        T[j * n + j] = 1.0 / S[j * n + j]
        for i in range(j + 1, n):
            s = 0.0
            for k in range(j, i):
                s -= S[i * n + k] * T[k * n + j]
            T[i * n + j] = s / S[i * n + i]
    # Y = T' T
    for i in range(n):
        for j in range(i, n):
            s = 0.0
            for k in range(j, n):
                s += T[k * n + i] * T[k * n + j]
            Y[i * n + j] = s
            Y[j * n + i] = s
    return 0


cdef int mri2_school(long long c0, int n, const int* cout, const int* cpu, const double* l0,
                     const double* l1, const double* y, const double* Xc, int kx,
                     const int* xoff, const double* beta, int nout, int q,
                     const double* Tau, const double* R,
                     double* Sg, double* Y, double* T1, double* e, double* w, double* HA,
                     double* s_out) noexcept nogil:
    """Sigma_j of the school's cells c0..c0+n-1, Y = Sigma_j^-1, e, w = Y e, HA = Y A
    (n x nout); s_out = -1/2 (log|Sigma_j| + e'w).  Returns 2 if not positive definite."""
    cdef int c, d, oc, od, k
    cdef double ld, t
    for c in range(n):
        oc = cout[c0 + c]
        for d in range(n):
            od = cout[c0 + d]
            t = l1[c0 + c] * l1[c0 + d] * Tau[oc * nout + od]
            if cpu[c0 + c] == cpu[c0 + d]:
                t = t + R[oc * nout + od]
            Sg[c * n + d] = t
        t = y[c0 + c]
        for k in range(xoff[oc + 1] - xoff[oc]):
            t = t - Xc[(c0 + c) * kx + k] * beta[xoff[oc] + k]
        e[c] = t
    if mri2_inv(Sg, Y, T1, n, &ld) != 0:
        return 2
    t = 0.0
    for c in range(n):
        w[c] = 0.0
        for d in range(n):
            w[c] += Y[c * n + d] * e[d]
        t += e[c] * w[c]
        for k in range(nout):
            HA[c * nout + k] = 0.0
        for d in range(n):
            HA[c * nout + cout[c0 + d]] += Y[c * n + d] * l0[c0 + d]
    s_out[0] = -0.5 * (ld + t)
    return 0


cdef int mri2_unit(long long s0, long long s1, const long long* sch_ptr, double wr,
                   const int* cout, const int* cpu, const double* l0, const double* l1,
                   const double* y, const double* Xc, int kx, const int* xoff,
                   const double* beta, int nout, int q, const int* ea, const int* eb,
                   const double* LG, const double* Tau, const double* R, int need_hess,
                   double* ll, double* gout, double* hout, double* buf, int* ibuf, int maxn,
                   int maxcc) noexcept nogil:
    cdef int V = nout * (nout + 1) // 2, V2 = nout * (nout + 1), Ps = V2 + q, Z = V + Ps
    cdef int nn = nout * nout, n, i, k, c, d, a, b, x, z, e1, e2, t1, t2, oc, od, ia, ib
    cdef int p1, p2, nz1, nz2, xa, da_, xb, db_, cap = maxn * maxn, i0, single
    cdef long long sj, c0, ncell = 0, yo, co
    cdef double sv, sacc = 0.0, val, ldk, f, ind, fc, s1v, l2
    # county accumulators
    cdef double* gs = buf
    cdef double* hs = gs + Ps
    cdef double* Mc = hs + Ps * Ps
    cdef double* ac = Mc + nn
    cdef double* dM = ac + nout              # (V2, nn)
    cdef double* da = dM + V2 * nn           # (Ps, nout)
    cdef double* K = da + Ps * nout          # nn
    cdef double* Kinv = K + nn
    cdef double* C = Kinv + nn
    cdef double* m = C + nn
    cdef double* N = m + nout                # I - C M
    cdef double* bb = N + nn                 # N' a
    cdef double* Mt = bb + nout              # M - M C M
    cdef double* psi = Mt + nn               # C + m m'
    cdef double* W1 = psi + nn               # nn scratch
    cdef double* CdM = W1 + nn               # (Ps, nn)
    cdef double* dMm = CdM + Ps * nn         # (Ps, nout)
    cdef double* CdMm = dMm + Ps * nout
    cdef double* Cda = CdMm + Ps * nout
    cdef double* NdMm = Cda + Ps * nout
    cdef double* NdMN = NdMm + Ps * nout     # (Ps, nn)
    cdef double* Nda = NdMN + Ps * nn
    # the county's schools from pass 1: Y_j (consecutive n x n blocks), w, H = Y A per cell
    cdef double* Ycb = Nda + Ps * nout       # maxcc * maxn
    cdef double* wcb = Ycb + maxcc * maxn
    cdef double* HAcb = wcb + maxcc          # maxcc * nout
    # school scratch
    cdef double* Sg = HAcb + maxcc * nout
    cdef double* T1 = Sg + cap
    cdef double* e = T1 + cap
    cdef double* Xd = e + maxn               # (n, q)
    cdef double* HX = Xd + maxn * q
    cdef double* h = HX + maxn * q
    cdef double* G = h + maxn                # H Psi H'
    cdef double* nzv = G + cap               # (V2, cap) nonzeros of dSigma_j / dtheta_i
    cdef double* u = nzv + V2 * cap          # (V2, n)
    cdef double* v = u + V2 * maxn
    cdef double* Sh = v + V2 * maxn
    cdef int* nzx = ibuf
    cdef int* nzd = nzx + V2 * cap
    cdef int* nzc = nzd + V2 * cap
    cdef double* Y
    cdef double* w
    cdef double* HA
    memset(buf, 0, (Ps + Ps * Ps + nn + nout + V2 * nn + Ps * nout) * sizeof(double))
    # pass 1: the schools' inverses, M and a
    yo = 0
    co = 0
    for sj in range(s0, s1):
        c0 = sch_ptr[sj]
        n = <int>(sch_ptr[sj + 1] - c0)
        ncell += n
        Y = Ycb + yo
        w = wcb + co
        HA = HAcb + co * nout
        if mri2_school(c0, n, cout, cpu, l0, l1, y, Xc, kx, xoff, beta, nout, q, Tau, R,
                       Sg, Y, T1, e, w, HA, &sv) != 0:
            return 2
        yo += n * n
        co += n
        sacc += sv
        for c in range(n):
            oc = cout[c0 + c]
            ac[oc] += l0[c0 + c] * w[c]
            for b in range(nout):
                Mc[oc * nout + b] += l0[c0 + c] * HA[c * nout + b]
    # K = I + LG' M LG, C = LG K^-1 LG', m = C a
    for a in range(nout):
        for b in range(nout):
            val = 0.0
            for x in range(nout):
                val += Mc[a * nout + x] * LG[x * nout + b]
            W1[a * nout + b] = val                       # M LG
    for a in range(nout):
        for b in range(nout):
            val = 1.0 if a == b else 0.0
            for x in range(nout):
                val += LG[x * nout + a] * W1[x * nout + b]
            K[a * nout + b] = val
    if mri2_inv(K, Kinv, T1, nout, &ldk) != 0:
        return 2
    for a in range(nout):
        for b in range(nout):
            val = 0.0
            for x in range(nout):
                val += Kinv[a * nout + x] * LG[b * nout + x]
            W1[a * nout + b] = val                       # K^-1 LG'
    for a in range(nout):
        for b in range(nout):
            val = 0.0
            for x in range(nout):
                val += LG[a * nout + x] * W1[x * nout + b]
            C[a * nout + b] = val
    fc = 0.0
    for a in range(nout):
        val = 0.0
        for b in range(nout):
            val += C[a * nout + b] * ac[b]
        m[a] = val
        fc += 0.5 * ac[a] * val
    fc -= 0.5 * ldk
    for a in range(nout):
        for b in range(nout):
            val = 1.0 if a == b else 0.0
            for x in range(nout):
                val -= C[a * nout + x] * Mc[x * nout + b]
            N[a * nout + b] = val
            psi[a * nout + b] = C[a * nout + b] + m[a] * m[b]
    for a in range(nout):
        val = ac[a]
        for x in range(nout):
            val -= Mc[a * nout + x] * m[x]
        bb[a] = val
        for b in range(nout):
            val = 0.0
            for x in range(nout):
                val += Mc[a * nout + x] * N[x * nout + b]
            Mt[a * nout + b] = val                       # M (I - C M)
    # pass 2: the schools' derivatives (dSigma_j/dtheta_i as lists of nonzeros)
    yo = 0
    co = 0
    for sj in range(s0, s1):
        c0 = sch_ptr[sj]
        n = <int>(sch_ptr[sj + 1] - c0)
        Y = Ycb + yo
        w = wcb + co
        HA = HAcb + co * nout
        yo += n * n
        co += n
        for c in range(n):
            h[c] = 0.0
            for a in range(nout):
                h[c] += HA[c * nout + a] * m[a]
            for k in range(q):
                Xd[c * q + k] = 0.0
            oc = cout[c0 + c]
            for k in range(xoff[oc + 1] - xoff[oc]):
                Xd[c * q + xoff[oc] + k] = Xc[(c0 + c) * kx + k]
        for c in range(n):
            for k in range(q):
                val = 0.0
                for d in range(n):
                    val += Y[c * n + d] * Xd[d * q + k]
                HX[c * q + k] = val
        if need_hess:
            for c in range(n):
                for d in range(c, n):
                    val = 0.0
                    for a in range(nout):
                        f = 0.0
                        for b in range(nout):
                            f += psi[a * nout + b] * HA[d * nout + b]
                        val += HA[c * nout + a] * f
                    G[c * n + d] = val
                    G[d * n + c] = val
        # a school of one pseudo-unit, one loading: dSigma_j/dTau_ab = l^2 dSigma_j/dR_ab, so
        # every Tau argument's terms are the R argument's times l^2 (l^4 for two Tau's)
        single = 1
        for c in range(1, n):
            if cpu[c0 + c] != cpu[c0] or l1[c0 + c] != l1[c0]:
                single = 0
        l2 = l1[c0] * l1[c0]
        i0 = V if single else 0
        for i in range(i0, V2):
            a = ea[i % V]
            b = eb[i % V]
            nz1 = 0
            for c in range(n):
                oc = cout[c0 + c]
                for d in range(n):
                    od = cout[c0 + d]
                    if (oc == a and od == b) or (oc == b and od == a):
                        if i < V:
                            ind = l1[c0 + c] * l1[c0 + d]
                            if ind == 0.0:
                                continue
                        elif cpu[c0 + c] != cpu[c0 + d]:
                            continue
                        else:
                            ind = 1.0
                        nzx[i * cap + nz1] = c
                        nzd[i * cap + nz1] = d
                        nzv[i * cap + nz1] = ind
                        nz1 = nz1 + 1
            nzc[i] = nz1
            for c in range(n):
                u[i * maxn + c] = 0.0
                Sh[i * maxn + c] = 0.0
            val = 0.0
            for p1 in range(nz1):
                x = nzx[i * cap + p1]
                d = nzd[i * cap + p1]
                f = nzv[i * cap + p1]
                u[i * maxn + x] += f * w[d]
                Sh[i * maxn + x] += f * h[d]
                val += Y[d * n + x] * f
                for z in range(nout):
                    for ia in range(nout):
                        s1v = f * HA[x * nout + z] * HA[d * nout + ia]
                        dM[i * nn + z * nout + ia] -= s1v
                        if single:
                            dM[(i - V) * nn + z * nout + ia] -= l2 * s1v
            sv = 0.0
            for c in range(n):
                sv += w[c] * u[i * maxn + c]
                for z in range(nout):
                    s1v = HA[c * nout + z] * u[i * maxn + c]
                    da[i * nout + z] -= s1v
                    if single:
                        da[(i - V) * nout + z] -= l2 * s1v
            gs[i] += -0.5 * val + 0.5 * sv
            if single:
                gs[i - V] += l2 * (-0.5 * val + 0.5 * sv)
            if need_hess:
                for c in range(n):
                    val = 0.0
                    for d in range(n):
                        val += Y[c * n + d] * u[i * maxn + d]
                    v[i * maxn + c] = val
        # beta: ds = X'w, da = -A' Y X
        for k in range(q):
            val = 0.0
            for c in range(n):
                val += Xd[c * q + k] * w[c]
            gs[V2 + k] += val
            for c in range(n):
                da[(V2 + k) * nout + cout[c0 + c]] -= l0[c0 + c] * HX[c * q + k]
        if not need_hess:
            continue
        for i in range(i0, V2):
            nz1 = nzc[i]
            for k in range(i, V2):
                nz2 = nzc[k]
                # 1/2 tr(Y Si Y Sk) - tr(Psi H'Si Y Sk H) over the nonzeros
                val = 0.0
                for p1 in range(nz1):
                    xa = nzx[i * cap + p1]
                    da_ = nzd[i * cap + p1]
                    s1v = nzv[i * cap + p1]
                    for p2 in range(nz2):
                        xb = nzx[k * cap + p2]
                        db_ = nzd[k * cap + p2]
                        val += s1v * nzv[k * cap + p2] * (
                            0.5 * Y[da_ * n + xb] * Y[db_ * n + xa] - Y[xa * n + xb] * G[da_ * n + db_])
                for c in range(n):
                    val += (Sh[i * maxn + c] - u[i * maxn + c]) * v[k * maxn + c] + Sh[k * maxn + c] * v[i * maxn + c]
                hs[i * Ps + k] += val
                if single:
                    hs[(i - V) * Ps + k - V] += l2 * l2 * val
                    hs[(i - V) * Ps + k] += l2 * val
                    if k != i:
                        hs[(k - V) * Ps + i] += l2 * val
            for k in range(q):
                val = 0.0
                for c in range(n):
                    val += (Sh[i * maxn + c] - u[i * maxn + c]) * HX[c * q + k]
                hs[i * Ps + V2 + k] += val
                if single:
                    hs[(i - V) * Ps + V2 + k] += l2 * val
        for i in range(q):
            for k in range(i, q):
                val = 0.0
                for c in range(n):
                    val += Xd[c * q + i] * HX[c * q + k]
                hs[(V2 + i) * Ps + V2 + k] -= val
    # the county: log-likelihood and gradient
    ll[0] += wr * (-0.5 * ncell * LOG2PI + sacc + fc)
    for i in range(V):
        a = ea[i]
        b = eb[i]
        if a == b:
            val = 0.5 * bb[a] * bb[a] - 0.5 * Mt[a * nout + a]
        else:
            val = bb[a] * bb[b] - Mt[a * nout + b]
        gout[i] += wr * val
    for i in range(Ps):
        val = gs[i]
        for a in range(nout):
            val += m[a] * da[i * nout + a]
            if i < V2:
                for b in range(nout):
                    val -= 0.5 * psi[a * nout + b] * dM[i * nn + a * nout + b]
        gout[V + i] += wr * val
    if not need_hess:
        return 0
    # per argument: C dM, dM m, C dM m, C da, N' dM m, N' dM N, N' da
    for i in range(Ps):
        for a in range(nout):
            val = 0.0
            f = 0.0
            for x in range(nout):
                f += C[a * nout + x] * da[i * nout + x]
            Cda[i * nout + a] = f
            f = 0.0
            for x in range(nout):
                f += N[x * nout + a] * da[i * nout + x]
            Nda[i * nout + a] = f
            if i < V2:
                for x in range(nout):
                    val += dM[i * nn + a * nout + x] * m[x]
                for b in range(nout):
                    f = 0.0
                    for x in range(nout):
                        f += C[a * nout + x] * dM[i * nn + x * nout + b]
                    CdM[i * nn + a * nout + b] = f
                    f = 0.0
                    for x in range(nout):
                        f += dM[i * nn + a * nout + x] * N[x * nout + b]
                    W1[a * nout + b] = f                  # dM N
            dMm[i * nout + a] = val
        if i < V2:
            for a in range(nout):
                f = 0.0
                val = 0.0
                for x in range(nout):
                    f += C[a * nout + x] * dMm[i * nout + x]
                    val += N[x * nout + a] * dMm[i * nout + x]
                CdMm[i * nout + a] = f
                NdMm[i * nout + a] = val
                for b in range(nout):
                    f = 0.0
                    for x in range(nout):
                        f += N[x * nout + a] * W1[x * nout + b]
                    NdMN[i * nn + a * nout + b] = f
        else:
            for a in range(nout):
                CdMm[i * nout + a] = 0.0
                NdMm[i * nout + a] = 0.0
                for b in range(nout):
                    CdM[i * nn + a * nout + b] = 0.0
                    NdMN[i * nn + a * nout + b] = 0.0
    # theta x theta
    for i in range(Ps):
        for k in range(i, Ps):
            val = hs[i * Ps + k]
            for a in range(nout):
                val += da[i * nout + a] * Cda[k * nout + a]
                if k < V2:          # (M does not depend on beta: dM = 0 for beta)
                    val -= Cda[i * nout + a] * dMm[k * nout + a] + Cda[k * nout + a] * dMm[i * nout + a]
                    val += dMm[i * nout + a] * CdMm[k * nout + a]
                    for b in range(nout):
                        val += 0.5 * CdM[i * nn + a * nout + b] * CdM[k * nn + b * nout + a]
                elif i < V2:
                    val -= Cda[k * nout + a] * dMm[i * nout + a]
            hout[(V + i) * Z + V + k] += wr * val
            if k != i:
                hout[(V + k) * Z + V + i] += wr * val
    # Gam x theta and Gam x Gam (E = e_a e_b' + e_b e_a', or e_a e_a')
    for e1 in range(V):
        a = ea[e1]
        b = eb[e1]
        for i in range(Ps):
            if a == b:
                val = (-bb[a] * NdMm[i * nout + a] - 0.5 * NdMN[i * nn + a * nout + a]
                       + bb[a] * Nda[i * nout + a])
            else:
                val = (-(bb[a] * NdMm[i * nout + b] + bb[b] * NdMm[i * nout + a])
                       - 0.5 * (NdMN[i * nn + a * nout + b] + NdMN[i * nn + b * nout + a])
                       + bb[a] * Nda[i * nout + b] + bb[b] * Nda[i * nout + a])
            hout[e1 * Z + V + i] += wr * val
            hout[(V + i) * Z + e1] += wr * val
        for e2 in range(V):
            # sum over the terms e_x e_y' of E1 and e_z e_w' of E2:
            # 1/2 Mt[y, z] Mt[w, x] - b_x Mt[y, z] b_w
            val = 0.0
            for t1 in range(2 if a != b else 1):
                ia = a if t1 == 0 else b
                ib = b if t1 == 0 else a
                for t2 in range(2 if ea[e2] != eb[e2] else 1):
                    x = ea[e2] if t2 == 0 else eb[e2]
                    z = eb[e2] if t2 == 0 else ea[e2]
                    val += (0.5 * Mt[ib * nout + x] * Mt[z * nout + ia]
                            - bb[ia] * Mt[ib * nout + x] * bb[z])
            hout[e1 * Z + e2] += wr * val
    return 0


def mri2_eval(const long long[::1] row_ptr, const long long[::1] sch_ptr, const int[::1] cout,
              const int[::1] cpu, const double[::1] l0, const double[::1] l1, const double[::1] y,
              const double[:, ::1] Xc, const int[::1] xoff, const double[::1] beta,
              const int[::1] ea, const int[::1] eb, const double[:, ::1] LG,
              const double[:, ::1] Tau, const double[:, ::1] R, const double[::1] wrow,
              double[::1] ll_t, double[:, ::1] g_t, double[:, ::1] h_t, int[::1] status_t,
              int nthreads, int need_hess):
    """Log-likelihood (``ll_t``), gradient (``g_t``) and, with ``need_hess``, the whole
    Hessian (``h_t``, Z x Z row-major) of grouped random intercepts of several outcomes at
    two nested levels (see mlsem.model.mri2 and its oracle ``_oracle.mri2_dense``), in the
    arguments (the V = nout (nout + 1) / 2 entries ``ea``/``eb`` of Gam, of Tau, of R, then
    beta): Z = 3 V + q; per-thread rows, summed by the caller.  Top unit r holds the
    schools row_ptr[r]..row_ptr[r+1]-1, school s the cells sch_ptr[s]..sch_ptr[s+1]-1
    (outcome ``cout``, pseudo-unit ``cpu``, loadings l0 on the top latents and l1 on the
    school's; mean Xc[c, :k] beta[xoff[o]:xoff[o+1]]).  ``LG``: the Cholesky factor of
    Gam.  status_t != 0: a Sigma is not positive definite (2) or allocation failed."""
    cdef Py_ssize_t nrows = row_ptr.shape[0] - 1, r, nsch = sch_ptr.shape[0] - 1
    cdef long long ncell = y.shape[0], c
    cdef int nout = LG.shape[0], q = beta.shape[0], kx = Xc.shape[1], tid, st, i, maxn = 1
    cdef int V = nout * (nout + 1) // 2, V2 = nout * (nout + 1), Ps = V2 + q, Z = V + Ps
    cdef int nn = nout * nout
    cdef double* dbuf
    cdef double* loc
    if nthreads < 1 or not MLSEM_HAVE_OPENMP:
        nthreads = 1
    if (Xc.shape[0] != ncell or cout.shape[0] != ncell or cpu.shape[0] != ncell
            or l0.shape[0] != ncell or l1.shape[0] != ncell):
        raise ValueError("mri2_eval: per-cell arrays differ in length")
    if (Tau.shape[0] != nout or Tau.shape[1] != nout or R.shape[0] != nout or R.shape[1] != nout
            or LG.shape[1] != nout or xoff.shape[0] != nout + 1 or xoff[nout] != q
            or ea.shape[0] != V or eb.shape[0] != V):
        raise ValueError("mri2_eval: shapes of Gam, Tau, R, xoff or the entries do not agree")
    for i in range(nout):
        if xoff[i + 1] < xoff[i] or xoff[i + 1] - xoff[i] > kx:
            raise ValueError("mri2_eval: xoff does not describe the compact design")
    for i in range(V):
        if ea[i] < 0 or ea[i] >= nout or eb[i] < 0 or eb[i] >= nout:
            raise ValueError("mri2_eval: an entry out of range")
    if (ll_t.shape[0] < nthreads or g_t.shape[0] < nthreads or status_t.shape[0] < nthreads
            or g_t.shape[1] < Z or (need_hess and (h_t.shape[0] < nthreads or h_t.shape[1] < Z * Z))):
        raise ValueError("mri2_eval: per-thread outputs too small")
    if wrow.shape[0] < nrows or (nrows > 0 and (row_ptr[0] != 0 or row_ptr[nrows] != nsch)):
        raise ValueError("mri2_eval: row_ptr / wrow do not describe the schools")
    if nsch > 0 and (sch_ptr[0] != 0 or sch_ptr[nsch] != ncell):
        raise ValueError("mri2_eval: sch_ptr does not describe the cells")
    for r in range(nrows):
        if row_ptr[r + 1] < row_ptr[r]:
            raise ValueError("mri2_eval: row_ptr is not increasing")
    for r in range(nsch):
        if sch_ptr[r + 1] < sch_ptr[r]:
            raise ValueError("mri2_eval: sch_ptr is not increasing")
        if sch_ptr[r + 1] - sch_ptr[r] > maxn:
            maxn = <int>(sch_ptr[r + 1] - sch_ptr[r])
    for c in range(ncell):
        if cout[c] < 0 or cout[c] >= nout:
            raise ValueError(f"mri2_eval: cout[{c}] = {cout[c]} out of range")
    if maxn < nout:
        maxn = nout          # (the county's nout x nout inverse uses the school scratch)
    cdef int maxcc = 1
    for r in range(nrows):
        if sch_ptr[row_ptr[r + 1]] - sch_ptr[row_ptr[r]] > maxcc:
            maxcc = <int>(sch_ptr[row_ptr[r + 1]] - sch_ptr[row_ptr[r]])
    cdef Py_ssize_t ncounty = (Ps + Ps * Ps + nn + nout + V2 * nn + Ps * nout + 2 * nn + nn + nout
                               + nn + nout + nn + nn + nn + Ps * nn + 5 * Ps * nout + Ps * nn
                               + Ps * nout + maxcc * maxn + maxcc + maxcc * nout)
    cdef Py_ssize_t nschool = (4 * maxn * maxn + 2 * maxn + 2 * maxn * q + maxn
                               + V2 * maxn * maxn + 3 * V2 * maxn)
    cdef Py_ssize_t nd = 1 + Z + Z * Z + ncounty + nschool + 16
    cdef Py_ssize_t ni = 2 * V2 * maxn * maxn + V2 + 4
    cdef int* ibuf
    cdef double dummy = 0.0
    cdef const int* cout_p = &cout[0] if ncell > 0 else NULL
    cdef const int* cpu_p = &cpu[0] if ncell > 0 else NULL
    cdef const double* l0_p = &l0[0] if ncell > 0 else NULL
    cdef const double* l1_p = &l1[0] if ncell > 0 else NULL
    cdef const double* y_p = &y[0] if ncell > 0 else NULL
    cdef const double* X_p = &Xc[0, 0] if ncell > 0 and kx > 0 else &dummy
    cdef const int* xoff_p = &xoff[0]
    cdef const double* beta_p = &beta[0] if q > 0 else &dummy
    cdef const int* ea_p = &ea[0]
    cdef const int* eb_p = &eb[0]
    cdef const double* LG_p = &LG[0, 0]
    cdef const double* Tau_p = &Tau[0, 0]
    cdef const double* R_p = &R[0, 0]
    cdef const long long* sch_p = &sch_ptr[0]
    with nogil, parallel(num_threads=nthreads):
        tid = threadid()
        dbuf = <double*>malloc(nd * sizeof(double))
        ibuf = <int*>malloc(ni * sizeof(int))
        if dbuf != NULL and ibuf != NULL:
            memset(dbuf, 0, nd * sizeof(double))
            loc = dbuf          # ll (1), g (Z), H (Z * Z), then the unit's scratch
            for r in prange(nrows, schedule='dynamic', chunksize=64):
                if status_t[tid] == 0:
                    st = mri2_unit(row_ptr[r], row_ptr[r + 1], sch_p, wrow[r], cout_p, cpu_p,
                                   l0_p, l1_p, y_p, X_p, kx, xoff_p, beta_p, nout, q, ea_p, eb_p,
                                   LG_p, Tau_p, R_p, need_hess, loc, loc + 1, loc + 1 + Z,
                                   loc + 1 + Z + Z * Z, ibuf, maxn, maxcc)
                    if st != 0:
                        status_t[tid] = st
            ll_t[tid] = loc[0]
            for i in range(Z):
                g_t[tid, i] = loc[1 + i]
            if need_hess:
                for i in range(Z * Z):
                    h_t[tid, i] = loc[1 + Z + i]
        else:
            status_t[tid] = ALLOC_FAIL
        free(dbuf)
        free(ibuf)
    _raise_alloc(status_t, nd * sizeof(double))
    return 0
# --- end mri2 ---
