"""Estimation, several outcomes (issue 15): the grouped data and Newton's method.

The grouped data (:class:`mlsem.model.mreduced.MultiReduced`: one pseudo-unit per school
and set of observed outcomes, the within-school part in closed form) have the full data's
log-likelihood, gradient and exact Hessian block of the random effects' (co)variances, at
about a tenth of the cells.  On them, Newton's method: each iteration is one kernel pass
(log-likelihood, gradient and the exact Phi block of the Hessian); the Hessian's other
columns (coefficients and residual (co)variances) are forward differences of the analytic
gradient (one evaluation each; on large data on a subsample of the grouped rows,
:func:`mlsem.model.mreduced.subsample`, a third to a tenth of the cost), recomputed only
when a variance parameter has moved by more than ``C_REFRESH`` of itself since.  Steps
are modified Newton steps (curvatures made negative), damped to keep the variances
positive and to increase the log-likelihood. The run ends with the whole Hessian (the Phi
block exact, the other columns by forward differences of the whole data at the estimate),
a last Newton step with it, and that Hessian as the observed information (a last step
within the reuse radius is judged by its gradient alone).

With random intercepts at one or two nested levels (the usual case), each iteration uses
instead the whole exact Hessian from one kernel pass (:mod:`mlsem.model.mri2`, driven by
:func:`mlsem.estimate.newton_exact.newton_exact`): no difference quotients, and the
Hessian at the estimate is the observed information.  ``opt.exact_hessian_reason`` is
None then, else why not (and the path above runs).

Where Newton does not apply or stops (a variance heading for its bound of 0, a failed
step, ``MAX_ITER`` iterations) the L-BFGS-B driver (:func:`mlsem.estimate.optimize.optimize`)
takes over from the start, on the grouped data, and on the full data if that does not
converge.  ``opt.path`` ("grouped" / "full", ``opt.grouped_reason``) and ``opt.method``
("newton" / "lbfgsb", ``opt.newton_reason``) say what was used.
"""
from __future__ import annotations

import time
import warnings
from types import SimpleNamespace

import numpy as np

from ..model.mreduced import reduce_multi, subsample
from ..model.mri2 import build_exact
from .newton import backtrack, fraction_to_bound
from .newton_exact import newton_exact
from .optimize import REUSE_HESSIAN_STEP, OptSummary, _judge, _serial_blas, optimize, param_scale

MAX_ITER = 40
STOP_GAIN = 1e-9
C_REFRESH = 0.5
# a last Newton step shorter than this share of every parameter's unit is not taken: it
# moves the estimates by far less than any tolerance and the log-likelihood by O(1e-13)
# relative, and saves an evaluation with the Phi Hessian (the costliest kind)
SKIP_STEP = 1e-7
# forward-difference step of the Hessian columns, relative to max(|psi_i|, 0.1 unit_i)
FD_STEP = 1e-6


def optimize_multi(model, progress=None):
    """Estimates of a :class:`mlsem.model.multivariate.MultiModel` (see the module)."""
    red, why = reduce_multi(model)
    n_full = model.nevals
    if red is None:
        psi0 = model.start_values()
        opt = optimize(model, start=psi0, progress=progress)
        opt.path, opt.grouped_reason = "full", why
        opt.method, opt.newton_reason = "lbfgsb", "the grouped data do not apply"
        opt.exact_hessian_reason = "the grouped data do not apply"
        return opt
    psi0 = red.start_values()
    ex, why_exact = build_exact(red)
    opt = None
    if ex is not None:
        # the whole exact Hessian from one pass per iteration (mlsem.model.mri2)
        opt = newton_exact(ex, psi0, progress)
        if isinstance(opt, str):
            why_exact, opt = f"Newton (exact Hessian) stopped ({opt})", None
    if opt is None:
        with _serial_blas():
            opt = newton_multi(red, psi0, progress)
    if isinstance(opt, OptSummary):
        opt.method, opt.newton_reason = "newton", None
    else:
        reason = opt
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = optimize(red, start=psi0, progress=progress)
        opt.method, opt.newton_reason = "lbfgsb", f"Newton stopped ({reason})"
        if not opt.converged:
            # the full data from the default start (the path before grouping), then
            # from the moment start: a fuzz case (outcomes in units 1e-3 and 1e3) failed
            # on the grouped data and on the full data from the moment start, but
            # converged from the default one
            full = optimize(model, start=model.start_values(), progress=progress)
            if not full.converged:
                other = optimize(model, start=psi0, progress=progress)
                if other.converged or other.loglik > full.loglik:
                    full = other
            if full.converged or not (opt.loglik >= full.loglik):
                full.path, full.grouped_reason = "full", "the run on the grouped data did not converge"
                full.method, full.newton_reason = opt.method, opt.newton_reason
                full.evaluations = red.nevals + model.nevals - n_full
                full.exact_hessian_reason = why_exact
                return full
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    opt.path, opt.grouped_reason = "grouped", None
    opt.exact_hessian_reason = why_exact
    opt.evaluations = red.nevals + model.nevals - n_full
    return opt


def _fd_columns(model, psi, g, cols, unit):
    """d(dl/dpsi)/dpsi_c for c in ``cols`` by forward differences; None if an
    evaluation fails.  ``g`` None: the gradient at psi is evaluated first."""
    if g is None:
        _, g = model.evaluate(psi)
        if g is None:
            return None
    out = np.zeros((len(psi), len(cols)))
    for a, c in enumerate(cols):
        h = FD_STEP * max(abs(psi[c]), 0.1 * unit[c])
        p2 = psi.copy()
        p2[c] += h
        _, g2 = model.evaluate(p2)
        if g2 is None:
            p2[c] -= 2 * h
            _, g2 = model.evaluate(p2)
            if g2 is None:
                return None
            h = -h
        out[:, a] = (g2 - g) / h
    return out


def newton_multi(model, psi, progress=None):
    """Newton's method on ``model`` (the grouped data) from psi: an OptSummary
    (converged) or a string, why not."""
    t0 = time.perf_counter()
    n0 = model.nevals
    start = psi.copy()
    t = model.table
    N = max(model.prep.nobs, 1)
    unit = param_scale(model)
    hp = np.asarray(model.hess_params)
    other = np.setdiff1d(np.arange(t.nparams), hp)
    kinds = np.array([p.kind for p in t.params])
    var = np.flatnonzero(np.isin(kinds, ("var", "resid")))
    vidx = np.flatnonzero(kinds != "fixed")
    got = model.phi_hessian(psi)
    if got is None:
        return "Sigma is not positive definite at the start"
    ll, g, Hphi = got
    # the iterations' coefficient and residual columns from a subsample of the rows when
    # the data are large (about a tenth of the cost; the steps then converge linearly, fast)
    sub = subsample(model)

    def other_columns(psi, g):
        if sub is None:
            return _fd_columns(model, psi, g, other, unit)
        return _fd_columns(sub, psi, None, other, unit)

    Hoth = other_columns(psi, g)
    if Hoth is None:
        return "an evaluation failed"
    vC = psi[vidx].copy()
    log = []
    steps = 0
    capped = 0
    for it in range(MAX_ITER):
        if np.max(np.abs(psi[vidx] - vC) / np.maximum(np.abs(vC), 1e-3 * unit[vidx])) > C_REFRESH:
            Hoth = other_columns(psi, g)
            if Hoth is None:
                return "an evaluation failed"
            vC = psi[vidx].copy()
        H = _assemble(t.nparams, hp, Hphi, other, Hoth)
        # the eigen-decomposition in units of the parameters (H's curvatures span 1e20
        # and more when outcomes are in units a million apart: the floor below would
        # otherwise flatten the small ones)
        lam, Q = np.linalg.eigh(H * np.outer(unit, unit))
        if not np.all(np.isfinite(lam)):
            return "a linear solve failed"
        big = float(np.max(np.abs(lam)))
        lam = -np.maximum(np.abs(lam), 1e-10 * big)
        d = unit * (Q @ ((Q.T @ (g * unit)) / -lam))
        gain = 0.5 * float(g @ d)
        if gain < STOP_GAIN or np.max(np.abs(g * unit)) < 1e-9 * N ** 0.5:
            break
        # a variance moves at most 90% of the way to 0
        tmax, _ = fraction_to_bound(psi[var], d[var])
        psi, got = backtrack(model.phi_hessian, psi, d, tmax, ll)
        accepted = got is not None
        if accepted:
            ll, g, Hphi = got
        steps += 1
        log.append(("newton", steps, ll))
        if progress is not None:
            progress(steps, ll)
        if not accepted:
            return "no step along the Newton direction increased the log-likelihood"
        capped = capped + 1 if tmax < 1.0 else 0
        if capped >= 2:
            return "a variance heading for its bound of 0"
    else:
        return f"no convergence in {MAX_ITER} Newton iterations"
    # the other columns afresh at the estimate, one last step with the whole Hessian;
    # it is the information if that step is negligible (a step within the reuse radius
    # is judged by the gradient alone: the Hessian stays the one before it, as
    # optimize.information accepts; else recomputed there)
    H_at = psi.copy()
    for _ in range(2):
        Hoth = _fd_columns(model, psi, g, other, unit)
        if Hoth is None:
            return "an evaluation failed"
        H = _assemble(t.nparams, hp, Hphi, other, Hoth)
        H_at = psi.copy()
        try:
            d = np.linalg.solve(H, -g)
        except np.linalg.LinAlgError:
            return "a linear solve failed"
        if not (np.all(np.isfinite(d)) and float(g @ d) > 0):
            break
        scale = np.maximum(np.abs(psi), 0.1 * unit)
        if np.max(np.abs(d) / scale) <= SKIP_STEP:
            break           # the estimate already: the step moves nothing results show
        small = np.max(np.abs(d) / scale) <= REUSE_HESSIAN_STEP
        got = model.evaluate(psi + d) if small else model.phi_hessian(psi + d)
        if got is None or got[0] is None or not got[0] >= ll - 1e-12 * abs(ll):
            break
        psi = psi + d
        ll, g = got[0], got[1]
        steps += 1
        if small:
            break
        Hphi = got[2]
    else:
        return "the last Newton steps did not settle"
    gnorm, converged = _judge(model, psi, ll, g, SimpleNamespace(success=True), N)
    if not converged:
        return "the gradient at the last Newton step does not pass the convergence rule"
    if np.any(psi[var] <= 0):
        return "a variance at its bound of 0"
    if sub is not None:
        log.append(("subsample evaluations", sub.nevals, sub.prep.nrows))
    return OptSummary(start=start, final=psi, loglik=ll, iterations=steps,
                      evaluations=model.nevals - n0, gradient_norm=gnorm, converged=True,
                      message="Newton steps on the grouped data converged", newton_steps=steps,
                      seconds=time.perf_counter() - t0, log=log, hessian=H,
                      hessian_at=H_at)


def _assemble(n, hp, Hphi, other, Hoth):
    H = np.zeros((n, n))
    H[np.ix_(hp, hp)] = Hphi
    H[:, other] = Hoth
    H[other, :] = Hoth.T
    Ho = Hoth[other]
    H[np.ix_(other, other)] = 0.5 * (Ho + Ho.T)
    return H
