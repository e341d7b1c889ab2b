"""Estimation: Newton's method with the whole exact Hessian from one kernel pass
per iteration (grouped random intercepts, :mod:`mlsem.model.ri2`, and with
covariances of the random intercepts, :mod:`mlsem.model.unst`; issue 14).

Each evaluation returns the log-likelihood, the gradient and the Hessian in all
parameters (fixed effects, variances, cross terms), so every iteration is one
pass and one full Newton step: no difference quotients, no stale blocks, and
the Hessian at the last point is the observed information handed to the
results.  Several residual variances (a relaxation) are covered.  Steps are the
modified Newton step where the Hessian is not negative definite, damped to keep
variances inside (at most 90% of the way to 0) and to increase the
log-likelihood.  A random effect's variance cut short on its way to 0 twice is
put on 0 and held there while its gradient points outside (an active set); a
residual variance heading for 0, a failed line search or too many iterations
hand back a reason (a string), and the caller falls back.  With covariance
blocks (the evaluator's ``step_cap``) a step goes at most 90% of the way to the
blocks' boundary (positive semi-definite); cut short there twice, the run hands
back its last point and the reason, and the caller falls back
(:func:`mlsem.estimate.grouped.optimize_auto`).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from . import newton as NW
from .optimize import OptSummary, _judge, _serial_blas, param_scale


def newton_exact(ex, psi0, progress=None, handover=None):
    """Newton's method on the evaluator ``ex`` (:class:`mlsem.model.ri2.ExactGrouped`)
    from psi0; an :class:`OptSummary` (converged) or the reason why not."""
    handover = [] if handover is None else handover
    handover.clear()
    with _serial_blas():
        return _run(ex, np.asarray(psi0, dtype=float), progress, handover)


def _run(ex, psi, progress, handover):
    t0 = time.perf_counter()
    model = ex.red
    n0 = model.nevals
    start = psi.copy()
    t = model.table
    N = max(model.prep.nobs, 1)
    unit = param_scale(model)
    lo = np.array([p.lower for p in t.params])
    bounded = np.flatnonzero(np.isfinite(lo))                 # the variances
    resid = set(np.asarray(t.theta_param).tolist())
    got = ex.evaluate(psi)
    if got is None:
        return "Sigma is not positive definite at the start"
    ll, g, H = got
    cap = getattr(ex, "step_cap", None)          # keeps covariance blocks PSD (model.unst)
    active = np.zeros(t.nparams, dtype=bool)     # variances held at their bound of 0
    capped = releases = steps = 0
    log = []
    for it in range(NW.MAX_ITER):
        free = np.flatnonzero(~active)
        # in the parameters' units (psi / unit): the eigenvalues of the fixed
        # effects' and the variances' blocks are then of one size in any units
        uf = unit[free]
        Hf = H[np.ix_(free, free)] * np.outer(uf, uf)
        gf = g[free] * uf
        try:
            lam, Q = np.linalg.eigh(Hf)
        except np.linalg.LinAlgError:
            return "a linear solve failed"
        if lam.size == 0 or not np.all(np.isfinite(lam)):
            return "a linear solve failed"
        big = float(np.max(np.abs(lam)))
        if not big > 0:
            return "a linear solve failed"
        lam = -np.maximum(np.abs(lam), 1e-10 * big)          # the modified Newton step
        d = Q @ ((Q.T @ gf) / -lam)
        gain = 0.5 * float(gf @ d)
        d *= uf
        if gain < NW.STOP_GAIN or np.max(np.abs(gf)) < 1e-9 * N ** 0.5:
            inside = active & (g * unit > 1e-6 * N ** 0.5)
            if not inside.any() or releases >= 3:
                # a last full step (quadratic convergence: the estimates to
                # rounding, like the L-BFGS-B driver's polish), kept if it
                # stays inside and does not lower the log-likelihood
                cand = psi.copy()
                cand[free] += d
                big_step = np.max(np.abs(d) / np.maximum(np.abs(psi[free]), 0.1 * uf)) > 1e-12
                if gain > 0 and big_step and np.all(cand[bounded] >= lo[bounded]):
                    got = ex.evaluate(cand)
                    if got is not None and got[0] >= ll - 1e-12 * abs(ll):
                        psi = cand
                        ll, g, H = got
                        steps += 1
                break
            releases += 1
            active &= ~inside
            psi = psi.copy()
            psi[inside] = 1e-3 * unit[inside]
            got = ex.evaluate(psi)
            if got is None:
                return "an evaluation failed"
            ll, g, H = got
            continue
        step = np.zeros_like(psi)
        step[free] = d
        if not np.all(np.isfinite(step)):
            return "a linear solve failed"
        tmax, ratio = NW.fraction_to_bound(psi[bounded] - lo[bounded], step[bounded])
        tcap = cap(psi, step) if cap is not None else np.inf
        block_cap = tcap < tmax                    # a covariance block's boundary binds
        if block_cap:
            tmax = tcap
        psi, got = NW.backtrack(ex.evaluate, psi, step, tmax, ll)
        accepted = got is not None
        if accepted:
            ll, g, H = got
        steps += 1
        log.append(("newton", steps, ll))
        if progress is not None:
            progress(steps, ll)
        if not accepted:
            return "no step along the Newton direction increased the log-likelihood"
        capped = capped + 1 if tmax < 1.0 else 0
        if capped >= 2 and block_cap:
            handover[:] = [psi.copy()]
            return "a covariance block heading for its boundary (singular)"
        if capped >= 2:
            hit = bounded[ratio <= 1.0 / 0.9 * tmax * (1 + 1e-9)]
            if not hit.size or any(int(i) in resid for i in hit):
                handover[:] = [psi.copy()]
                return "a residual variance heading for its bound of 0"
            active[hit] = True
            psi = psi.copy()
            psi[hit] = lo[hit]
            got = ex.evaluate(psi)
            if got is None:
                handover[:] = [psi.copy()]
                return "a variance heading for its bound of 0"
            ll, g, H = got
            capped = 0
    else:
        return f"no convergence in {NW.MAX_ITER} Newton iterations"
    gnorm, converged = _judge(model, psi, ll, g, SimpleNamespace(success=True), N)
    if not converged:
        return "the gradient at the last Newton step does not pass the convergence rule"
    return OptSummary(start=start, final=psi, loglik=ll, iterations=steps,
                      evaluations=model.nevals - n0, gradient_norm=gnorm, converged=True,
                      message=f"Newton steps with the whole closed-form Hessian "
                              f"({getattr(ex, 'label', 'mlsem.model.ri2')}) converged",
                      newton_steps=steps, seconds=time.perf_counter() - t0, log=log,
                      hessian=H, hessian_at=psi.copy())
