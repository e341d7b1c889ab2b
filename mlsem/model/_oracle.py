"""Readable NumPy implementation of the FIML log-likelihood and its gradient.

The test oracle for the Cython kernel (and the fallback when the extension is
not built).  One top-level unit at a time, dense algebra, no tricks:

    Sigma_o = Lambda_o Phi Lambda_o' + Theta_oo
    l_r     = -1/2 [ n_o log 2pi + log|Sigma_o| + e' Sigma_o^-1 e ]
    dl/dSigma_o = 1/2 (w w' - Sigma_o^-1),  w = Sigma_o^-1 e
    dl/dPhi  = Lambda_o' (dl/dSigma_o) Lambda_o,  dl/dTheta_oo = dl/dSigma_o

``phi_hessian`` is the second derivative in Phi, every entry a separate
argument (S = Lambda_o' Sigma_o^-1 Lambda_o, u = Lambda_o' Sigma_o^-1 e):

    d2l / dPhi_ab dPhi_cd = 1/2 S_bc S_ad - 1/2 (S_ac u_d u_b + S_bc u_a u_d)

Returns the same quantities as the kernel: log-likelihood, dl/dPhi (M x M),
dl/dTheta (P x P), and per observation the weighted w.  ``None`` for the
log-likelihood when a Sigma_o is not positive definite.
"""
import numpy as np

LOG2PI = np.log(2.0 * np.pi)


def _lambda(s, load, slot_lat, M):
    """Lambda_o (n x M) of one unit whose observations sit in slots ``s``."""
    lam = np.zeros((len(s), M))
    for k in range(slot_lat.shape[1]):
        g = slot_lat[s, k]
        ok = g >= 0
        lam[np.flatnonzero(ok), g[ok]] += load[:, k][ok]
    return lam


def loglik(row_ptr, slot, resid, load, slot_lat, Phi, Theta, wrow, need_grad=True):
    M = Phi.shape[0]
    P = Theta.shape[0]
    ll = 0.0
    gphi = np.zeros((M, M))
    gth = np.zeros((P, P))
    w = np.zeros(len(resid))
    for r in range(len(row_ptr) - 1):
        o0, o1 = row_ptr[r], row_ptr[r + 1]
        s = slot[o0:o1]
        n = o1 - o0
        lam = _lambda(s, load[o0:o1], slot_lat, M)
        S = lam @ Phi @ lam.T + Theta[np.ix_(s, s)]
        try:
            C = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            return None, gphi, gth, w
        e = resid[o0:o1]
        logdet = 2.0 * np.log(np.diag(C)).sum()
        v = np.linalg.solve(S, e)
        wr = wrow[r]
        ll += wr * -0.5 * (n * LOG2PI + logdet + e @ v)
        if need_grad:
            G = 0.5 * wr * (np.outer(v, v) - np.linalg.inv(S))
            gth[np.ix_(s, s)] += G
            gphi += lam.T @ G @ lam
            w[o0:o1] = wr * v
    return ll, gphi, gth, w


def phi_hessian(row_ptr, slot, resid, load, slot_lat, Phi, Theta, wrow):
    """d2l / dPhi_ab dPhi_cd as an (M, M, M, M) array; None where a Sigma_o is
    not positive definite."""
    M = Phi.shape[0]
    H = np.zeros((M, M, M, M))
    for r in range(len(row_ptr) - 1):
        o0, o1 = row_ptr[r], row_ptr[r + 1]
        s = slot[o0:o1]
        lam = _lambda(s, load[o0:o1], slot_lat, M)
        Sig = lam @ Phi @ lam.T + Theta[np.ix_(s, s)]
        try:
            Si = np.linalg.inv(np.linalg.cholesky(Sig))
        except np.linalg.LinAlgError:
            return None
        Si = Si.T @ Si
        S = lam.T @ Si @ lam
        u = lam.T @ Si @ resid[o0:o1]
        H += wrow[r] * (0.5 * np.einsum("bc,ad->abcd", S, S)
                        - 0.5 * np.einsum("ac,d,b->abcd", S, u, u)
                        - 0.5 * np.einsum("bc,a,d->abcd", S, u, u))
    return H


def block_theta(R, sout, spup):
    """The dense P x P Theta of several outcomes: Theta[s, s'] = R[sout[s], sout[s']]
    for the slots s, s' of one unit (spup[s] == spup[s']), 0 across units."""
    sout = np.asarray(sout)
    spup = np.asarray(spup)
    same = spup[:, None] == spup[None, :]
    return np.where(same, R[sout[:, None], sout[None, :]], 0.0)


def loglik_blocks(row_ptr, slot, resid, load, slot_lat, Phi, R, sout, spup, wrow,
                  need_grad=True):
    """``loglik`` with Theta block-diagonal per unit (several outcomes): the same
    dense algebra on ``block_theta``; dl/dR (nout x nout, every entry a separate
    argument) summed from dl/dTheta over the entries each R entry fills."""
    Theta = block_theta(R, sout, spup)
    ll, gphi, gth, w = loglik(row_ptr, slot, resid, load, slot_lat, Phi, Theta, wrow, need_grad)
    nout = R.shape[0]
    gR = np.zeros((nout, nout))
    if ll is not None and need_grad:
        sout = np.asarray(sout)
        same = np.asarray(spup)[:, None] == np.asarray(spup)[None, :]
        np.add.at(gR, (sout[:, None].repeat(len(sout), 1)[same],
                       sout[None, :].repeat(len(sout), 0)[same]), gth[same])
    return ll, gphi, gR, w


def group_within_multi(row_ptr, slot, spup, sout, snode, nout, y, X, wrow):
    """The grouping of several outcomes' units (``_core.mgroup_sums``) the plain way: a
    group is the units of one row with the same innermost node (``snode[slot]``) and the
    same set of observed outcomes (bit mask); returns {mask: (C, count)} with C (nout * k
    square, k = 1 + X's columns) the weighted within-group cross products of z = [y, X]
    over the outcome pairs of each unit, count the weighted number of contrasts, and the
    groups as a list of (row, node, mask, number of units, sums of z per outcome)."""
    k = 1 + X.shape[1]
    groups = {}
    for r in range(len(row_ptr) - 1):
        o = row_ptr[r]
        while o < row_ptr[r + 1]:
            o1 = o
            while o1 < row_ptr[r + 1] and spup[slot[o1]] == spup[slot[o]]:
                o1 += 1
            v = np.zeros(nout * k)
            mask = 0
            for c in range(o, o1):
                oc = sout[slot[c]]
                mask |= 1 << oc
                v[oc * k] = y[c]
                v[oc * k + 1: (oc + 1) * k] = X[c]
            groups.setdefault((r, snode[slot[o]], mask), []).append(v)
            o = o1
    out = {}
    for (r, node, mask), vs in groups.items():
        V = np.array(vs)
        D = V - V.mean(axis=0)
        C, n = out.get(mask, (np.zeros((nout * k, nout * k)), 0.0))
        out[mask] = (C + wrow[r] * D.T @ D, n + wrow[r] * (len(vs) - 1))
    return out, [(r, node, mask, len(vs), np.sum(vs, axis=0)) for (r, node, mask), vs in groups.items()]

def _dense_unit(S, Xu, yu, beta):
    """One unit of the dense oracles: (Xu, e, Sigma^-1, Sigma^-1 e, its log-likelihood),
    or None when Sigma is not positive definite."""
    try:
        np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        return None
    e = yu - Xu @ beta
    P = np.linalg.inv(S)
    r = P @ e
    return Xu, e, P, r, -0.5 * (len(e) * LOG2PI + np.linalg.slogdet(S)[1] + e @ r)


def ri2_dense(row_ptr, slot, y, X, beta, l0, l1, tau_s, theta_s, ptau, pth, gamma, pgam,
              wrow, nv):
    """The oracle of ``_core.ri2_eval`` (grouped random intercepts, mlsem.model.ri2):
    per unit the dense Sigma = diag(l1^2 tau + theta) + gamma l0 l0', and the
    textbook derivatives with Sigma_k = dSigma/dv_k (Sigma linear in v):
    dl/dv_k = -1/2 w [tr(P Sigma_k) - r' Sigma_k r], dl/dbeta = w X'r,
    d2l/dv_k dv_l = w [1/2 tr(P Sigma_k P Sigma_l) - r' Sigma_k P Sigma_l r],
    d2l/dbeta dv_k = -w X' P Sigma_k r, d2l/dbeta2 = -w X'PX (P = Sigma^-1,
    r = P e).  Returns (ll, g (nv), H (nv, nv), gb (q), Hvb (nv, q), Hbb (q, q))
    or None where a Sigma is not positive definite."""
    q = X.shape[1]
    ll = 0.0
    g = np.zeros(nv)
    gb = np.zeros(q)
    H = np.zeros((nv, nv))
    Hvb = np.zeros((nv, q))
    Hbb = np.zeros((q, q))
    for r_ in range(len(row_ptr) - 1):
        o0, o1 = row_ptr[r_], row_ptr[r_ + 1]
        m = o1 - o0
        s = slot[o0:o1]
        a = l0[o0:o1]
        c1 = l1[o0:o1] ** 2
        S = np.diag(c1 * tau_s[s] + theta_s[s]) + gamma * np.outer(a, a)
        unit = _dense_unit(S, X[o0:o1], y[o0:o1], beta)
        if unit is None:
            return None
        Xu, e, P, r, llu = unit
        w = wrow[r_]
        ll += w * llu
        # dSigma / dv_k for every parameter k
        D = {}
        if pgam >= 0:
            D[pgam] = D.get(pgam, 0.0) + np.outer(a, a)
        for i in range(m):
            for p, c in ((ptau[s[i]], c1[i]), (pth[s[i]], 1.0)):
                if p >= 0:
                    E = np.zeros((m, m))
                    E[i, i] = c
                    D[p] = D.get(p, 0.0) + E
        for k, Sk in D.items():
            g[k] += -0.5 * w * (np.trace(P @ Sk) - r @ Sk @ r)
            Hvb[k] += -w * Xu.T @ P @ Sk @ r
            for l_, Sl in D.items():
                H[k, l_] += w * (0.5 * np.trace(P @ Sk @ P @ Sl) - r @ Sk @ P @ Sl @ r)
        gb += w * Xu.T @ r
        Hbb += -w * Xu.T @ P @ Xu
    return ll, g, H, gb, Hvb, Hbb


def unst_dense(row_ptr, slot, y, X, beta, load, slot_lat, Phi, theta_s, wrow,
               phi_row, phi_col, phi_param, pth, beta_param, nv):
    """The oracle of ``_core.unst_eval`` (grouped random intercepts with a general
    Phi, mlsem.model.unst), in the parameters: per unit the dense
    Sigma = L Phi L' + diag(theta_s[slot]) with Phi linear in the parameters (entry
    (phi_row, phi_col) is parameter phi_param, both triangles listed), the residual
    variance of slot s parameter pth[s], the mean X beta (coefficient c parameter
    beta_param[c]).  The textbook derivatives of ``ri2_dense`` (Sigma_k = dSigma/dv_k):
    dl/dv_k = -1/2 w [tr(P Sigma_k) - r' Sigma_k r], dl/dbeta = w X'r,
    d2l/dv_k dv_l = w [1/2 tr(P Sigma_k P Sigma_l) - r' Sigma_k P Sigma_l r],
    d2l/dbeta dv_k = -w X' P Sigma_k r, d2l/dbeta2 = -w X'PX.  Returns
    (ll, g (nv), H (nv, nv)) or None where a Sigma is not positive definite."""
    q = X.shape[1]
    M = Phi.shape[0]
    ll = 0.0
    g = np.zeros(nv)
    H = np.zeros((nv, nv))
    bp = np.asarray(beta_param, dtype=int)
    dphi = {}
    for a, b, p in zip(phi_row, phi_col, phi_param):
        dphi.setdefault(int(p), np.zeros((M, M)))[a, b] += 1.0
    for r_ in range(len(row_ptr) - 1):
        o0, o1 = row_ptr[r_], row_ptr[r_ + 1]
        m = o1 - o0
        if m == 0:
            continue
        s = slot[o0:o1]
        L = _lambda(s, load[o0:o1], slot_lat, M)
        S = L @ Phi @ L.T + np.diag(theta_s[s])
        unit = _dense_unit(S, X[o0:o1], y[o0:o1], beta)
        if unit is None:
            return None
        Xu, e, P, r, llu = unit
        w = wrow[r_]
        ll += w * llu
        D = {p: L @ E @ L.T for p, E in dphi.items()}
        for i in range(m):
            E = np.zeros((m, m))
            E[i, i] = 1.0
            p = int(pth[s[i]])
            D[p] = D.get(p, 0.0) + E
        for k, Sk in D.items():
            g[k] += -0.5 * w * (np.trace(P @ Sk) - r @ Sk @ r)
            hb = -w * Xu.T @ P @ Sk @ r
            H[k, bp] += hb
            H[bp, k] += hb
            for l_, Sl in D.items():
                H[k, l_] += w * (0.5 * np.trace(P @ Sk @ P @ Sl) - r @ Sk @ P @ Sl @ r)
        g[bp] += w * Xu.T @ r
        H[np.ix_(bp, bp)] += -w * Xu.T @ P @ Xu
    return ll, g, H


def mri2_entries(nout):
    """The (a, b) entries (a <= b) of an nout x nout covariance matrix in the order of
    ``mri2_dense`` and ``_core.mri2_eval``, and their directions dS/dS_ab (symmetric)."""
    ent = [(a, b) for a in range(nout) for b in range(a, nout)]
    dirs = []
    for a, b in ent:
        E = np.zeros((nout, nout))
        E[a, b] = E[b, a] = 1.0
        dirs.append(E)
    return ent, dirs


def mri2_dense(row_ptr, sch, pu, cout, l0, l1, y, Xc, xoff, beta, Gam, Tau, R, wrow):
    """The oracle of ``_core.mri2_eval`` (grouped random intercepts of several outcomes at
    two nested levels, mlsem.model.mri2): per top unit (cells row_ptr[r]..row_ptr[r+1]-1),
    the dense Sigma[c, c'] = l0_c l0_c' Gam[o_c, o_c'] + [same school] l1_c l1_c'
    Tau[o_c, o_c'] + [same pseudo-unit] R[o_c, o_c'] (o_c = cout[c]); the mean of cell c
    is Xc[c, :k] beta[xoff[o]:xoff[o] + k] (k = xoff[o + 1] - xoff[o]).  The textbook
    derivatives (Sigma_k = dSigma/dv_k, Sigma linear in v; P = Sigma^-1, r = P e, w the
    unit's weight): dl/dv_k = -1/2 w [tr(P Sigma_k) - r' Sigma_k r], dl/dbeta = w X'r,
    d2l/dv_k dv_l = w [1/2 tr(P Sigma_k P Sigma_l) - r' Sigma_k P Sigma_l r],
    d2l/dbeta dv_k = -w X' P Sigma_k r, d2l/dbeta2 = -w X'PX.  The arguments v: the
    entries (a <= b, :func:`mri2_entries`) of Gam, then Tau, then R, then beta.
    Returns (ll, g, H) or None where a Sigma is not positive definite."""
    nout = Gam.shape[0]
    ent, dirs = mri2_entries(nout)
    V = len(ent)
    q = int(xoff[-1])
    Z = 3 * V + q
    ll = 0.0
    g = np.zeros(Z)
    H = np.zeros((Z, Z))
    for r_ in range(len(row_ptr) - 1):
        c0, c1 = row_ptr[r_], row_ptr[r_ + 1]
        m = c1 - c0
        if m == 0:
            continue
        o = np.asarray(cout[c0:c1])
        a0 = np.zeros((m, nout))
        a0[np.arange(m), o] = l0[c0:c1]
        a1 = np.zeros((m, nout))
        a1[np.arange(m), o] = l1[c0:c1]
        same_s = np.equal.outer(sch[c0:c1], sch[c0:c1])
        same_u = np.equal.outer(pu[c0:c1], pu[c0:c1])
        E1 = np.zeros((m, nout))
        E1[np.arange(m), o] = 1.0
        D = [a0 @ E @ a0.T for E in dirs] + [same_s * (a1 @ E @ a1.T) for E in dirs] + \
            [same_u * (E1 @ E @ E1.T) for E in dirs]
        S = sum(v * Dk for v, Dk in zip(
            [Gam[a, b] for a, b in ent] + [Tau[a, b] for a, b in ent] + [R[a, b] for a, b in ent], D))
        # (each off-diagonal direction holds both triangles: sum_v v D_v is Sigma)
        Xu = np.zeros((m, q))
        for i in range(m):
            k0, k1 = xoff[o[i]], xoff[o[i] + 1]
            Xu[i, k0:k1] = Xc[c0 + i, :k1 - k0]
        unit = _dense_unit(S, Xu, np.asarray(y[c0:c1]), beta)
        if unit is None:
            return None
        Xu, e, P, r, llu = unit
        w = wrow[r_]
        ll += w * llu
        bi = np.arange(3 * V, Z)
        for k, Sk in enumerate(D):
            g[k] += -0.5 * w * (np.trace(P @ Sk) - r @ Sk @ r)
            hb = -w * Xu.T @ P @ Sk @ r
            H[k, bi] += hb
            H[bi, k] += hb
            for l_, Sl in enumerate(D):
                H[k, l_] += w * (0.5 * np.trace(P @ Sk @ P @ Sl) - r @ Sk @ P @ Sl @ r)
        g[bi] += w * Xu.T @ r
        H[np.ix_(bi, bi)] += -w * Xu.T @ P @ Xu
    return ll, g, H
