"""Estimation: starting values, the L-BFGS-B driver, a Newton polish, and the
observed information from central differences of the analytic gradient.

The optimiser record (:class:`OptSummary`) is kept apart from the model and
the results, as MixedModels.jl does.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from types import SimpleNamespace
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from ..errors import ConvergenceWarning

try:  # optional: not a dependency of mlsem.  The controller finds the loaded
    # BLAS libraries once, at import (5 ms); each limit() is then ~20 us.
    from threadpoolctl import ThreadpoolController
    _BLAS = ThreadpoolController()
except Exception:  # pragma: no cover - not installed, or an unusual platform
    _BLAS = None


def _serial_blas():
    """BLAS pinned to one thread while the optimiser runs: L-BFGS-B's and the
    Newton step's BLAS calls are on vectors of a few parameters, and waking
    OpenBLAS's threads for each cost ~3 ms per iteration here (40 ms for a
    13-evaluation toy problem, against 1 ms with one thread).  The kernel's own
    parallelism (OpenMP over patterns) is not affected.  Without threadpoolctl
    this is a no-op."""
    if _BLAS is None:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass
class OptSummary:
    start: np.ndarray
    final: np.ndarray
    loglik: float
    iterations: int
    evaluations: int
    gradient_norm: float        # max |dl/dpsi| over interior parameters, at the end
    converged: bool
    message: str
    newton_steps: int = 0
    seconds: float = 0.0
    log: list = field(default_factory=list)
    hessian: np.ndarray | None = None      # the last Newton step's Hessian ...
    hessian_at: np.ndarray | None = None   # ... and the psi where it was computed


def start_values(model) -> np.ndarray:
    """OLS for the mean; the OLS residual variance split over the components."""
    if hasattr(model, "start_values"):  # models with their own rule (general SEMs, mlsem.backends.dask)
        return model.start_values()
    t = model.table
    prep = model.prep
    psi = np.zeros(t.nparams)
    ols = getattr(model, "ols", None)        # Model's, by the normal equations, reused
    if ols is not None and (ols[0] is not None or not model.q):
        if model.q:
            psi[t.beta_param] = ols[0]
        s2 = ols[1] or 1.0
    else:
        if model.q:
            beta, *_ = np.linalg.lstsq(prep.X, prep.y, rcond=None)
            resid = prep.y - prep.X @ beta
            psi[t.beta_param] = beta
        else:
            resid = prep.y - prep.y.mean()
        s2 = float(np.mean(resid ** 2)) or 1.0
    # the covariates' variances scale the start of a slope variance only
    slopes = any(p.kind == "var" and ":" in p.name and not p.name.endswith(":Intercept)")
                 for p in t.params)
    xvar = {n: float(np.var(prep.X[:, c])) for c, n in enumerate(prep.xnames)} if slopes else {}
    return variance_starts(t, psi, s2, xvar)


def variance_starts(table, psi, s2, xvar) -> np.ndarray:
    """Fill the variance parameters of ``psi``: the residual variance ``s2``
    of the mean model split equally over the variance components and the
    residual; a slope variance scaled by its covariate's variance (``xvar``,
    by design-column name); covariances and correlations start at 0."""
    nvar = len({p.level for p in table.params if p.kind == "var"}) + 1
    for i, p in enumerate(table.params):
        if p.kind == "var":
            share = s2 / nvar
            if ":" in p.name and not p.name.endswith(":Intercept)"):
                cov = p.name.split(":")[-1].rstrip(")").split("[")[0]
                share = 0.1 * share / (xvar.get(cov) or 1.0)
            psi[i] = share
        elif p.kind == "resid":
            psi[i] = s2 / nvar
        elif p.kind in ("cov", "rcov", "corr"):
            psi[i] = 0.0
    return psi


def damped_step(psi, free, step, lo, current, value):
    """The Newton step on the ``free`` parameters, halved (1, 1/2, 1/4, 1/10)
    until it stays within the lower bounds ``lo`` and does not lower the
    objective below ``current``; ``value(cand) -> (val, grad, cand)``.
    Returns (psi, val, grad) of the accepted point, or None."""
    for shrink in (1.0, 0.5, 0.25, 0.1):
        cand = psi.copy()
        cand[free] += shrink * step
        if np.any(cand < lo):
            continue
        val, g, cand = value(cand)
        if val is not None and val >= current - 1e-12 * abs(current):
            return cand, val, g
    return None


def param_scale(model) -> np.ndarray:
    """Each parameter's unit (model.pscale, see model.param_scales); ones for
    models without one.  Steps, bound tests and gradient tolerances on psi are
    taken relative to it, so that they mean the same in any units."""
    d = getattr(model, "pscale", None)
    return np.ones(model.table.nparams) if d is None else np.asarray(d, dtype=float)


# a covariance block is rank-deficient (a correlation of +-1, lme4's singular
# fit) when a diagonal of its Cholesky factor, squared, is below this share of
# the variance it belongs to
SINGULAR_BLOCK = 1e-4


def singular_block_params(model, psi, share=SINGULAR_BLOCK):
    """The parameters of the covariance blocks (of the optimiser's Cholesky
    coordinates) that are rank-deficient at psi; an empty array if none."""
    out = []
    chol = getattr(model, "_chol", [])
    if not chol:
        return np.zeros(0, dtype=np.int64)
    tau = model.psi_to_tau(psi)
    d = param_scale(model)
    pos = len(model.free_plain)
    for blk in chol:
        k = blk.pidx.shape[0]
        r, c = np.tril_indices(k)
        L = tau[pos: pos + len(r)]
        pos += len(r)
        on = r == c
        v = blk.pidx[r[on], c[on]]
        if np.any(L[on] ** 2 * d[v] <= share * np.abs(psi[v])):
            out.extend(np.unique(blk.pidx).tolist())
    return np.array(sorted(set(out)), dtype=np.int64)


def _at_bound(model, psi, rel=1e-7):
    lo = np.array([p.lower for p in model.table.params])
    scale = np.maximum(np.abs(psi), param_scale(model))
    return np.isfinite(lo) & (psi - lo <= rel * scale)


def hessian(model, psi, step=1e-4):
    """Hessian of the log-likelihood in psi.  The block of the parameters that
    enter Phi linearly comes from the kernel (``model.phi_hessian``, one pass
    over the data) where the model has it; every other column by central
    differences of the analytic gradient (forward differences at a bound).
    Symmetrised."""
    n = len(psi)
    H = np.zeros((n, n))
    exact = getattr(model, "phi_hessian", None)
    got = exact(psi) if exact is not None else None
    an = np.zeros(0, dtype=np.int64)
    g_at = [None]        # dl/dpsi at psi, evaluated once if a one-sided difference needs it
    if got is not None:
        an = model.hess_params
        H[np.ix_(an, an)] = got[2]
        g_at[0] = got[1]

    def grad_at_psi():
        if g_at[0] is None:
            g_at[0] = model.evaluate(psi)[1]
        return g_at[0]

    fd = np.setdiff1d(np.arange(n), an)
    lo = np.array([p.lower for p in model.table.params])
    unit = param_scale(model)
    for i in fd:
        h = step * max(abs(psi[i]), 0.1 * unit[i])
        up = psi.copy()
        up[i] += h
        dn = psi.copy()
        dn[i] -= h
        if np.isfinite(lo[i]) and dn[i] < lo[i]:
            g0 = grad_at_psi()
            _, g1 = model.evaluate(up)
            if g1 is None or g0 is None:
                return None
            H[:, i] = (g1 - g0) / h
        else:
            _, g1 = model.evaluate(up)
            _, g2 = model.evaluate(dn)
            if g1 is None and g2 is None:
                return None
            if g1 is None or g2 is None:
                # one side leaves the admissible set (a singular covariance
                # block at the optimum): a one-sided difference on the other
                g0 = grad_at_psi()
                if g0 is None:
                    return None
                H[:, i] = (g2 - g0) / -h if g1 is None else (g1 - g0) / h
            else:
                H[:, i] = (g1 - g2) / (2 * h)
    # the differenced columns hold the cross terms with the exact block
    H[np.ix_(fd, an)] = H[np.ix_(an, fd)].T
    return 0.5 * (H + H.T)


# L-BFGS-B is stopped when STALL_EVALS evaluations in a row improved the
# log-likelihood by less than STALL_REL (relative) at a point whose gradient
# already passes the convergence tolerance: its line search is then fighting
# rounding (seen: 35 of 70 evaluations on 1.15M rows), and the Newton polish,
# whose Hessian is needed for the information anyway, finishes in one step.
STALL_REL = 1e-13
STALL_EVALS = 4


class _Stalled(Exception):
    pass


# Newton instead of L-BFGS-B's tail.  Where the Hessian is cheap against the
# number of parameters (the random-effect (co)variances come exactly from one
# kernel pass, only beta and Theta by differences), L-BFGS-B is left once an
# iteration gains less than EARLY_GAIN log-likelihood units: it needs about
# one iteration per parameter to learn the curvature of a 58-parameter
# unstructured block (26 iterations from a gap of 0.5 to 3e-8 on 1.15M rows),
# Newton two steps.  "Cheap": a Hessian costs at most a quarter as many
# evaluations as there are parameters.  A polish that does not converge goes
# back to L-BFGS-B.
EARLY_GAIN = 0.1
EARLY_MIN_ITER = 5
# ... and only on data large enough for an evaluation to cost something: on
# small data an iteration's gain falls below EARLY_GAIN while the Hessian is
# still indefinite (35 of 40 small synthetic unstructured fits switched and then
# needed L-BFGS-B again, from scratch: more evaluations than never switching).
EARLY_MIN_OBS = 50_000


def _hessian_cost(model) -> int:
    """Evaluations one call of :func:`hessian` costs (the exact pass counted as 2)."""
    n = model.table.nparams
    exact = len(getattr(model, "hess_params", ())) if hasattr(model, "phi_hessian") else 0
    return 2 * (n - exact) + (2 if exact else 0)


class _Switch(Exception):
    pass


def optimize(model, start=None, maxiter=5000, progress=None) -> OptSummary:
    with _serial_blas():
        return _optimize(model, start, maxiter, progress)


def _optimize(model, start, maxiter, progress) -> OptSummary:
    t0 = time.perf_counter()
    psi0 = start_values(model) if start is None else np.asarray(start, dtype=float)
    N = max(model.prep.nobs, 1)
    log = []
    early = 4 * _hessian_cost(model) <= model.table.nparams and N >= EARLY_MIN_OBS
    res, psi, ll, g = _lbfgsb(model, model.psi_to_tau(psi0), maxiter, progress, N, early)
    log.append(("lbfgsb", res.nit, ll))
    psi, ll, g, steps, H_last, psi_H = _polish(model, psi, ll, g, N)
    gnorm, converged = _judge(model, psi, ll, g, res, N)
    nit = res.nit
    if early and getattr(res, "switched", False) and not converged and ll is not None:
        # Newton did not finish what L-BFGS-B left: L-BFGS-B all the way
        run = _rerun(model, model.psi_to_tau(psi), maxiter, progress, N, log, "lbfgsb after the polish")
        nit += run.nit
        if run.ll is not None and run.ll >= ll:
            res, psi, ll, g, gnorm, converged = run.res, run.psi, run.ll, run.g, run.gnorm, run.converged
            steps += run.steps
            if run.H is not None:
                H_last, psi_H = run.H, run.psi_H
    if not converged and g is not None:
        # a singular covariance block (or a variance at 0) that L-BFGS-B
        # approached but did not reach (its line search gave up at rounding
        # level a hair inside): put those parameters on their bound and
        # restart from there; kept only if no worse
        tau_s = _snap_to_bounds(model, psi, g)
        if tau_s is not None:
            run = _rerun(model, tau_s, maxiter, progress, N, log, "lbfgsb from the bounds")
            nit += run.nit
            if (run.ll is not None and run.ll >= ll - 1e-12 * abs(ll)
                    and (run.converged or (run.gnorm < gnorm and run.ll >= ll))):
                res, psi, ll, g, gnorm, converged = run.res, run.psi, run.ll, run.g, run.gnorm, run.converged
                steps += run.steps
                if run.H is not None:
                    H_last, psi_H = run.H, run.psi_H
    msg = res.message if isinstance(res.message, str) else str(res.message)
    if not converged:
        warnings.warn(f"the optimiser did not converge ({msg}; max |gradient| {gnorm:.3g})",
                      ConvergenceWarning, stacklevel=4)
    return OptSummary(start=psi0, final=psi, loglik=ll if ll is not None else np.nan,
                      iterations=int(nit), evaluations=model.nevals, gradient_norm=gnorm,
                      converged=converged, message=msg, newton_steps=steps,
                      seconds=time.perf_counter() - t0, log=log, hessian=H_last, hessian_at=psi_H)


def _lbfgsb(model, tau0, maxiter, progress, N, early=False):
    """L-BFGS-B on tau from tau0, on -loglik / N.  Returns (result, psi, ll, g).
    ``early``: stop once an iteration gains less than EARLY_GAIN (Newton's turn)."""
    state = {"best": -np.inf, "it": 0, "since": 0, "best_x": tau0, "prev": -np.inf, "ref": None}

    def f(tau):
        psi = model.tau_to_psi(tau)
        ll, g = model.evaluate(psi)
        state["last"] = (tau.copy(), ll, g)
        if ll is None or not np.isfinite(ll):
            # a finite penalty above the best value so far: 1e300 overflows the
            # line search's interpolation and ends the run ("relative reduction")
            ref = state["ref"] or 0.0
            return (-(state["best"] - ref) / N if np.isfinite(state["best"]) else 0.0) + 1e4, np.zeros_like(tau)
        if state["ref"] is None:
            # the objective is measured from the first finite value: changing the
            # units of y shifts the log-likelihood by a constant (-n log c), which
            # must not change L-BFGS-B's relative stopping rule
            state["ref"] = ll
        if ll > state["best"] + STALL_REL * abs(ll):
            state["since"] = 0
        else:
            state["since"] += 1
        if ll > state["best"]:
            state["best"], state["best_x"] = ll, tau.copy()
        gt = model.grad_tau(tau, g)
        if (state["since"] >= STALL_EVALS
                and np.max(np.abs(gt), initial=0.0) < 1e-3 * max(1.0, N ** 0.5)):
            raise _Stalled
        return -(ll - state["ref"]) / N, -gt / N

    def cb(tau):
        state["it"] += 1
        if progress is not None:
            progress(state["it"], state["best"])
        gain = state["best"] - state["prev"]
        state["prev"] = state["best"]
        if early and state["it"] >= EARLY_MIN_ITER and 0.0 <= gain < EARLY_GAIN:
            raise _Switch

    # gtol 1e-9 (on -loglik/N): near the optimum of a large data set the
    # objective's changes fall below its rounding, L-BFGS-B's line search then
    # fails over and over (35 of 70 evaluations on 1.15M rows, ending ABNORMAL)
    # while the gradient is still informative; the Newton polish finishes.
    try:
        res = minimize(f, tau0, jac=True, method="L-BFGS-B", bounds=model.tau_bounds(),
                       callback=cb, options={"maxiter": maxiter, "maxfun": 4 * maxiter,
                                             "ftol": 1e-15, "gtol": 1e-9, "maxcor": 20})
    except _Stalled:
        res = SimpleNamespace(
            x=state["best_x"], nit=state["it"], success=True,
            message="L-BFGS-B stalled at rounding level near the optimum; Newton steps finish")
    except _Switch:
        res = SimpleNamespace(
            # success False: judged by the strict gradient rule (Newton either
            # finishes to rounding level or L-BFGS-B runs again)
            x=state["best_x"], nit=state["it"], success=False, switched=True,
            message="L-BFGS-B near the optimum; Newton steps (exact Hessian) finish")
    psi = model.tau_to_psi(res.x)
    last = state.get("last")
    if last is not None and np.array_equal(last[0], res.x):
        ll, g = last[1], last[2]      # L-BFGS-B's final point was its last evaluation
    else:
        ll, g = model.evaluate(psi)
    return res, psi, ll, g


def _rerun(model, tau, maxiter, progress, N, log, stage):
    """A further L-BFGS-B run from tau, polished and judged: the candidate the
    caller keeps or drops."""
    res, psi, ll, g = _lbfgsb(model, tau, maxiter, progress, N)
    log.append((stage, res.nit, ll))
    steps, H, psi_H = 0, None, None
    if ll is not None:
        psi, ll, g, steps, H, psi_H = _polish(model, psi, ll, g, N)
    gnorm, converged = _judge(model, psi, ll, g, res, N)
    return SimpleNamespace(res=res, nit=res.nit, psi=psi, ll=ll, g=g, steps=steps, H=H,
                           psi_H=psi_H, gnorm=gnorm, converged=converged)


def _polish(model, psi, ll, g, N):
    """Newton steps on psi, interior parameters only: the L-BFGS-B stopping
    rule is on the scaled objective; a few Newton steps make the estimates
    exact to the precision the references carry.  Returns (psi, ll, g, steps,
    last Hessian, where it was computed)."""
    steps = 0
    H_last = psi_H = None
    lo_all = np.array([p.lower for p in model.table.params])
    unit = param_scale(model)
    for _ in range(8):
        if ll is None:
            break
        free = ~_at_bound(model, psi)
        gf = g[free]
        if np.max(np.abs(gf * unit[free]), initial=0.0) < 1e-9 * N ** 0.5:
            break
        H = hessian(model, psi)
        if H is None:
            break
        H_last, psi_H = H, psi.copy()
        Hf = H[np.ix_(free, free)]
        try:
            step = np.linalg.solve(Hf, -gf)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or gf @ step <= 0:
            break   # (the second: not an ascent direction, the Hessian is indefinite here)
        found = damped_step(psi, free, step, lo_all, ll, lambda c: (*model.evaluate(c), c))
        accepted = found is not None
        if accepted:
            psi, ll, g = found
        steps += 1
        if not accepted:
            break
    return psi, ll, g, steps, H_last, psi_H


def _tau_state(model, psi, g):
    tau = model.psi_to_tau(psi)
    gt = model.grad_tau(tau, g)
    lo_t = np.array([-np.inf if b[0] is None else b[0] for b in model.tau_bounds()])
    return tau, gt, lo_t


def _judge(model, psi, ll, g, res, N):
    """(max |gradient|, converged), judged in tau, where the bounds live: a
    covariance block at its boundary (a Cholesky diagonal at 0, e.g. a singular
    random-slope block) has a nonzero psi gradient at the optimum but a zero
    projected tau gradient."""
    if ll is None or g is None:
        return np.inf, False
    tau, gt, lo_t = _tau_state(model, psi, g)
    at_t = np.isfinite(lo_t) & (tau - lo_t <= 1e-7 * np.maximum(np.abs(tau), 1.0))
    lo_side = at_t & (gt > 1e-6 * max(1.0, N ** 0.5))
    # a (co)variance far above its unit (tau >> 1) is judged by its relative gradient
    # tau dl/dtau (the derivative in log scale): the log-likelihood flattens as a
    # variance grows, so a start 1e10 units off (outcomes in units a million apart)
    # had a tiny gradient there and was once called converged
    n0 = len(getattr(model, "free_plain", ()))
    rel = np.zeros(len(tau), dtype=bool)
    rel[n0:] = True
    if n0:
        rel[:n0] = [model.table.params[i].kind in ("var", "resid", "cov", "rcov")
                    for i in model.free_plain]
    gt = np.where(rel, gt * np.maximum(np.abs(tau), 1.0), gt)
    gnorm = float(np.max(np.abs(gt[~at_t]), initial=0.0))
    tol = 1e-3 * max(1.0, N ** 0.5)
    converged = bool(gnorm < tol and not lo_side.any()
                     and (res.success or gnorm < 1e-6 * max(1.0, N ** 0.5)))
    return gnorm, converged


def _snap_to_bounds(model, psi, g, gain=1e-3):
    """tau with the bounded entries that sit a hair inside their bound, with
    the log-likelihood gradient pointing at it (beyond rounding), set on the
    bound: those whose first-order change in log-likelihood to get there is
    below ``gain`` (a Cholesky diagonal 1e-4 above 0 of a singular block).
    Residual variances are never put at 0 (an inadmissible Theta).  None if
    there is no such entry."""
    tau, gt, lo_t = _tau_state(model, psi, g)
    kinds = np.array(["plain"] * len(tau), dtype=object)
    n0 = len(model.free_plain)
    kinds[:n0] = [model.table.params[i].kind for i in model.free_plain]
    bounded = np.isfinite(lo_t) & (tau > lo_t) & (kinds != "resid")
    N = max(model.prep.nobs, 1)
    pushing = gt < -1e-6 * max(1.0, N ** 0.5)     # beyond the strict convergence rule of _judge
    snap = bounded & pushing & ((tau - lo_t) * np.abs(gt) <= gain)
    if not snap.any():
        return None
    out = tau.copy()
    out[snap] = lo_t[snap]
    return out


# the last Newton Hessian is reused as the information when the final Newton
# step moved no parameter by more than this (relative to max(|psi|, 0.1)): the
# Hessian then differs by O(1e-6) relative, far inside the 1e-3 tolerance of
# standard errors, and 2 * nparams gradient evaluations are saved.
REUSE_HESSIAN_STEP = 1e-6


def information(model, psi, opt: OptSummary | None = None) -> np.ndarray | None:
    """Observed information -d2l/dpsi2 at psi (from ``opt``'s last Newton
    Hessian when that was computed at, or within a negligible step of, psi)."""
    if opt is not None and opt.hessian is not None and opt.hessian_at is not None:
        scale = np.maximum(np.abs(psi), 0.1 * param_scale(model))
        if np.max(np.abs(psi - opt.hessian_at) / scale) <= REUSE_HESSIAN_STEP:
            return -opt.hessian
    with _serial_blas():
        H = hessian(model, psi)
    return None if H is None else -H


SINGULAR_RCOND = 1e-10


def vcov_from_information(info, groups=None):
    """Inverse of the information; with ``groups`` (a list of index arrays) the
    inverse of each diagonal block alone (the mixed-model convention: cross
    terms dropped, i.e. zero covariance between the blocks).  Returns the
    covariance matrix."""
    n = info.shape[0]
    V = np.zeros((n, n))
    blocks = groups if groups is not None else [np.arange(n)]
    for idx in blocks:
        if len(idx) == 0:
            continue
        B = info[np.ix_(idx, idx)]
        # scaled to unit diagonal first: the condition of the raw block mixes the
        # parameters' units (an outcome in milliseconds beside one in proportions:
        # curvatures 1e-5 and 5e8 in one block looked singular, and the
        # pseudo-inverse then gave standard errors 1e4 too small)
        d = np.sqrt(np.abs(np.diag(B))) if np.all(np.isfinite(B)) else None
        if d is not None:
            d[d == 0] = 1.0
            S = B / np.outer(d, d)
            lam = np.abs(np.linalg.eigvalsh(0.5 * (S + S.T)))
        else:
            d, S, lam = np.ones(len(idx)), B, None
        if lam is not None and lam.size and lam.min() <= SINGULAR_RCOND * lam.max():
            # numerically singular (a model that is not identified): inv() of it
            # is rounding noise that reaches the identified parameters' variances
            # too (0.4% on hetero_corr12's slope); the pseudo-inverse gives those
            # their value (estimable functions do not depend on the g-inverse)
            Vi = np.linalg.pinv(S, rcond=SINGULAR_RCOND, hermitian=True)
        else:
            try:
                Vi = np.linalg.inv(S)
            except np.linalg.LinAlgError:
                Vi = np.linalg.pinv(S)
        Vi = Vi / np.outer(d, d)
        V[np.ix_(idx, idx)] = Vi
    return V


def identification(info, names, tol=1e-8):
    """(identified, confounded names) from the rank of the information matrix,
    scaled to unit diagonal; the confounded parameters are those that load on
    its null space."""
    d = np.sqrt(np.abs(np.diag(info)))
    d[d == 0] = 1.0
    S = info / np.outer(d, d)
    if not np.all(np.isfinite(S)):
        return False, list(names)
    lam, Q = np.linalg.eigh(S)
    null = lam < tol * max(lam.max(), 1.0)
    if not null.any():
        return True, []
    load = np.abs(Q[:, null]).max(axis=1)
    return False, [n for n, v in zip(names, load) if v > 0.05]
