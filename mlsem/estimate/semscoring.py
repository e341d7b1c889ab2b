"""Fisher scoring for general SEMs (mlsem.sem): from the start, steps
I(psi)^-1 dl/dpsi with the expected information of FIML per missing-data
pattern (mlsem.model.seminfo), until the step's predicted gain is negligible;
then the Newton polish of mlsem.estimate.optimize (central differences of the
analytic gradient), whose last Hessian is the observed information the
standard errors use.  Where Sigma and the means are linear in psi (no free
loading or regression among latents: every nested model's wide form), the
steps become Newton steps on the exact observed information
(mlsem.model.seminfo.observed_information) once the predicted gain is below
NEWTON_GAIN, and the last of them is the fit's information.

On the wide SEM of ``unbalanced`` (6 parameters, 168 patterns): 3 scoring steps
and 2 exact Newton steps, 8 evaluations (with the standard errors), against 37
for L-BFGS-B and the polish.
Where scoring does not converge (a bound reached, an indefinite or singular
information, no ascent, too many steps) the fit falls back to L-BFGS-B from
the start (:func:`mlsem.estimate.optimize.optimize`), and the optimiser record
says why (``OptSummary.message`` and ``log``).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from ..model.seminfo import expected_information, linear_in_psi, observed_information
from .optimize import (REUSE_HESSIAN_STEP, OptSummary, _judge, _polish, _serial_blas, damped_step, optimize,
                       param_scale)

MAXIT = 50
# the information is computed anew while a step's predicted gain (1/2 g' I^-1 g,
# log-likelihood units) is above FREEZE_GAIN, or fell by less than the factor
# SLOW since the previous step; otherwise kept (near the optimum it changes
# little, and scoring's linear rate is set by its distance from the observed
# Hessian anyway)
FREEZE_GAIN = 1e-2
SLOW = 0.1
# scoring stops at the Newton polish's own rule (max |dl/dpsi x unit| <
# POLISH_TOL sqrt(N)): the polish then has nothing to do, and the information
# is the observed one at that point, as after L-BFGS-B
POLISH_TOL = 1e-9
# scoring hands over to L-BFGS-B (from where it is) when, with a fresh
# information, SLOW_STEPS steps in a row each kept more than SLOW_RATE of the
# previous gain: the expected information is then far from the observed
# Hessian (a misspecified model: 0.45 per step on the Holzinger-Swineford CFA)
SLOW_RATE = 0.3
SLOW_STEPS = 3
# models linear in psi (mlsem.model.seminfo.linear_in_psi): once the predicted
# gain is below NEWTON_GAIN, the steps use the exact observed information
# (Newton; quadratic convergence) where it is positive definite, computed anew
# at every step; the one at the last point is the fit's information
NEWTON_GAIN = 0.1
# scoring is not tried where the information would be large to build
# (k parameters x rows x variables of the row means' derivatives)
MAX_CELLS = 20_000_000


def why_not_scoring(model) -> str | None:
    """None if Fisher scoring applies, else the reason."""
    k = model.table.nparams
    if k == 0:
        return "no free parameters"
    if k * model.prep.nrows * model.P > MAX_CELLS:
        return "the information would be large to build (parameters x rows x variables)"
    return None


def fit(model, start, progress=None, maxiter=5000) -> OptSummary:
    """Fisher scoring then the Newton polish; L-BFGS-B (optimize) where that
    does not converge (from the start) or converges slowly (from where scoring
    stopped)."""
    t0 = time.perf_counter()
    start = np.asarray(start, dtype=float)
    reason = why_not_scoring(model)
    log = []
    origin = start
    if reason is None:
        with _serial_blas():
            out, reason, handover = _scoring(model, start, progress, log)
        if out is not None:
            out.seconds = time.perf_counter() - t0
            return out
        if handover is not None:
            origin = handover
    opt = optimize(model, start=origin, maxiter=maxiter, progress=progress)
    where = "from the start" if origin is start else "from where scoring stopped"
    opt.log = log + [("fallback", 0, reason)] + opt.log
    opt.message = f"Fisher scoring: {reason}; L-BFGS-B {where}: {opt.message}"
    opt.start = start
    opt.seconds = time.perf_counter() - t0
    return opt


def _scoring(model, psi0, progress, log):
    """(OptSummary, None, None) when converged, else (None, the reason, the
    point to continue from or None for the start)."""
    N = max(model.prep.nobs, 1)
    tol = POLISH_TOL * N ** 0.5
    lo = np.array([p.lower for p in model.table.params])
    free = np.ones(len(psi0), dtype=bool)
    unit = param_scale(model)
    psi = psi0.copy()
    ll, g = model.evaluate(psi)
    if ll is None:
        return None, "the start is not admissible", None
    it = slow = newton = 0
    gain = prev = np.inf
    c = None
    linear = linear_in_psi(model)
    obs_at = None           # where the last observed information (in ``info``) was computed
    last = None             # the last step taken
    while True:
        if np.max(np.abs(g * unit), initial=0.0) < tol:
            break
        obs_at = None
        use_obs = linear and gain < NEWTON_GAIN
        fresh = use_obs or c is None or gain > FREEZE_GAIN or gain > SLOW * prev
        if fresh:
            if use_obs:
                info = observed_information(model, psi)
                try:
                    if info is None or not np.all(np.isfinite(info)):
                        raise np.linalg.LinAlgError
                    c = np.linalg.cholesky(info)
                    obs_at = psi
                except np.linalg.LinAlgError:
                    use_obs = False
            if not use_obs:
                info = expected_information(model, psi)
                if info is None or not np.all(np.isfinite(info)):
                    return None, f"no expected information at step {it}", None
                try:
                    c = np.linalg.cholesky(info)
                except np.linalg.LinAlgError:
                    return None, f"the expected information is not positive definite at step {it}", None
        step = np.linalg.solve(c.T, np.linalg.solve(c, g))
        prev, gain = gain, 0.5 * float(g @ step)
        if not np.isfinite(gain):
            return None, f"a non-finite step at step {it}", None
        slow = slow + 1 if (fresh and gain > SLOW_RATE * prev) else 0
        if slow >= SLOW_STEPS:
            return None, f"slow progress after {it} steps", psi
        if it >= MAXIT:
            return None, f"{MAXIT} steps without convergence", psi
        found = damped_step(psi, free, step, lo, ll, lambda c_: (*model.evaluate(c_), c_))
        if found is None:
            if gain < 1e-9 * max(1.0, abs(ll)) * 1e-3:
                break           # at rounding level: the polish finishes
            return None, (f"no step along the scoring direction stayed within the bounds and increased "
                          f"the log-likelihood (step {it + 1})"), psi
        last = found[0] - psi
        psi, ll, g = found
        it += 1
        newton += obs_at is not None
        log.append(("newton" if obs_at is not None else "scoring", it, ll))
        if progress is not None:
            progress(it, ll)
    if obs_at is not None and last is not None and np.all(
            np.abs(last) <= REUSE_HESSIAN_STEP * np.maximum(np.abs(psi), 0.1 * unit)):
        # converged by a Newton step on the exact observed information that moved
        # no parameter by more than REUSE_HESSIAN_STEP: that information is the
        # fit's (it differs from the one at psi by O(1e-6) relative)
        H, psi_H, steps = -info, obs_at, 0
    else:
        psi, ll, g, steps, H, psi_H = _polish(model, psi, ll, g, N)
    if steps:
        log.append(("newton", steps, ll))
    gnorm, converged = _judge(model, psi, ll, g, SimpleNamespace(success=True), N)
    if not converged:
        return None, f"scoring and the Newton polish ended with max |gradient| {gnorm:.3g}", None
    if np.any(psi - lo <= 1e-7 * np.maximum(np.abs(psi), unit)):
        return None, "a parameter at its bound", None
    out = OptSummary(start=psi0, final=psi, loglik=ll, iterations=it, evaluations=model.nevals,
                      gradient_norm=gnorm, converged=True,
                      message=(f"Fisher scoring ({it - newton} steps)"
                               + (f", {newton} exact Newton step(s)" if newton else "")
                               + (f" and {steps} Newton step(s)" if steps else "")),
                      newton_steps=steps, log=log, hessian=H, hessian_at=psi_H)
    # the fit's information may be this one (mlsem.api.semfit): exact, not the
    # polish's central differences
    out.hessian_exact = H is not None and steps == 0 and obs_at is not None
    return out, None, None
