"""Likelihood-ratio test between two nested fits (results layer: reads fitted
state only).

``lrtest(restricted, relaxed)``: chi2 = 2 (l_relaxed - l_restricted) on
df = the difference in the number of free parameters.  Where the restriction
puts a variance on its boundary (a new random effect, e.g. a random slope,
whose variance is 0 under the null), the chi2(df) reference distribution is
conservative: the statistic follows a mixture (chi-bar-square, Self & Liang
1987); for one variance tested at 0, together with the df - 1 other new
parameters, 1/2 chi2(df - 1) + 1/2 chi2(df), which is reported beside it.
Splitting a variance by slot (var(j) -> var(j[1]), var(j[2])) restricts
interior values (equality), not a boundary: plain chi2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from scipy import stats

from ..errors import MlsemError


@dataclass(frozen=True)
class LRTest:
    chi2: float
    df: int
    p_value: float
    boundary: bool                 # a variance is tested against 0
    p_value_boundary: float        # chi-bar-square mixture p-value (nan unless boundary)
    loglik_restricted: float
    loglik_relaxed: float
    new_params: tuple
    p_value_bootstrap: float = float("nan")   # parametric bootstrap (bootstrap=n), else nan
    bootstrap: dict = None                    # n, failed, seed, draws of the LR statistic

    @property
    def note(self) -> str:
        if not self.boundary:
            return ""
        return ("a variance is tested on the boundary of its parameter space (0): the "
                f"chi2({self.df}) p-value is conservative; the chi-bar-square mixture "
                f"1/2 chi2({self.df - 1}) + 1/2 chi2({self.df}) gives p = {self.p_value_boundary:.4g}")

    def __str__(self) -> str:
        s = (f"LR test: chi2({self.df}) = {self.chi2:.4f}   Prob > chi2 = {self.p_value:.4g}\n"
             f"  loglik restricted = {self.loglik_restricted:.5f}, relaxed = {self.loglik_relaxed:.5f}")
        if self.new_params:
            s += "\n  freed: " + ", ".join(self.new_params)
        if self.boundary:
            s += "\n  Note: " + self.note
        if self.bootstrap is not None:
            b = self.bootstrap
            s += (f"\n  Parametric bootstrap ({b['n']} simulations from the restricted fit"
                  + (f", {b['failed']} failed refits left out" if b["failed"] else "")
                  + f"): p = {self.p_value_bootstrap:.4g}")
        return s

    def to_dict(self) -> dict:
        return {"chi2": self.chi2, "df": self.df, "p_value": self.p_value,
                "boundary": self.boundary, "p_value_boundary": self.p_value_boundary,
                "loglik_restricted": self.loglik_restricted, "loglik_relaxed": self.loglik_relaxed,
                "note": self.note, "p_value_bootstrap": self.p_value_bootstrap,
                "bootstrap": None if self.bootstrap is None else {
                    k: v for k, v in self.bootstrap.items() if k not in ("draws", "converged")}}


_VAR = re.compile(r"^var\(([^\[\]:()]+)(?:\[[^\]]*\])?(?::([^()]+))?\)$")


def _variance_key(name):
    """var(j) / var(j[2]) / var(j[north]) -> (j, Intercept); var(k:x) -> (k, x)."""
    m = _VAR.match(name)
    if not m:
        return None
    return m.group(1), m.group(2) or "Intercept"


def lrtest(restricted, relaxed, tol: float = 1e-6, *, bootstrap: int | None = None,
           seed=None, parallel=None, progress: bool = True) -> LRTest:
    """LR test of ``restricted`` against ``relaxed`` (either order: the fit with
    fewer parameters is the restricted one).  Both must be fits of the same
    outcome on the same observations.  ``bootstrap=n``: also the parametric
    bootstrap p-value (n data sets simulated from the restricted fit, both
    models refitted; mlsem.inference.bootstrap.lr_bootstrap), reproducible with ``seed``."""
    for r in (restricted, relaxed):
        if getattr(r, "survey", None) is not None:
            raise MlsemError("lrtest: a fit with survey= maximises a pseudo-likelihood, whose ratio "
                             "does not follow a chi-squared distribution under the design; test "
                             "restrictions with res.wald(...) (design-based covariance) instead")
        if r.method == "ADF":
            raise MlsemError("lrtest: an ADF (GMM) fit has no likelihood; compare ADF fits by the "
                             "difference of their fit_test() chi-squares, or fit both by ML")
    if restricted.nparams > relaxed.nparams:
        restricted, relaxed = relaxed, restricted
    df = relaxed.nparams - restricted.nparams
    # several outcomes ("y1, y2"): the same outcomes in any order
    if (sorted(restricted.outcome.split(", ")) != sorted(relaxed.outcome.split(", "))
            or restricted.nobs != relaxed.nobs):
        raise MlsemError(
            f"lrtest: the fits are not nested: outcome {restricted.outcome!r} on {restricted.nobs} "
            f"observations vs {relaxed.outcome!r} on {relaxed.nobs}")
    if df == 0:
        raise MlsemError("lrtest: the two fits have the same number of parameters: they are not nested")
    fixed = [[n for n, k in zip(r.names, r.kinds) if k == "fixed"] for r in (restricted, relaxed)]
    if "REML" in (restricted.method, relaxed.method) and fixed[0] != fixed[1]:
        raise MlsemError(
            "lrtest: REML fits with different fixed effects cannot be compared (the REML likelihood "
            f"depends on the fixed-effect design: {', '.join(fixed[0]) or 'none'} vs "
            f"{', '.join(fixed[1]) or 'none'}); fit both with method='ml' to test fixed effects, as "
            "lme4's anova() refits them by ML")
    for r in (restricted, relaxed):
        if not r.converged:
            raise MlsemError(f"lrtest: the fit {r.formula!r} did not converge")
    d = relaxed.loglik - restricted.loglik
    if d < -tol * max(1.0, abs(relaxed.loglik)):
        raise MlsemError(
            f"lrtest: the model with more parameters fits worse (loglik {relaxed.loglik:.6f} < "
            f"{restricted.loglik:.6f}): the fits are not nested")
    chi2 = max(0.0, 2.0 * d)
    p = float(stats.chi2.sf(chi2, df))
    renamed = {f"var({n[4:-1]}:Intercept)" for n in restricted.names if n.startswith("var(") and ":" not in n}
    new = tuple(n for n in relaxed.names if n not in restricted.names and n not in renamed)
    # boundary: the relaxed fit has a variance for an effect the restricted fit has no variance for
    have = {_variance_key(n) for n, k in zip(restricted.names, restricted.kinds) if k == "var"}
    have |= {(lv, "Intercept") for lv, e in have if e == "Intercept"}
    have |= {(lv[0], "Intercept") for lv in list(have)}  # var(k) covers var(k:Intercept)
    boundary = any(k == "var" and _variance_key(n) is not None and _variance_key(n) not in have
                   for n, k in zip(relaxed.names, relaxed.kinds) if n in new)
    pb = float("nan")
    if boundary:
        pb = 0.5 * float(stats.chi2.sf(chi2, df)) + (
            0.5 * float(stats.chi2.sf(chi2, df - 1)) if df > 1 else (0.5 if chi2 <= 0 else 0.0))
    pboot, boot = float("nan"), None
    if bootstrap is not None:
        if any(getattr(getattr(r.model, "table", None), "nout", 1) > 1 for r in (restricted, relaxed)):
            raise MlsemError("lrtest(bootstrap=): not available for fits of several outcomes yet; "
                             "the chi2 p-value is")
        from .bootstrap import lr_bootstrap
        boot = lr_bootstrap(restricted, relaxed, chi2, bootstrap, seed=seed, parallel=parallel,
                            progress=progress)
        pboot = boot["p_value"]
    return LRTest(chi2=chi2, df=df, p_value=p, boundary=boundary, p_value_boundary=pb,
                  loglik_restricted=restricted.loglik, loglik_relaxed=relaxed.loglik, new_params=new,
                  p_value_bootstrap=pboot, bootstrap=boot)
