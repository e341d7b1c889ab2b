"""Profile-likelihood confidence intervals (results layer), as lme4's
``confint(method = "profile")``: on an ML fit, or on a REML fit refitted by
ML first (lme4 does the same: its devfun2 calls refitML), with a note.

For a parameter h(psi) (a fixed effect, a variance, a covariance, or the
correlation of two random effects of one block), the profile log-likelihood
is l_p(x) = max { l(psi) : h(psi) = x }, found by refitting with h held at x
(SLSQP on the optimiser's variables, the equality constraint h(tau) = x with
its analytic gradient; warm-started from the neighbouring point).  The
interval is {x : 2 (l_hat - l_p(x)) <= chi2_1(level)}, its ends found by
bracketing outward from the Wald interval and Brent's method.  Intervals are
invariant to monotone reparameterisation: a variance's interval is lme4's
interval of the standard deviation, squared.  Where a variance's profile does
not cross the cut-off before the boundary, the lower end is 0 (lme4 reports
0 for the standard deviation there); a correlation's ends stop at -1 and 1.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
from scipy import optimize, stats

from ..errors import MlsemError


class _Target:
    """h(psi) and dh/dpsi for one parameter or correlation."""

    def __init__(self, name, kind, idx, lower=-math.inf, upper=math.inf):
        self.name, self.kind, self.idx = name, kind, idx
        self.lower, self.upper = lower, upper

    def value(self, psi):
        if self.kind == "cor":
            c, a, b = self.idx
            return psi[c] / math.sqrt(psi[a] * psi[b]) if psi[a] > 0 and psi[b] > 0 else 0.0
        return psi[self.idx]

    def grad(self, psi):
        g = np.zeros(len(psi))
        if self.kind == "cor":
            c, a, b = self.idx
            s = math.sqrt(max(psi[a] * psi[b], 1e-300))
            g[c] = 1.0 / s
            g[a] = -0.5 * psi[c] / (s * psi[a])
            g[b] = -0.5 * psi[c] / (s * psi[b])
        else:
            g[self.idx] = 1.0
        return g


def _targets(res):
    t = res.model.table
    out = []
    for i, p in enumerate(t.params):
        lo = p.lower if np.isfinite(p.lower) else -math.inf
        out.append(_Target(p.name, p.kind, i, lower=lo))
    # correlations of the random effects of one covariance block
    for blk in t.chol_blocks:
        pidx = blk.pidx
        b = pidx.shape[0]
        for i in range(b):
            for j in range(i):
                c, a, d = int(pidx[i, j]), int(pidx[j, j]), int(pidx[i, i])
                if c < 0 or a < 0 or d < 0:
                    continue
                name = t.params[c].name
                name = "cor" + name[3:] if name.startswith("cov") else f"cor({name})"
                out.append(_Target(name, "cor", (c, a, d), lower=-1.0, upper=1.0))
    return out


class Profiler:
    def __init__(self, res):
        if res.method != "ML":
            raise MlsemError("confint(method='profile') needs an ML fit (method='ml'), as lme4's "
                             "profile of the deviance")
        if res.sem_rows is not None:
            raise MlsemError("confint(method='profile') is available for multilevel fits (mlsem.fit)")
        m = res.model
        if np.any(m.prep.wrow != 1.0):
            raise MlsemError("confint(method='profile'): not with sampling weights (the "
                             "pseudo-likelihood has no likelihood-ratio calibration)")
        if not res.converged:
            raise MlsemError("confint(method='profile'): the fit did not converge")
        self.res, self.m = res, m
        self.N = max(m.prep.nobs, 1)
        self.psi_hat = res.estimate.copy()
        self.ll_hat = float(res.loglik)
        self.bounds = m.tau_bounds()
        self.nfits = 0
        self.failed = []

    def _f(self, tau):
        psi = self.m.tau_to_psi(tau)
        ll, g = self.m._evaluate(psi, True)   # inside interval()'s one-BLAS-thread block
        if ll is None or not np.isfinite(ll):
            return 1e10, np.zeros_like(tau)
        return -ll / self.N, -self.m.grad_tau(tau, g) / self.N

    def _unit(self, target) -> float:
        """The target's unit (a correlation: 1): tolerances on x are relative to it, so
        that an outcome in small units (variances ~1e-10) is profiled as finely as in
        large ones (an absolute 1e-10 stopped the bracket at once: intervals off by 1%)."""
        if target.kind == "cor":
            return 1.0
        return max(float(self.m._scale()[target.idx]), 1e-300)

    def _plain(self, target):
        """Position of the target in tau when it is a plain coordinate there."""
        if target.kind == "cor":
            return None
        w = np.flatnonzero(self.m.free_plain == target.idx)
        return int(w[0]) if len(w) else None

    def profile(self, target, x, tau0):
        """(l_p(x), tau at the maximum)."""
        m = self.m
        self.nfits += 1
        k = self._plain(target)
        if k is not None:
            # a plain coordinate: held by equal bounds, L-BFGS-B on the rest (tau is
            # psi in the parameter's unit, see Model.psi_to_tau)
            xt = x / m._scale()[target.idx]
            b = list(self.bounds)
            b[k] = (xt, xt)
            t0 = np.array(tau0, dtype=float)
            t0[k] = xt
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = optimize.minimize(self._f, t0, jac=True, method="L-BFGS-B", bounds=b,
                                      options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-9,
                                               "maxcor": 20})
            if r.fun >= 1e9:
                self.failed.append((target.name, x))
                return None, tau0
            ll, _ = m._evaluate(m.tau_to_psi(r.x), False)
            return (None if ll is None else float(ll)), r.x

        def con(tau):
            return np.array([target.value(m.tau_to_psi(tau)) - x])

        def jac(tau):
            psi = m.tau_to_psi(tau)
            return m.grad_tau(tau, target.grad(psi))[None, :]

        best = None
        for start in (tau0, m.psi_to_tau(self._feasible(target, x))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = optimize.minimize(self._f, start, jac=True, method="SLSQP", bounds=self.bounds,
                                      constraints=[{"type": "eq", "fun": con, "jac": jac}],
                                      options={"maxiter": 500, "ftol": 1e-12})
            ok = abs(con(r.x)[0]) <= 1e-7 * max(self._unit(target), abs(x)) and r.fun < 1e9
            if ok:
                ll = -r.fun * self.N
                if best is None or ll > best[0]:
                    best = (ll, r.x)
                if r.success:
                    break
        if best is None:
            self.failed.append((target.name, x))
            return None, tau0
        ll, _ = m._evaluate(m.tau_to_psi(best[1]), False)
        return (None if ll is None else float(ll)), best[1]

    def _feasible(self, target, x):
        """psi_hat moved onto h = x (a start for the constrained fit)."""
        psi = self.psi_hat.copy()
        if target.kind == "cor":
            c, a, b = target.idx
            psi[c] = x * math.sqrt(psi[a] * psi[b])
        else:
            psi[target.idx] = x
            if target.kind == "cov":
                # keep the block positive definite: shrink the covariance's correlation
                for blk in self.m.table.chol_blocks:
                    pidx = blk.pidx
                    w = np.argwhere(pidx == target.idx)
                    if len(w):
                        i, j = w[0]
                        a, b = pidx[i, i], pidx[j, j]
                        need = abs(x) / 0.99
                        if psi[a] * psi[b] < need * need:
                            f = need / math.sqrt(max(psi[a] * psi[b], 1e-300))
                            psi[a] *= f
                            psi[b] *= f
        return psi

    def dev(self, target, x, tau0):
        ll, tau = self.profile(target, x, tau0)
        if ll is None:
            return None, tau
        return 2.0 * (self.ll_hat - ll), tau

    def interval(self, target, crit, se):
        with self.m._one_blas_thread():
            return [self._side(target, crit, se, side) for side in (-1.0, 1.0)]

    def _side(self, target, crit, se, side):
        """One end: secant steps on the signed root zeta(x) = sqrt(2 (l_hat -
        l_p(x))), nearly linear in x, towards sqrt(crit); Brent's method on a
        bracket when the secant does not settle."""
        est = target.value(self.psi_hat)
        bound = target.lower if side < 0 else target.upper
        z = math.sqrt(crit)
        if target.kind == "cor" and np.isfinite(bound):
            bound = bound - side * 1e-9
        step = se if (np.isfinite(se) and se > 0) else max(abs(est), self._unit(target)) * 0.5
        pts = [(est, 0.0, self.m.psi_to_tau(self.psi_hat))]    # (x, zeta, tau)
        x = est + side * z * step
        inside = pts[0]
        outside = None
        for _ in range(40):
            if np.isfinite(bound) and (x - bound) * side >= 0:
                x = bound
            d, tau = self.dev(target, x, inside[2])
            if d is None:
                return float("nan")
            zeta = math.sqrt(max(d, 0.0))
            if abs(zeta - z) < 1e-7:
                return float(x)
            if zeta < z:
                inside = (x, zeta, tau)
                if np.isfinite(bound) and x == bound:
                    return float(0.0 if target.kind in ("var", "resid") and bound == 0.0 else x)
            else:
                outside = (x, zeta, tau)
            pts.append((x, zeta, tau))
            (x0, z0, _), (x1, z1, _) = pts[-2], pts[-1]
            if z1 != z0:
                xn = x1 + (z - z1) * (x1 - x0) / (z1 - z0)
            else:
                xn = x1 + side * abs(x1 - est)
            if outside is not None:
                lo, hi = sorted((inside[0], outside[0]))
                if not (lo < xn < hi):
                    xn = 0.5 * (inside[0] + outside[0])
                if abs(outside[0] - inside[0]) <= 1e-10 * max(self._unit(target), abs(est)):
                    return float(inside[0] + (outside[0] - inside[0]) * (z - inside[1])
                                 / (outside[1] - inside[1]))
            elif (xn - x1) * side <= 0 or abs(xn - est) > 4 * abs(x1 - est):
                xn = est + side * 2.0 * abs(x1 - est)
            x = xn
        return float("nan")


def _refit_ml(res):
    """The ML fit of a REML fit's model (warm-started at the REML estimates),
    as lme4's profile of a REML fit (devfun2 calls refitML)."""
    import copy

    from ..estimate.optimize import information, optimize, vcov_from_information
    if res.sem_rows is not None or res.model is None:
        raise MlsemError("confint(method='profile') is available for multilevel fits (mlsem.fit)")
    m = res.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(m, start=res.estimate)
    if not opt.converged:
        raise MlsemError("confint(method='profile'): the ML refit of the REML fit did not converge")
    info = information(m, opt.final, opt)
    if info is None:
        raise MlsemError("confint(method='profile'): no observed information at the ML refit")
    fit = copy.copy(res)
    fit.method, fit.estimate, fit.loglik = "ML", opt.final.copy(), float(opt.loglik)
    fit.converged, fit.info, fit.cov = True, info, vcov_from_information(info)
    fit.notes = []
    return fit


def profile_confint(res, level=0.95, parm=None) -> pl.DataFrame:
    """Profile intervals of every parameter (and correlations of random
    effects of one block): a Polars frame name, lower, upper."""
    if not (0.0 < level < 1.0):
        raise MlsemError(f"confint: level={level!r} must be between 0 and 1")
    if getattr(res, "survey", None) is not None:
        raise MlsemError("confint(method='profile'): a survey fit maximises a pseudo-likelihood, "
                         "whose profile does not give valid intervals under the design; use the "
                         "Wald intervals (design-based standard errors, t on the design df)")
    fit = res
    if res.method == "REML":
        fit = _refit_ml(res)
    pr = Profiler(fit)
    crit = float(stats.chi2.ppf(level, 1))
    targets = _targets(res)
    if parm is not None:
        names = [parm] if isinstance(parm, str) else list(parm)
        unknown = [n for n in names if n not in [t.name for t in targets]]
        if unknown:
            raise MlsemError(f"confint: unknown parameter(s) {unknown} (parameters: "
                             f"{', '.join(t.name for t in targets)})")
        targets = [t for t in targets if t.name in names]
    se = fit.std_err
    rows = []
    for t in targets:
        s = se[t.idx] if t.kind != "cor" else float("nan")
        if t.kind == "cor":
            s = 0.25
        lo, hi = pr.interval(t, crit, s)
        rows.append((t.name, lo, hi))
    if fit is not res:
        note = ("profile: the REML fit was refitted by ML first (as lme4's confint(profile)); "
                "the intervals are those of the ML fit (log-likelihood "
                f"{fit.loglik:.6f})")
        res.notes[:] = [x for x in res.notes if not x.startswith("profile: the REML fit")]
        res.notes.append(note)
    if pr.failed:
        res.notes.append(f"profile: {len(pr.failed)} constrained refit(s) failed "
                         f"({', '.join(sorted({n for n, _ in pr.failed}))}); their points were skipped")
    return pl.DataFrame(rows, schema={"name": pl.String, "lower": pl.Float64, "upper": pl.Float64},
                        orient="row")
