"""Estimation: Newton's method from the first iteration, for models whose
Hessian is cheap (issue 14).

For the mixed models of random intercepts (diagonal Phi of variance
parameters, one residual variance theta for every slot) the whole Hessian in
the variance parameters v = (Phi's parameters, theta) comes from one kernel
pass: the Phi block exactly (``Model.phi_hessian``), and theta's row from
Euler's identity.  Sigma = Lambda Phi Lambda' + theta I is linear and
homogeneous in v, so the gradient g_i = T_i + Q_i splits into a trace part of
degree -1 and a quadratic part of degree -2 (Q_i = 1/2 e' Sigma^-1 Sigma_i
Sigma^-1 e, from the kernel's w = Sigma^-1 e), and

    sum_j v_j H_ij = -g_i - Q_i

gives H_i,theta for every i (and H_theta,theta) from the Phi block.  The fixed
effects' block is -X' V^-1 X (= the change of dl/dbeta, which is linear in
beta, along each coefficient: q evaluations, exact), recomputed only when the
variance parameters have moved by more than ``C_REFRESH``; the cross terms
between beta and v are left out of the steps (their expectation is 0; stale
ones slowed the first steps), so each iteration is one kernel pass.  Steps are
damped to stay inside the admissible set and to increase the log-likelihood.
The run ends with one step with the whole exact Hessian (cross terms
included), which is also the observed information handed to the results.

Where the Hessian is not negative definite (far from the optimum) the step is
the modified Newton step (positive curvatures turned negative).  A run that
reaches a bound (a random effect's variance cut short on its way to 0
twice) puts that variance on 0 and holds it there while its gradient points
outside (an active set).  A run that stalls (the residual variance heading for
0, a line search that fails, ``MAX_ITER`` iterations) hands back the reason,
and the caller uses the L-BFGS-B driver instead (``mlsem.estimate.grouped.optimize_auto``): from
Newton's last point for an optimum on a bound, from the original start
otherwise.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from .optimize import REUSE_HESSIAN_STEP, OptSummary, _judge, _serial_blas, param_scale

MAX_ITER = 40
# stop when a Newton step is predicted to gain less than this (log-likelihood
# units, which do not depend on the data's units)
STOP_GAIN = 1e-9
# the fixed effects' block is recomputed when a variance parameter has moved by
# more than this share since it was computed (evaluations on medium, unbalanced,
# egsingle: 16, 20, 23 with 0.05; 13, 18, 16 with 0.5; 13, 18, 79 never)
C_REFRESH = 0.5


SHRINKS = (1.0, 0.5, 0.25, 0.1, 0.03)


def fraction_to_bound(v, dv):
    """(tmax, ratio): the step fraction that moves no coordinate more than 90% of
    the way to 0 (v the distances to the bound, dv their steps), at most 1, and
    each coordinate's fraction to its bound (inf where it moves away)."""
    neg = dv < 0
    ratio = np.full(len(v), np.inf)
    ratio[neg] = -v[neg] / dv[neg]
    return min(1.0, 0.9 * float(np.min(ratio, initial=np.inf))), ratio


def backtrack(evaluate, psi, step, tmax, ll):
    """The first of psi + tmax * s * step (s in SHRINKS) whose evaluation does not
    lower ll (to rounding): (point, evaluation), or (psi, None) if none does.
    ``evaluate`` returns a tuple whose first entry is the log-likelihood, or None."""
    for shrink in SHRINKS:
        cand = psi + tmax * shrink * step
        got = evaluate(cand)
        if got is not None and got[0] >= ll - 1e-12 * abs(ll):
            return cand, got
    return psi, None


def why_not_newton(model) -> str | None:
    """None if :func:`newton` applies to ``model``, else the reason."""
    t = model.table
    if not hasattr(model, "phi_hessian") or getattr(model, "dense", True):
        return "no exact Hessian block (dense path or general SEM)"
    if t.chol_blocks:
        return "covariance blocks"
    if t.theta_func is not None:
        return "Theta is a function of the parameters"
    th = np.unique(np.asarray(t.theta_param))
    if len(th) != 1:
        return "more than one residual variance"
    if len(t.theta_row) != model.P or len(np.unique(t.theta_row)) != model.P:
        return "a slot without the residual variance"
    beta = np.asarray(t.beta_param)
    if len(np.unique(beta)) != len(beta) or len(beta) != model.q:
        return "coefficients shared between design columns"
    hp = np.asarray(model.hess_params)
    if np.any(t.phi_row != t.phi_col):
        return "covariances of random effects"
    if len(hp) != len(np.unique(t.phi_param)):
        return "a variance parameter that is not linear in Phi"
    used = np.concatenate([beta, hp, th])
    if len(used) != t.nparams or len(np.unique(used)) != t.nparams:
        return "parameters outside beta, Phi and theta"
    kinds = [p.kind for p in t.params]
    if any(kinds[i] != "fixed" for i in beta):
        return "a coefficient that is not a fixed effect"
    return None


class _Layout:
    """Index arrays for the quadratic parts Q_i, from the kernel's w: u = Lambda'
    Sigma^-1 e per (unit, latent), U_gg = sum_r w_r u_rg^2."""

    def __init__(self, model):
        prep, t = model.prep, model.table
        nobs = len(model._slot)
        row_ptr = np.asarray(prep.row_ptr, dtype=np.int64)
        nrows = len(row_ptr) - 1
        obs_row = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(row_ptr))
        lat = np.asarray(prep.slot_lat)[model._slot]                 # (nobs, nl)
        M = model.M
        keys, cols, loads = [], [], []
        for k in range(lat.shape[1]):
            ok = lat[:, k] >= 0
            keys.append(obs_row[ok] * M + lat[ok, k])
            cols.append(np.flatnonzero(ok))
            loads.append(model._load[ok, k])
        key = np.concatenate(keys)
        self.obs = np.concatenate(cols)
        self.load = np.concatenate(loads)
        if nrows * M <= 4 * len(key) + 1_000_000:
            uniq = np.arange(nrows * M, dtype=np.int64)    # dense (unit, latent) pairs
            self.pair = key
        else:
            uniq, self.pair = np.unique(key, return_inverse=True)
            self.pair = self.pair.ravel()
        prow = uniq // M
        wrow = np.asarray(prep.wrow, dtype=np.float64)
        self.pw = wrow[prow]                        # each pair's unit weight
        # each pair's Phi parameter (diagonal Phi: the latent's variance)
        par_of_lat = np.full(M, -1, dtype=np.int64)
        par_of_lat[t.phi_row] = t.phi_param
        self.ppar = par_of_lat[uniq % M]
        self.npairs = len(uniq)
        self.wobs = wrow[obs_row] if nobs else np.zeros(0)
        self.nparams = t.nparams

    def u(self, w):
        """u = Lambda' Sigma^-1 e per (unit, latent) pair, from w = wrow Sigma^-1 e."""
        return np.bincount(self.pair, weights=self.load * w[self.obs],
                           minlength=self.npairs) / self.pw

    def cross(self, u, s):
        """d g_i / d beta_c for the Phi parameters i: -sum_r w_r u_g z_g, with
        z = Lambda' Sigma^-1 x_c from s = Sigma^-1 x_c per observation."""
        z = np.bincount(self.pair, weights=self.load * s[self.obs], minlength=self.npairs)
        ok = self.ppar >= 0
        return -np.bincount(self.ppar[ok], weights=self.pw[ok] * u[ok] * z[ok],
                            minlength=self.nparams)

    def quad(self, w):
        """Q_i (i a Phi parameter) and Q_theta of the pseudo-observations."""
        # w = wrow Sigma^-1 e; u = Lambda' Sigma^-1 e = sum load * w / wrow
        u = self.u(w)
        ok = self.ppar >= 0
        Q = 0.5 * np.bincount(self.ppar[ok], weights=self.pw[ok] * u[ok] ** 2,
                              minlength=self.nparams)
        return Q, 0.5 * float(np.sum(w * w / self.wobs))


def _hessian_v(model, lay, psi, g, Hphi, w):
    """The variance parameters' Hessian (Phi block and theta's row by Euler)."""
    t = model.table
    hp = np.asarray(model.hess_params)
    th = int(t.theta_param[0])
    Q, Qth = lay.quad(w)
    if hasattr(model, "within_quad"):
        Qth += model.within_quad(psi)
    v = psi[hp]
    theta = psi[th]
    n = len(hp)
    H = np.zeros((n + 1, n + 1))
    H[:n, :n] = Hphi
    col = (-g[hp] - Q[hp] - Hphi @ v) / theta
    H[:n, n] = col
    H[n, :n] = col
    H[n, n] = (-g[th] - Qth - col @ v) / theta
    return np.append(hp, th), H


def _fixed_block(model, lay, psi, g, w, vidx):
    """(C = X' V^-1 X, d2l / dv dbeta) at psi, exact to rounding, from one
    evaluation per coefficient: dl/dbeta and w = W Sigma^-1 (y - X beta) are
    linear in beta, so their changes along coefficient c give C's column and
    Sigma^-1 x_c, from which the cross terms are sums (``_Layout.cross``);
    None if an evaluation fails."""
    t = model.table
    beta = np.asarray(t.beta_param)
    unit = param_scale(model)
    hp = vidx[:-1]
    q = len(beta)
    C = np.zeros((q, q))
    X = np.zeros((len(vidx), q))
    wobs = lay.wobs
    u = lay.u(w)
    for c, i in enumerate(beta):
        h = unit[i]
        p2 = psi.copy()
        p2[i] += h
        _, g2 = model.evaluate(p2)
        if g2 is None:
            return None
        C[:, c] = (g[beta] - g2[beta]) / h
        sc = (w - model._w) / (h * wobs)            # Sigma^-1 x_c
        X[:-1, c] = lay.cross(u, sc)[hp]
        X[-1, c] = -float(np.sum(w * sc))
        if hasattr(model, "within_cross"):
            X[-1, c] += model.within_cross(psi)[c]
    return 0.5 * (C + C.T), X


def full_hessian(model, lay, psi, g, Hphi, w):
    """The whole Hessian in psi at psi from the kernel pass there (g, Hphi, w)
    and q more evaluations; None if one fails."""
    t = model.table
    beta = np.asarray(t.beta_param)
    vidx, Hv = _hessian_v(model, lay, psi, g, Hphi, w)
    H = np.zeros((t.nparams, t.nparams))
    H[np.ix_(vidx, vidx)] = Hv
    if len(beta):
        got = _fixed_block(model, lay, psi, g, w, vidx)
        if got is None:
            return None
        C, X = got
        H[np.ix_(beta, beta)] = -C
        H[np.ix_(vidx, beta)] = X
        H[np.ix_(beta, vidx)] = X.T
    return H


def newton(model, psi0, progress=None, handover=None):
    """Newton's method from psi0 (see the module's docstring).  Returns an
    :class:`OptSummary` (converged) or a string, why not (the caller falls
    back); ``handover`` (a list), if given, receives the point from which
    L-BFGS-B should go on when Newton stopped at a bound (empty otherwise)."""
    handover = [] if handover is None else handover
    handover.clear()
    with _serial_blas():
        return _newton(model, np.asarray(psi0, dtype=float), progress, handover)


def _newton(model, psi, progress, handover):
    t0 = time.perf_counter()
    n0 = model.nevals
    start = psi.copy()
    t = model.table
    N = max(model.prep.nobs, 1)
    beta = np.asarray(t.beta_param)
    unit = param_scale(model)
    lay = _Layout(model)
    got = model.phi_hessian(psi)
    if got is None:
        return "Sigma is not positive definite at the start"
    ll, g, Hphi = got
    w = model._w.copy()
    vidx = np.append(np.asarray(model.hess_params), int(t.theta_param[0]))
    C, Xv = _fixed_block(model, lay, psi, g, w, vidx) if len(beta) else (np.zeros((0, 0)), None)
    if C is None:
        return "an evaluation or a linear solve failed"
    vC = psi[vidx].copy()
    capped = 0
    steps = 0
    log = []
    q = len(beta)
    # the active set: variances of random effects held at their bound of 0 (an
    # optimum on the bound), released if their gradient points inside
    active = np.zeros(len(vidx), dtype=bool)
    releases = 0
    for it in range(MAX_ITER):
        vidx, Hv = _hessian_v(model, lay, psi, g, Hphi, w)
        if q and np.max(np.abs(psi[vidx] - vC) / np.maximum(np.abs(vC), 1e-12 * unit[vidx])) > C_REFRESH:
            got = _fixed_block(model, lay, psi, g, w, vidx)
            if got is None:
                return "an evaluation or a linear solve failed"
            C, Xv = got
            vC = psi[vidx].copy()
        # the Newton step on (beta, the free v)
        fv = ~active
        idx = np.concatenate([beta, vidx[fv]])
        H = np.zeros((len(idx), len(idx)))
        H[:q, :q] = -C
        H[q:, q:] = Hv[np.ix_(fv, fv)]
        try:
            lam, Q = np.linalg.eigh(H)
        except np.linalg.LinAlgError:
            return "an evaluation or a linear solve failed"
        if not np.all(np.isfinite(lam)) or lam.size == 0:
            return "an evaluation or a linear solve failed"
        # not concave here (far from the optimum): the modified Newton step,
        # each direction of positive curvature turned into one of negative
        # curvature of the same size (an ascent direction)
        big = float(np.max(np.abs(lam)))
        if not big > 0:
            return "an evaluation or a linear solve failed"
        lam = -np.maximum(np.abs(lam), 1e-10 * big)
        d = Q @ ((Q.T @ g[idx]) / -lam)
        gain = 0.5 * float(g[idx] @ d)       # the Newton decrement: predicted gain
        if gain < STOP_GAIN or np.max(np.abs(g[idx] * unit[idx])) < 1e-9 * N ** 0.5:
            # converged on the free parameters; a variance held at 0 whose
            # gradient points inside is released (a few times at most)
            inside = active & (g[vidx] * unit[vidx] > 1e-6 * N ** 0.5)
            if not inside.any() or releases >= 3:
                break
            releases += 1
            active &= ~inside
            psi = psi.copy()
            psi[vidx[inside]] = 1e-3 * unit[vidx[inside]]
            got = model.phi_hessian(psi)
            if got is None:
                return "an evaluation or a linear solve failed"
            ll, g, Hphi = got
            w = model._w.copy()
            continue
        step = np.zeros_like(psi)
        step[idx] = d
        if not np.all(np.isfinite(step)):
            return "an evaluation or a linear solve failed"
        # stay inside: a variance moves at most 90% of the way to 0
        tmax, ratio = fraction_to_bound(psi[vidx], step[vidx])
        psi, got = backtrack(model.phi_hessian, psi, step, tmax, ll)
        accepted = got is not None
        if accepted:
            ll, g, Hphi = got
            w = model._w.copy()
        steps += 1
        log.append(("newton", steps, ll))
        if progress is not None:
            progress(steps, ll)
        if not accepted:
            return "no step along the Newton direction increased the log-likelihood"
        # a variance cut short on its way to 0 twice in a row: an optimum on
        # the bound.  A random effect's variance is put on it and held there
        # (the active set); the residual variance cannot be 0: L-BFGS-B's turn
        capped = capped + 1 if tmax < 1.0 else 0
        if capped >= 2:
            hit = np.flatnonzero(ratio <= 1.0 / 0.9 * tmax * (1 + 1e-9))
            if np.any(vidx[hit] == vidx[-1]) or not hit.size:
                handover[:] = [psi.copy()]
                return "the residual variance heading for its bound of 0"
            active[hit] = True
            psi = psi.copy()
            psi[vidx[hit]] = 0.0
            got = model.phi_hessian(psi)
            if got is None:
                handover[:] = [psi.copy()]
                return "a variance heading for its bound of 0"
            ll, g, Hphi = got
            w = model._w.copy()
            capped = 0
    else:
        return f"no convergence in {MAX_ITER} Newton iterations"
    # a last step with the whole, exact Hessian (the cross terms included): the
    # estimates to the precision of a full Newton step, like the L-BFGS-B
    # driver's polish; the Hessian is the information if the step is negligible
    H = full_hessian(model, lay, psi, g, Hphi, w)
    if H is None:
        return "an evaluation or a linear solve failed"
    free = np.ones(t.nparams, dtype=bool)
    free[vidx[active]] = False
    try:
        d = np.zeros_like(psi)
        d[free] = np.linalg.solve(H[np.ix_(free, free)], -g[free])
    except np.linalg.LinAlgError:
        return "an evaluation or a linear solve failed"
    if np.all(np.isfinite(d)) and float(g @ d) > 0:
        cand = psi + d
        got = model.phi_hessian(cand)
        if got is not None and got[0] >= ll - 1e-12 * abs(ll):
            psi_H = psi
            psi = cand
            ll, g, Hphi = got
            w = model._w.copy()
            steps += 1
            scale = np.maximum(np.abs(psi), 0.1 * unit)
            if np.max(np.abs(psi - psi_H) / scale) > REUSE_HESSIAN_STEP:
                H = full_hessian(model, lay, psi, g, Hphi, w)
                if H is None:
                    return "an evaluation or a linear solve failed"
    res = SimpleNamespace(success=True)
    gnorm, converged = _judge(model, psi, ll, g, res, N)
    if not converged:
        return "the gradient at the last Newton step does not pass the convergence rule"
    return OptSummary(start=start, final=psi, loglik=ll, iterations=steps,
                      evaluations=model.nevals - n0, gradient_norm=gnorm, converged=True,
                      message="Newton steps with the exact variance Hessian converged",
                      newton_steps=steps, seconds=time.perf_counter() - t0, log=log,
                      hessian=H, hessian_at=None if H is None else psi.copy())
