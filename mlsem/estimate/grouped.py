"""Estimation driver of ``fit`` (issue 14): the grouped data and Newton's
method where they apply, the L-BFGS-B driver of :mod:`mlsem.estimate.optimize`
otherwise and as the fallback.

The grouped data (:class:`mlsem.model.reduced.ReducedModel`: one
pseudo-observation per group of observations that share their latents and
residual variance, a school's pupils) have the same log-likelihood, gradient and
exact Hessian block as the full data (to rounding), at about a third of the cost
per evaluation on the nested designs.  Newton's method
(:mod:`mlsem.estimate.newton`) runs on them where it applies.  An L-BFGS-B run
on the grouped data that does not converge is repeated on the full data from
the same start, and the better of the two is kept (never silently worse).  The
observed information is the Hessian at the estimate, from the grouped data.
The record says what was used: ``opt.path`` ("grouped" or "full", with
``opt.grouped_reason``) and ``opt.method`` ("newton" or "lbfgsb", with
``opt.newton_reason``).
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import ConvergenceWarning
from ..model.reduced import reduce_model
from ..model.ri2 import build_exact, why_not_exact
from ..model.unst import build_unst, why_not_unst
from .newton import newton, why_not_newton
from .newton_exact import newton_exact
from .optimize import REUSE_HESSIAN_STEP, _serial_blas, hessian, optimize, param_scale, start_values


def optimize_auto(model, start=None, maxiter=5000, progress=None):
    """Estimates of ``model``: on the grouped data where that applies
    (``opt.path`` "grouped", else "full" with ``opt.grouped_reason``), by Newton's
    method where that applies (``opt.method`` "newton", see
    :mod:`mlsem.estimate.newton`; else "lbfgsb" with ``opt.newton_reason``), by
    :func:`mlsem.estimate.optimize.optimize` otherwise or when Newton does not
    converge.  ``opt.evaluations`` counts every evaluation, of either data."""
    psi0 = start_values(model) if start is None else np.asarray(start, dtype=float)
    n_full = model.nevals
    opt = None
    psi_lb = psi0
    ex = None
    evals = 0
    why_exact = why_not_exact(model)
    builder = build_exact
    if why_exact is not None and why_not_unst(model) is None:
        # covariances of random intercepts: mlsem.model.unst
        why_exact, builder = None, build_unst
    if why_exact is None:
        # grouped random intercepts: the whole exact Hessian from one pass per
        # iteration (mlsem.model.ri2, mlsem.model.unst); the units need not be
        # sorted by pattern
        red, why = reduce_model(model, patterns=False)
        ex, why_exact = builder(red) if red is not None else (None, why)
        if ex is not None:
            handover = []
            first = psi0
            if start is None and hasattr(ex, "moment_start"):
                first = ex.moment_start(psi0)   # covariance blocks: a start from moments
            opt = newton_exact(ex, first, progress, handover)
            evals = red.nevals
            if isinstance(opt, str):
                why_exact = f"Newton (exact Hessian) stopped ({opt})"
                if handover and builder is build_exact:
                    psi_lb = handover[0]
                # (covariance blocks: L-BFGS-B from the start, the path without
                # mlsem.model.unst; from Newton's last point near a singular block it
                # can stop on a lower point)
                opt = None
    if opt is None:
        red, why = reduce_model(model)
    target = model if red is None else red
    n_red = red.nevals if red is not None else 0
    why_newton = why_not_newton(target) if model.backend == "cython" else f"backend {model.backend!r}"
    if opt is not None:
        why_newton = None
    elif why_newton is not None and ex is not None:
        why_newton = f"{why_exact}; {why_newton}"
    if opt is None and why_newton is None:
        handover = []
        opt = newton(target, psi0, progress, handover)
        if isinstance(opt, str):
            if handover:
                # an optimum on a bound: L-BFGS-B from Newton's last point (higher
                # than the start), where its bounds do the rest
                psi_lb = handover[0]
                why_newton = f"Newton stopped ({opt}); L-BFGS-B from its last point"
            else:
                why_newton = f"Newton stopped ({opt}); L-BFGS-B from the start"
            opt = None
    if opt is None:
        if red is None:
            opt = optimize(model, start=psi_lb, maxiter=maxiter, progress=progress)
        else:
            opt = _lbfgsb_grouped(model, red, psi_lb, maxiter, progress)
            if opt.path == "full":
                why = opt.grouped_reason
    opt.path = getattr(opt, "path", "full" if red is None else "grouped")
    if opt.converged and opt.path == "grouped":
        _information_at(opt, red, model)
    opt.grouped_reason = why if opt.path == "full" else None
    opt.method = "newton" if why_newton is None else "lbfgsb"
    opt.newton_reason = why_newton
    opt.exact_hessian_reason = why_exact   # None: Newton with the whole exact Hessian (ri2, unst)
    opt.evaluations = evals + (red.nevals - n_red if red is not None else 0) + model.nevals - n_full
    return opt


def _information_at(opt, red, model):
    """The final Hessian (the observed information) from the grouped data, at the
    estimate, unless the last Newton step's is there already."""
    psi = opt.final
    if opt.hessian is not None and opt.hessian_at is not None:
        scale = np.maximum(np.abs(psi), 0.1 * param_scale(model))
        if np.max(np.abs(psi - opt.hessian_at) / scale) <= REUSE_HESSIAN_STEP:
            return
    with _serial_blas():
        H = hessian(red, psi)
    if H is not None:
        opt.hessian, opt.hessian_at = H, psi.copy()


def _lbfgsb_grouped(model, red, psi0, maxiter, progress):
    """L-BFGS-B on the grouped data; if that does not converge, on the full data
    from the same start, the better run kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = optimize(red, start=psi0, maxiter=maxiter, progress=progress)
    opt.path, opt.grouped_reason = "grouped", None
    if opt.converged:
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return opt
    full = optimize(model, start=psi0, maxiter=maxiter, progress=progress)
    if full.converged or not (opt.loglik >= full.loglik):
        full.path = "full"
        full.grouped_reason = "the run on the grouped data did not converge"
        return full
    for w in caught:   # neither converged: the grouped run's warning stands
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return opt
