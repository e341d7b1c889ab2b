"""Estimation on the grouped data (issue 14): the optimiser of
:mod:`mlsem.estimate.optimize` run on :class:`mlsem.model.reduced.ReducedModel`,
one pseudo-observation per group of observations that share their latents and
residual variance (a school's pupils), where the model allows it; the full
data's optimiser otherwise.

The reduced model has the same log-likelihood, gradient and exact Hessian block
as the full one (to rounding), so the same optimiser takes the same path; each
evaluation reads about a tenth of the data on the nested designs.  A run on the
grouped data that does not converge is repeated on the full data from the same
start, and the better of the two is kept (the grouping is never silently worse).
The final Hessian (the observed information) is computed on the grouped data
too, at the estimate.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import ConvergenceWarning
from ..model.reduced import reduce_model
from .optimize import REUSE_HESSIAN_STEP, _serial_blas, hessian, optimize, param_scale, start_values


def optimize_auto(model, start=None, maxiter=5000, progress=None):
    """:func:`mlsem.estimate.optimize.optimize` on the grouped data where that
    applies (``opt.path`` "grouped"), on ``model`` otherwise (``opt.path``
    "full" and ``opt.grouped_reason`` why).  ``opt.evaluations`` counts every
    evaluation, of either data."""
    red, why = reduce_model(model)
    if red is None:
        opt = optimize(model, start=start, maxiter=maxiter, progress=progress)
        opt.path, opt.grouped_reason = "full", why
        return opt
    psi0 = start_values(model) if start is None else np.asarray(start, dtype=float)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = optimize(red, start=psi0, maxiter=maxiter, progress=progress)
    opt.path, opt.grouped_reason = "grouped", None
    if not opt.converged:
        # the full data's optimiser from the same start; the better run is kept
        n0 = model.nevals
        full = optimize(model, start=psi0, maxiter=maxiter, progress=progress)
        spent = red.nevals + model.nevals - n0
        if full.converged or not (opt.loglik >= full.loglik):
            full.evaluations = spent
            full.path = "full"
            full.grouped_reason = "the run on the grouped data did not converge"
            return full
        opt.evaluations = spent
        for w in caught:   # neither converged: the grouped run's warning stands
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return opt
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    psi = opt.final
    reuse = False
    if opt.hessian is not None and opt.hessian_at is not None:
        scale = np.maximum(np.abs(psi), 0.1 * param_scale(model))
        reuse = np.max(np.abs(psi - opt.hessian_at) / scale) <= REUSE_HESSIAN_STEP
    if not reuse:
        # the information at the estimate, from the grouped data (same Hessian)
        with _serial_blas():
            H = hessian(red, psi)
        if H is not None:
            opt.hessian, opt.hessian_at = H, psi.copy()
    opt.evaluations = red.nevals
    return opt
