"""Pieces of FitResult.summary(): the lavaan-like summary of a general SEM
(mlsem.sem), the intervals that override the Wald ones (small-sample, profile),
and the backend footer."""
from __future__ import annotations

import numpy as np
from scipy import stats

from .. import __version__


_SECTIONS = (("=~", "Latent Variables"), ("~", "Regressions"), ("cov", "Covariances"),
             ("~1", "Intercepts"), ("var", "Variances"))


def _design_df(res):
    """The design degrees of freedom of a survey fit (None otherwise, or < 1)."""
    sv = getattr(res, "survey", None)
    d = getattr(sv, "df", None) if sv is not None else None
    return float(d) if d is not None and d >= 1 else None


def _sem_summary(res) -> str:
    """lavaan's summary layout: header, then the parameter table by section."""
    if res.adf is not None:
        a = res.adf
        out = [f"mlsem {__version__}: structural equation model, ADF (GMM: distribution-free weighted least squares)",
               "",
               f"  {'Number of observations':<40}{res.nobs:>12,}",
               f"  {'Number of sample moments':<40}{a['nmom']:>12,}",
               f"  {'Number of free parameters':<40}{res.nparams:>12,}",
               f"  {'Minimum of the ADF objective (F_min)':<40}{a['fmin']:>12.6f}",
               f"  {'Test statistic (N - 1) F_min':<40}{a['chi2']:>12.3f}",
               f"  {'Degrees of freedom':<40}{a['df']:>12,}",
               f"  {'P-value (Chi-square)':<40}{a['p_value']:>12.3f}",
               ""]
    else:
        out = [f"mlsem {__version__}: structural equation model, ML (FIML over missing patterns)",
               "",
               f"  {'Number of observations':<40}{res.nobs:>12,}",
               f"  {'Number of missing patterns':<40}{res.npatterns:>12,}",
               f"  {'Number of free parameters':<40}{res.nparams:>12,}",
               f"  {'Log-likelihood':<40}{res.loglik:>12.3f}",
               f"  {'Akaike (AIC)':<40}{res.aic:>12.3f}",
               f"  {'Bayesian (BIC)':<40}{res.bic:>12.3f}",
               f"  {'Kernel':<40}{res.kernel:>12}",
               ""] if getattr(res, "survey", None) is None else [
               f"mlsem {__version__}: structural equation model, pseudo-ML (survey design)",
               "",
               f"  {'Number of observations':<40}{res.nobs:>12,}",
               f"  {'Number of missing patterns':<40}{res.npatterns:>12,}",
               f"  {'Number of free parameters':<40}{res.nparams:>12,}",
               f"  {'Log-pseudolikelihood':<40}{res.loglik:>12.3f}",
               f"  {'Kernel':<40}{res.kernel:>12}",
               ""]
    out += ["Standard errors: observed information matrix (OIM)" if res.vce == "oim" else (
        "Standard errors: ADF, (Delta' W Delta)^-1 / (N - 1)" if res.vce == "adf" else f"Standard errors: {res.vce}")]
    # the label column grows to fit the longest "name (label)" (18 as lavaan's)
    wl = max([18] + [len(r["lhs"]) + 1 + len(r["label"] or "") + 3 for r in res.sem_rows]
             + [len(r["rhs"]) + len(r["label"] or "") + 3 for r in res.sem_rows])
    ddf = _design_df(res)
    head = (f"{'':<{wl + 4}}{'Estimate':>10}{'Std.Err':>10}{'z-value':>9}{'P(>|z|)':>9}" if ddf is None
            else f"{'':<{wl + 4}}{'Estimate':>10}{'Std.Err':>10}{'t-value':>9}{'P(>|t|)':>9}")

    def fmt(r, name):
        est = f"{r['est']:>10.3f}"
        if r.get("free", True) and np.isfinite(r["se"]):
            z = r["est"] / r["se"] if r["se"] > 0 else float("nan")
            p = (2.0 * stats.norm.sf(abs(z)) if ddf is None else 2.0 * stats.t.sf(abs(z), ddf)) \
                if np.isfinite(z) else float("nan")
            return f"    {name:<{wl}}{est}{r['se']:>10.3f}{z:>9.3f}{p:>9.3f}"
        return f"    {name:<{wl}}{est}"
    rows = [r for r in res.sem_rows if r.get("matrix") != "x"]
    for key, title in _SECTIONS:
        if key == "cov":
            sel = [r for r in rows if r["op"] == "~~" and r["lhs"] != r["rhs"]]
        elif key == "var":
            sel = [r for r in rows if r["op"] == "~~" and r["lhs"] == r["rhs"]]
        else:
            sel = [r for r in rows if r["op"] == key]
        if not sel:
            continue
        out += ["", f"{title}:", head]
        last = None
        for r in sel:
            lab = f"{r['rhs']} ({r['label']})" if r["label"] else r["rhs"]
            if key in ("~1", "var"):
                lab = f"{'.' if r.get('dot') else ''}{r['lhs']}"
                if r["label"]:
                    lab += f" ({r['label']})"
            elif r["lhs"] != last:
                out.append(f"  {r['lhs']} {r['op']}")
                last = r["lhs"]
            out.append(fmt(r, lab))
    if res.defined:
        out += ["", "Defined Parameters:", head]
        for d in res.defined:
            out.append(fmt(dict(d, free=True), f"{d['lhs']}"))
    if not res.converged:
        out.append(f"WARNING: the fit did NOT converge ({res.opt.message}); the estimates are not reliable.")
    if not res.identified:
        out.append("WARNING: the model is NOT identified: the information matrix is singular; "
                   f"confounded parameters: {', '.join(res.confounded)}.")
    for n in res.notes:
        out.append(f"Note: {n}")
    out.extend(_backend_footer(res))
    return "\n".join(out)


def _ci_override(res, tab) -> dict:
    """name -> (lower, upper) of the interval kind the summary shows (profile or
    bootstrap intervals stored by confint); empty for Wald."""
    if res.ci_kind == "wald" or res.ci_table is None:
        return {}
    return {r["name"]: (r["lower"], r["upper"]) for r in res.ci_table.iter_rows(named=True)}


def _backend_footer(res) -> list:
    """A line when the fit did not run on the compiled kernel (it is ~100x slower)."""
    if res.backend == "numpy":
        return ["Note: fitted with the NumPy oracle (backend='numpy'), not the compiled kernel."]
    return []
