"""REML: the restricted likelihood of the variance parameters, as lme4's
``lmer(REML = TRUE)`` and Stata's ``mixed, reml``.

With the fixed effects profiled out by GLS, beta(theta) = (X'V^-1X)^-1 X'V^-1y,

    l_R(theta) = l(beta(theta), theta) - 1/2 log|X'V^-1X| + p/2 log(2 pi)

(so -2 l_R is lme4's REML criterion: n - p in the 2 pi term).  X'V^-1X is a
sum over top units of X_r' Sigma_r^-1 X_r: the kernel's w for the residual
"design column a" is Sigma^-1 x_a, so q kernel calls give it.  The gradient:
dl/dtheta at beta(theta) (the beta part vanishes there) plus the derivative of
-1/2 log|C|, C = X'V^-1X, which is 1/2 V^-1 X C^-1 X' V^-1 per unit; with
C^-1 = R R' that is sum_k 1/2 v_k v_k', v_k = V^-1 X R_k, i.e. the kernel's
gradient at the residual X R_k minus its gradient at a zero residual (the
-1/2 Sigma^-1 part).  Everything is analytic; the information of the variance
parameters is the central difference of that gradient.  Standard errors of
the fixed effects are C^-1 at the REML estimates, as lme4's.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
from scipy.optimize import minimize

from ..errors import ConvergenceWarning, MlsemError
from types import SimpleNamespace

from .optimize import (STALL_EVALS, STALL_REL, OptSummary, _Stalled, damped_step, param_scale,
                       singular_block_params, start_values)
from ..model.scores import chain, kernel_eval

LOG2PI = math.log(2.0 * math.pi)


class RemlObjective:
    def __init__(self, model):
        self.model = model
        t = model.table
        if model.q == 0:
            raise MlsemError("method='reml' needs at least one fixed effect")
        if len(np.unique(t.beta_param)) != model.q:
            raise MlsemError("method='reml' needs one coefficient per design column")
        if np.any(model.prep.wrow != 1.0):
            raise MlsemError("method='reml' cannot be combined with sampling weights")
        self.fixed = np.zeros(t.nparams, dtype=bool)
        self.fixed[t.beta_param] = True
        self.nevals = 0

    def gls(self, psi):
        """(C = X'V^-1X, beta_hat, logdet C) at the variance parameters in psi."""
        m = self.model
        prep = m.prep
        _, Phi, Theta = m.matrices(psi)
        q = m.q
        WX = np.empty((prep.nobs, q))
        for a in range(q):
            out = kernel_eval(m, prep.X[:, a], Phi, Theta)
            if out is None:
                return None
            WX[:, a] = out[3]
        C = prep.X.T @ WX
        C = 0.5 * (C + C.T)
        try:
            L = np.linalg.cholesky(C)
        except np.linalg.LinAlgError:
            return None
        beta = np.linalg.solve(C, WX.T @ prep.y)
        return C, L, beta, 2.0 * np.log(np.diag(L)).sum()

    def value(self, psi, need_grad=True):
        """(l_R, dl_R/dpsi with zeros for the fixed effects, psi with beta_hat)."""
        self.nevals += 1
        m = self.model
        g = self.gls(psi)
        if g is None:
            return None, None, psi
        C, L, beta, logdet = g
        psi = psi.copy()
        psi[m.table.beta_param] = beta
        ll, grad = m.evaluate(psi, need_grad=need_grad)
        if ll is None:
            return None, None, psi
        lr = ll - 0.5 * logdet + 0.5 * m.q * LOG2PI
        if not need_grad:
            return lr, None, psi
        _, Phi, Theta = m.matrices(psi)
        Rm = np.linalg.inv(L).T          # C^-1 = Rm Rm'
        zero = kernel_eval(m, np.zeros(m.prep.nobs), Phi, Theta)
        g0 = chain(m, psi, zero[1], zero[2], None)
        for k in range(m.q):
            out = kernel_eval(m, m.prep.X @ Rm[:, k], Phi, Theta)
            grad = grad + chain(m, psi, out[1], out[2], None) - g0
        grad[self.fixed] = 0.0
        return lr, grad, psi

    def hessian(self, psi, step=1e-4):
        """d2 l_R / dpsi2 over the variance parameters (central differences)."""
        idx = np.flatnonzero(~self.fixed)
        lo = np.array([p.lower for p in self.model.table.params])
        unit = param_scale(self.model)
        H = np.zeros((len(idx), len(idx)))
        for c, i in enumerate(idx):
            h = step * max(abs(psi[i]), 0.1 * unit[i])
            up, dn = psi.copy(), psi.copy()
            up[i] += h
            dn[i] -= h
            if np.isfinite(lo[i]) and dn[i] < lo[i]:
                _, g0, _ = self.value(psi)
                _, g1, _ = self.value(up)
                H[:, c] = (g1[idx] - g0[idx]) / h
            else:
                _, g1, _ = self.value(up)
                _, g2, _ = self.value(dn)
                if g1 is None or g2 is None:
                    return None
                H[:, c] = (g1[idx] - g2[idx]) / (2 * h)
        return 0.5 * (H + H.T)


def optimize_reml(model, maxiter=5000, start=None):
    """Maximise l_R over the variance parameters, from ``start`` (psi; the
    default start values when None).  Returns (OptSummary, obj)."""
    t0 = time.perf_counter()
    obj = RemlObjective(model)
    psi0 = start_values(model) if start is None else np.asarray(start, dtype=float)
    tau0 = model.psi_to_tau(psi0)
    N = max(model.prep.nobs, 1)
    lo = np.array([p.lower for p in model.table.params])
    unit = param_scale(model)
    ref = []     # the first finite l_R: the objective is measured from it (units shift l_R)
    best = [-np.inf]
    stall = {"since": 0, "x": tau0, "it": 0}

    def cb(tau):
        stall["it"] += 1

    def f(tau):
        psi = model.tau_to_psi(tau)
        lr, g, _ = obj.value(psi)
        if lr is None or not np.isfinite(lr):
            # a finite penalty above the best value so far (as estimate._lbfgsb):
            # 1e300 overflows the line search's interpolation and ends the run
            # at the start (seen on pastes, a first step to a zero residual variance)
            return (-(best[0] - ref[0]) / N if ref else 0.0) + 1e4, np.zeros_like(tau)
        if not ref:
            ref.append(lr)
        # the stall rule of estimate._lbfgsb: evaluations that gain nothing
        # beyond rounding at a point whose gradient passes the convergence rule
        # are the line search fighting rounding (20 wasted evaluations seen on
        # unbalanced in other units); the Newton polish finishes
        stall["since"] = 0 if lr > best[0] + STALL_REL * abs(lr) else stall["since"] + 1
        if lr > best[0]:
            best[0], stall["x"] = lr, tau.copy()
        gt = model.grad_tau(tau, g)
        if stall["since"] >= STALL_EVALS and np.max(np.abs(gt), initial=0.0) < 1e-3 * max(1.0, N ** 0.5):
            raise _Stalled
        return -(lr - ref[0]) / N, -gt / N

    try:
        res = minimize(f, tau0, jac=True, method="L-BFGS-B", bounds=model.tau_bounds(), callback=cb,
                       options={"maxiter": maxiter, "maxfun": 4 * maxiter, "ftol": 1e-15,
                                "gtol": 1e-10, "maxcor": 20})
    except _Stalled:
        res = SimpleNamespace(x=stall["x"], nit=stall["it"], success=True,
                              message="L-BFGS-B stalled at rounding level near the optimum; "
                                      "Newton steps finish")
    psi = model.tau_to_psi(res.x)
    lr, g, psi = obj.value(psi)
    # Newton polish on the interior variance parameters (not those of a
    # rank-deficient covariance block: a Newton step in psi leaves the
    # positive semi-definite cone there)
    steps = 0
    idx = np.flatnonzero(~obj.fixed)
    sing = singular_block_params(model, psi) if lr is not None else np.zeros(0, dtype=np.int64)
    for _ in range(8):
        if lr is None:
            break
        free = idx[(psi[idx] - lo[idx] > 1e-7 * np.maximum(np.abs(psi[idx]), unit[idx]))
                   & ~np.isin(idx, sing)]
        if len(free) == 0 or np.max(np.abs(g[free] * unit[free])) < 1e-9 * N ** 0.5:
            break
        H = obj.hessian(psi)
        if H is None:
            break
        sel = np.searchsorted(idx, free)
        try:
            step = np.linalg.solve(H[np.ix_(sel, sel)], -g[free])
        except np.linalg.LinAlgError:
            break
        found = damped_step(psi, free, step, lo, lr, obj.value)
        accepted = found is not None
        if accepted:
            psi, lr, g = found
        steps += 1
        if not accepted:
            break
    interior = idx[psi[idx] - lo[idx] > 1e-7 * np.maximum(np.abs(psi[idx]), unit[idx])]
    gnorm = (float(np.max(np.abs(g[interior] * unit[interior]), initial=0.0))
             if g is not None else np.inf)
    if g is not None and len(sing):
        # a singular block's psi gradient is not 0 at its optimum (on the
        # cone's boundary): judged in its Cholesky coordinates, as estimate._judge
        tau = model.psi_to_tau(psi)
        gt = model.grad_tau(tau, g)
        lo_t = np.array([-np.inf if b[0] is None else b[0] for b in model.tau_bounds()])
        at_t = np.isfinite(lo_t) & (tau - lo_t <= 1e-7 * np.maximum(np.abs(tau), 1.0))
        plain = ~np.isin(idx, sing)
        gnorm = max(float(np.max(np.abs(g[interior[np.isin(interior, idx[plain])]]
                                        * unit[interior[np.isin(interior, idx[plain])]]), initial=0.0)),
                    float(np.max(np.abs(gt[len(model.free_plain):][~at_t[len(model.free_plain):]]),
                                 initial=0.0)))
    converged = bool(lr is not None and gnorm < 1e-3 * max(1.0, N ** 0.5))
    msg = res.message if isinstance(res.message, str) else str(res.message)
    if not converged:
        warnings.warn(f"the REML optimiser did not converge ({msg}; max |gradient| {gnorm:.3g})",
                      ConvergenceWarning, stacklevel=3)
    opt = OptSummary(start=psi0, final=psi, loglik=lr if lr is not None else np.nan,
                     iterations=int(res.nit), evaluations=obj.nevals, gradient_norm=gnorm,
                     converged=converged, message=msg, newton_steps=steps,
                     seconds=time.perf_counter() - t0, log=[("lbfgsb-reml", res.nit, lr)])
    return opt, obj


def reml_vcov(obj, psi):
    """Fixed effects: (X'V^-1X)^-1 (lme4); variance parameters: the inverse of
    the observed information of l_R in them; cross terms 0 (the REML
    information is block diagonal in that sense: beta is not a parameter of l_R)."""
    m = obj.model
    n = m.table.nparams
    V = np.full((n, n), np.nan)
    C, L, beta, _ = obj.gls(psi)
    fb = m.table.beta_param
    V[np.ix_(fb, fb)] = np.linalg.inv(C)
    idx = np.flatnonzero(~obj.fixed)
    H = obj.hessian(psi)
    info = None
    if H is not None:
        info = -H
        try:
            V[np.ix_(idx, idx)] = np.linalg.inv(info)
        except np.linalg.LinAlgError:
            V[np.ix_(idx, idx)] = np.linalg.pinv(info)
    return V, info
