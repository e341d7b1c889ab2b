"""Results: labelled tables, tests and export.  Reads fitted state only."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import stats

from . import __version__

Z975 = 1.959963984540054


def _chi2_sf(x, df):
    return float(stats.chi2.sf(x, df)) if df > 0 else float("nan")


def atomic_write(path, write):
    """Write through a temporary file in the same directory, then rename:
    a failure leaves neither a partial file nor a clobbered earlier one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mlsem-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class FitResult:
    """A fitted model.  ``params`` is a Polars table (name, estimate, std_err,
    z, p_value, ci_low, ci_high); ``vcov`` the labelled covariance matrix of
    the estimates under the convention ``vce``."""
    formula: str
    names: list
    kinds: list
    estimate: np.ndarray
    cov: np.ndarray
    loglik: float
    converged: bool
    nobs: int
    vce: str
    levels: list
    opt: object
    outcome: str
    identified: bool = True
    confounded: list = field(default_factory=list)
    lr_ols: dict = field(default_factory=dict)
    dropped_covariate: int = 0
    missing_outcome: int = 0
    method: str = "ML"
    npatterns: int = 0
    nslots: int = 0
    timings: dict = field(default_factory=dict)
    spec: object = None
    model: object = field(default=None, repr=False)
    info: np.ndarray = field(default=None, repr=False)
    notes: list = field(default_factory=list)

    # ---- standard verbs ----------------------------------------------------
    @property
    def std_err(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    @property
    def params(self) -> pl.DataFrame:
        est, se = self.estimate, self.std_err
        rows = []
        for n, k, b, s in zip(self.names, self.kinds, est, se):
            if k in ("var", "resid"):
                z = p = float("nan")
                if b > 0 and np.isfinite(s) and s > 0:
                    f = math.exp(Z975 * s / b)
                    lo, hi = b / f, b * f
                else:
                    lo = hi = float("nan")
            else:
                z = b / s if s > 0 else float("nan")
                p = 2.0 * stats.norm.sf(abs(z)) if np.isfinite(z) else float("nan")
                lo, hi = b - Z975 * s, b + Z975 * s
            rows.append((n, float(b), float(s), float(z), float(p), float(lo), float(hi)))
        return pl.DataFrame(rows, schema={"name": pl.String, "estimate": pl.Float64,
                                          "std_err": pl.Float64, "z": pl.Float64,
                                          "p_value": pl.Float64, "ci_low": pl.Float64,
                                          "ci_high": pl.Float64}, orient="row")

    @property
    def coef(self) -> dict:
        return dict(zip(self.names, self.estimate.tolist()))

    @property
    def vcov(self) -> pl.DataFrame:
        return pl.DataFrame({"name": self.names,
                             **{n: self.cov[:, i] for i, n in enumerate(self.names)}})

    @property
    def nparams(self) -> int:
        return len(self.names)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.nparams

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + math.log(self.nobs) * self.nparams

    def wald_fixed(self) -> dict:
        """Joint Wald test that the fixed effects other than the intercept are 0."""
        idx = [i for i, (n, k) in enumerate(zip(self.names, self.kinds))
               if k == "fixed" and n != "Intercept"]
        if not idx:
            return {"chi2": float("nan"), "df": 0, "p_value": float("nan")}
        b = self.estimate[idx]
        V = self.cov[np.ix_(idx, idx)]
        try:
            chi2 = float(b @ np.linalg.solve(V, b))
        except np.linalg.LinAlgError:
            chi2 = float("nan")
        return {"chi2": chi2, "df": len(idx), "p_value": _chi2_sf(chi2, len(idx))}

    # ---- printing ----------------------------------------------------------
    def summary(self) -> str:
        out = []
        title = "Mixed-effects ML regression" if self.method == "ML" else "Mixed-effects REML regression"
        out.append(f"{title:<48}Number of obs     = {self.nobs:>10,}")
        if self.levels:
            out.append("")
            out.append("-" * 62)
            out.append(f"{'':>16}|     No. of       Observations per Group")
            out.append(f"{'Group Variable':>15} |     Groups    Minimum    Average    Maximum")
            out.append("-" * 16 + "+" + "-" * 45)
            for lv in self.levels:
                out.append(f"{lv.name:>15} | {lv.ngroups:>10,} {lv.min_obs:>10,} {lv.mean_obs:>10.1f} {lv.max_obs:>10,}")
            out.append("-" * 62)
        w = self.wald_fixed()
        out.append("")
        out.append(f"{'':<48}Wald chi2({w['df']}){'':<6}= {w['chi2']:>10.2f}")
        out.append(f"Log likelihood = {self.loglik:<31.5f}Prob > chi2       = {w['p_value']:>10.4f}")
        out.append("")
        conv = "observed information matrix (OIM)" if self.vce == "oim" else (
            "mixed-model convention: fixed effects (X'V^-1X)^-1, variance components from their own observed information"
            if self.vce == "mixed" else self.vce)
        out.append(f"Std. errors: {conv}")
        tab = self.params
        line = "-" * 78
        out.append(line)
        out.append(f"{self.outcome[:12]:>12} |      Coef.   Std. Err.      z    P>|z|     [95% Conf. Interval]")
        out.append("-" * 13 + "+" + "-" * 64)
        for r in tab.iter_rows(named=True):
            if r["name"] in [n for n, k in zip(self.names, self.kinds) if k == "fixed"]:
                out.append(f"{r['name'][:12]:>12} | {r['estimate']:>10.6g} {r['std_err']:>10.6g} {r['z']:>8.2f} {r['p_value']:>7.3f}   {r['ci_low']:>10.6g} {r['ci_high']:>10.6g}")
        out.append(line)
        out.append("")
        out.append(line)
        out.append(f"{'Random-effects Parameters':>28} |   Estimate   Std. Err.     [95% Conf. Interval]")
        out.append("-" * 29 + "+" + "-" * 48)
        fixed = {n for n, k in zip(self.names, self.kinds) if k == "fixed"}
        for r in tab.iter_rows(named=True):
            if r["name"] in fixed:
                continue
            est = "0 (boundary)" if r["estimate"] == 0.0 else f"{r['estimate']:.6g}"
            out.append(f"{r['name'][:28]:>28} | {est:>10} {r['std_err']:>10.6g}     {r['ci_low']:>10.6g} {r['ci_high']:>10.6g}")
        out.append(line)
        if self.lr_ols:
            lr = self.lr_ols
            kind = "chibar2(01)" if lr["df"] == 1 else f"chi2({lr['df']})"
            out.append(f"LR test vs. linear regression: {kind} = {lr['chi2']:.2f}   Prob > chi2 = {lr['p_value']:.4f}")
            if lr["df"] > 1:
                out.append("Note: LR test is conservative and provided only for reference.")
        if self.dropped_covariate:
            out.append(f"Note: {self.dropped_covariate} observation(s) dropped for a missing covariate.")
        if self.missing_outcome:
            out.append(f"Note: {self.missing_outcome} observation(s) with a missing outcome are missing cells (FIML).")
        if not self.converged:
            out.append(f"WARNING: the fit did NOT converge ({self.opt.message}); the estimates are not reliable.")
        if not self.identified:
            out.append("WARNING: the model is NOT identified: the information matrix is singular; "
                       f"confounded parameters: {', '.join(self.confounded)}.")
            out.append("         The data cannot tell these parameters apart: their estimates are one "
                       "of many equally good solutions and have no standard errors.")
        for n in self.notes:
            out.append(f"Note: {n}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<mlsem FitResult {self.formula!r}: loglik {self.loglik:.6f}, {self.nobs} obs, converged={self.converged}>"

    def __str__(self) -> str:
        return self.summary()

    # ---- export --------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "mlsem_version": __version__,
            "formula": self.formula,
            "method": self.method,
            "vce": self.vce,
            "loglik": self.loglik,
            "converged": self.converged,
            "identified": self.identified,
            "confounded": list(self.confounded),
            "nobs": self.nobs,
            "npatterns": self.npatterns,
            "nslots": self.nslots,
            "dropped_covariate": self.dropped_covariate,
            "missing_outcome": self.missing_outcome,
            "aic": self.aic,
            "bic": self.bic,
            "groups": [{"level": lv.name, "groups": lv.ngroups, "min_obs": lv.min_obs,
                        "mean_obs": lv.mean_obs, "max_obs": lv.max_obs} for lv in self.levels],
            "lr_test_vs_linear_regression": self.lr_ols,
            "wald_fixed": self.wald_fixed(),
            "optimizer": {"iterations": self.opt.iterations, "evaluations": self.opt.evaluations,
                          "newton_steps": self.opt.newton_steps,
                          "gradient_norm": self.opt.gradient_norm, "message": self.opt.message,
                          "seconds": self.opt.seconds},
            "timings": self.timings,
            "params": self.params.to_dicts(),
            "notes": list(self.notes),
        }

    def to_json(self, path) -> None:
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)
        atomic_write(path, write)

    def to_parquet(self, path) -> None:
        tab = self.params
        atomic_write(path, lambda tmp: tab.write_parquet(tmp))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


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
