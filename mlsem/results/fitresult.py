"""Results: labelled tables, tests and export.  Reads fitted state only."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import stats

from .. import __version__
from ..errors import MlsemError
from .export import _json_default, atomic_write
from .summary import _backend_footer, _ci_override, _design_df, _sem_summary

Z975 = 1.959963984540054


def _chi2_sf(x, df):
    return float(stats.chi2.sf(x, df)) if df > 0 else float("nan")


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
    boundary: list = field(default_factory=list)   # singular random-effect blocks (results.boundary)
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
    # general SEM fits (mlsem.sem): lavaan's view of the parameters
    sem_rows: list = None          # every row of the parameter table (fixed ones too)
    sem_labels: list = None        # (lhs, op, rhs, label) per free parameter
    defined: list = field(default_factory=list)   # := parameters with delta-method SEs
    loglik_fixed_x: float = 0.0    # the fixed covariates' own log-likelihood at their sample moments
    kernel: str = ""
    encoding: object = field(default=None, repr=False)   # mlsem.data.encode.Encoding (predict on new data)
    # small-sample inference (mlsem.inference.smallsample): the df method, df per parameter
    # (nan but for the fixed effects), and the REML information of the variance parameters
    df_method: str = None
    df: np.ndarray = field(default=None, repr=False)
    small: object = field(default=None, repr=False)
    reml_info: np.ndarray = field(default=None, repr=False)
    reml_info_params: np.ndarray = field(default=None, repr=False)   # the parameters reml_info is over
    ci_kind: str = "wald"          # the interval kind the summary shows
    ci_table: object = field(default=None, repr=False)
    boot: object = field(default=None, repr=False)      # mlsem.inference.bootstrap.Bootstrap
    backend: str = ""               # the kernel that fitted: "cython", "numpy" (the oracle) or "dask"
    adf: dict = field(default=None, repr=False)   # method="adf": F_min, chi2, df, the moments
    survey: object = field(default=None, repr=False)  # survey= fits: the design, weights, scores

    def attach_encoding(self, encoding) -> None:
        """Keep the fixed part's encoding (for predict on new data) and note the
        design columns it dropped as linear combinations of earlier ones."""
        self.encoding = encoding
        note = encoding.dropped_note() if encoding is not None else None
        if note and note not in self.notes:
            self.notes.append(note)

    # ---- standard verbs ----------------------------------------------------
    @property
    def std_err(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    @property
    def params(self) -> pl.DataFrame:
        est, se = self.estimate, self.std_err
        rows = []
        dfs = self.df if self.df is not None else np.full(len(self.names), np.nan)
        ci = _wald_ci(self, 0.95)
        for n, k, b, s, dfi, lo, hi in zip(self.names, self.kinds, est, se, dfs,
                                           ci["lower"], ci["upper"]):
            if k in ("var", "resid") and not np.isfinite(dfi):
                z = p = float("nan")
            elif np.isfinite(dfi):       # t(df) for the fixed effects (small-sample df)
                z = b / s if s > 0 else float("nan")
                p = 2.0 * stats.t.sf(abs(z), dfi) if np.isfinite(z) else float("nan")
            else:
                z = b / s if s > 0 else float("nan")
                p = 2.0 * stats.norm.sf(abs(z)) if np.isfinite(z) else float("nan")
            rows.append((n, float(b), float(s), float(z), float(p), float(lo), float(hi)))
        schema = {"name": pl.String, "estimate": pl.Float64, "std_err": pl.Float64, "z": pl.Float64,
                  "p_value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
        if self.df is not None:
            # t statistics on df (nan df: a variance parameter, no test)
            rows = [(r[0], r[1], r[2], r[3], float(d), r[4], r[5], r[6]) for r, d in zip(rows, dfs)]
            schema = {"name": pl.String, "estimate": pl.Float64, "std_err": pl.Float64,
                      "t": pl.Float64, "df": pl.Float64, "p_value": pl.Float64,
                      "ci_low": pl.Float64, "ci_high": pl.Float64}
        if self.sem_labels is not None:
            rows = [r + tuple(lab) for r, lab in zip(rows, self.sem_labels)]
            ddf = _design_df(self)
            for d in self.defined:
                z = d["est"] / d["se"] if d["se"] > 0 else float("nan")
                if ddf is None:
                    p = 2.0 * stats.norm.sf(abs(z)) if np.isfinite(z) else float("nan")
                    q, head = Z975, (z,)
                else:           # t on the design df (survey fits)
                    p = 2.0 * stats.t.sf(abs(z), ddf) if np.isfinite(z) else float("nan")
                    q, head = float(stats.t.ppf(0.975, ddf)), (z, float(ddf))
                if self.df is not None and ddf is None:
                    head = (z, float("nan"))
                rows.append((d["lhs"], d["est"], d["se"], *head, p, d["est"] - q * d["se"],
                             d["est"] + q * d["se"], d["lhs"], ":=", d["rhs"], d["label"]))
            schema.update({"lhs": pl.String, "op": pl.String, "rhs": pl.String, "label": pl.String})
        return pl.DataFrame(rows, schema=schema, orient="row")

    @property
    def coef(self) -> dict:
        return dict(zip(self.names, self.estimate.tolist()))

    @property
    def vcov(self) -> pl.DataFrame:
        """The labelled covariance matrix of the estimates (a ``name`` column,
        then one column per parameter), under the fit's ``vce``.  With the
        default ``vce="mixed"`` (lme4's and Stata's mixed-model convention)
        the fixed effects' block is (X'V^-1X)^-1 and the variance components'
        block the inverse of their own observed information; the covariances
        between the two blocks are 0 by that convention (the blocks are
        asymptotically independent under ML).  ``vce="oim"`` gives the full
        inverse observed information instead."""
        return pl.DataFrame({"name": self.names,
                             **{n: self.cov[:, i] for i, n in enumerate(self.names)}})

    @property
    def nparams(self) -> int:
        return len(self.names)

    @property
    def aic(self) -> float:
        self._refuse_pseudo("AIC")
        return -2.0 * self.loglik + 2.0 * self.nparams

    @property
    def bic(self) -> float:
        self._refuse_pseudo("BIC")
        return -2.0 * self.loglik + math.log(self.nobs) * self.nparams

    def _refuse_pseudo(self, what):
        if self.survey is not None:
            raise MlsemError(f"{what}: a survey fit maximises a pseudo-likelihood, for which {what} "
                             "is not valid under the design; compare models by Wald tests on the "
                             "design-based covariance (res.wald)")

    # ---- survey fits (mlsem.inference.design) -------------------------------------
    def scores(self, by: str = "psu") -> pl.DataFrame:
        """Score contributions of a survey fit, a Polars frame: one row per PSU
        (``by="psu"``: stratum, psu, then the PSU totals of w_k dl_k/dpsi per
        parameter) or per top-level unit (``by="unit"``: its id, stratum, psu,
        weight, then w_k dl_k/dpsi).  They sum to the gradient (0 at the
        estimates); with :meth:`hessian` they give other variance estimators
        (replicate weights, docs/survey.md)."""
        from ..inference.design import scores_frame
        return scores_frame(self, by)

    def hessian(self) -> pl.DataFrame:
        """The Hessian of the (pseudo-)log-likelihood at the estimates, labelled: a
        ``name`` column, then one column per parameter (minus the observed information)."""
        from ..inference.design import hessian_frame
        return hessian_frame(self)

    def wald_fixed(self) -> dict:
        """Joint Wald test that the fixed effects other than the intercept are 0
        (several outcomes: other than each outcome's intercept ``y1:Intercept``)."""
        icpt = {"Intercept"} | {f"{o}:Intercept" for o in self._outcomes()}
        idx = [i for i, (n, k) in enumerate(zip(self.names, self.kinds))
               if k == "fixed" and n not in icpt]
        if not idx:
            return {"chi2": float("nan"), "df": 0, "p_value": float("nan")}
        b = self.estimate[idx]
        V = self.cov[np.ix_(idx, idx)]
        try:
            chi2 = float(b @ np.linalg.solve(V, b))
        except np.linalg.LinAlgError:
            chi2 = float("nan")
        out = {"chi2": chi2, "df": len(idx), "p_value": _chi2_sf(chi2, len(idx))}
        if self.survey is not None:
            # survey fits: the design-adjusted F (Stata's svy), its p-value the one reported
            from ..inference.design import design_f
            f = design_f(chi2, len(idx), self.survey.df)
            if f is not None:
                out = {**out, "p_value_chi2": out["p_value"], **f}
        return out

    # ---- tests (mlsem.inference.vce) ---------------------------------------------
    def wald(self, restrictions) -> dict:
        """Wald test of linear restrictions by parameter name: ``"x = 0"``,
        ``["var(k) = var(j)", "x - 2*Intercept = 1"]``."""
        from ..inference.vce import wald
        return wald(self, restrictions)

    def _outcomes(self) -> list:
        """The outcomes of a fit of several outcomes ([] for one outcome)."""
        table = getattr(self.model, "table", None)
        if getattr(table, "nout", 1) > 1:
            return list(table.outcomes)
        if table is None and self.sem_rows is None and ", " in (self.outcome or ""):
            return self.outcome.split(", ")      # a result without its model
        return []

    def _refuse_several_outcomes(self, what):
        if getattr(getattr(self.model, "table", None), "nout", 1) > 1:
            raise MlsemError(f"{what}: not available for a fit of several outcomes yet (Wald "
                             "intervals and tests, lrtest and random_effects() are)")

    def score_tests(self, **kw) -> pl.DataFrame:
        """Score tests of every equality constraint and fixed parameter
        (lavaan's lavTestScore / modindices, Stata's estat scoretests).  With several
        outcomes: the covariances across outcomes fixed at 0 by ``outcomes=``
        (mlsem.inference.mscoretests; observed information)."""
        if getattr(getattr(self.model, "table", None), "nout", 1) > 1:
            if kw:
                raise MlsemError(f"score_tests: {', '.join(kw)}= not available with several "
                                 "outcomes (the tests use the observed information)")
            from ..inference.mscoretests import multi_score_tests
            return multi_score_tests(self)
        if self.survey is not None:
            raise MlsemError("score_tests: the score tests use the model-based information, not "
                             "valid for a survey fit's pseudo-likelihood; test restrictions with "
                             "res.wald(...) (design-based covariance)")
        from ..inference.scoretests import score_tests
        return score_tests(self, **kw)

    def fit_test(self) -> dict:
        """LR test of the model against the saturated model of the wide form."""
        self._refuse_several_outcomes("fit_test")
        self._refuse_pseudo("fit_test (an LR test against the saturated model)")
        from ..inference.fittest import fit_test
        return fit_test(self)

    # ---- intervals and the bootstrap (mlsem.inference.profile, mlsem.inference.bootstrap) ---------------
    def confint(self, method: str = "wald", level: float = 0.95, parm=None, **kw) -> pl.DataFrame:
        """Confidence intervals, a Polars frame name, lower, upper.

        ``method``: "wald" (the table's: normal or t(df) for coefficients,
        log scale for variances), "profile" (profile likelihood; as lme4's
        confint, a REML fit is refitted by ML first, with a note) or "bootstrap" (percentile intervals of the draws of
        :meth:`bootstrap`; ``n=``, ``seed=`` run it if it has not run).  The
        summary then shows this kind."""
        if method == "wald":
            tab = _wald_ci(self, level)
        elif method == "profile":
            self._refuse_several_outcomes("confint(method='profile')")
            from ..inference.profile import profile_confint
            tab = profile_confint(self, level, parm)
        elif method == "bootstrap":
            self._refuse_several_outcomes("confint(method='bootstrap')")
            from ..inference.bootstrap import percentile_ci
            tab = percentile_ci(self, level, **kw)
        else:
            raise MlsemError(f"confint: method={method!r} is not one of 'wald', 'profile', 'bootstrap'")
        if method != "bootstrap" and kw:
            raise MlsemError(f"confint(method={method!r}) takes no {', '.join(kw)}")
        if parm is not None and method != "profile":
            names = [parm] if isinstance(parm, str) else list(parm)
            tab = tab.filter(pl.col("name").is_in(names))
        self.ci_kind = {"wald": "wald", "profile": f"profile likelihood ({level:.0%})",
                        "bootstrap": f"parametric bootstrap, percentile ({level:.0%})"}[method]
        self.ci_table = None if method == "wald" else tab
        return tab

    def bootstrap(self, n: int = 1000, seed=None, parallel=None, progress=True) -> pl.DataFrame:
        """Parametric bootstrap: ``n`` data sets simulated from the fitted
        model, each refitted (warm-started at the estimates); the draws as a
        Polars frame (one column per parameter, plus ``replicate`` and
        ``converged``).  Failed refits are counted and reported
        (``self.boot.failed``), never dropped silently.  See mlsem.inference.bootstrap."""
        self._refuse_several_outcomes("bootstrap")
        from ..inference.bootstrap import bootstrap
        return bootstrap(self, n=n, seed=seed, parallel=parallel, progress=progress).draws

    # ---- printing ----------------------------------------------------------
    def summary(self) -> str:
        if self.sem_rows is not None:
            return _sem_summary(self)
        out = []
        title = {"ML": "Mixed-effects ML regression", "ADF": "Mixed-effects ADF (GMM) regression"}.get(
            self.method, "Mixed-effects REML regression")
        if self.survey is not None:
            title = "Mixed-effects pseudo-ML regression (survey)"
        units = getattr(getattr(self.model, "prep", None), "meta", {}).get("units")
        if self._outcomes() and units is not None:
            # several outcomes: an observation is a (unit, outcome) cell
            out.append(f"{title:<48}Number of cells   = {self.nobs:>10,}")
            out.append(f"{'':<48}Number of units   = {units:>10,}")
        else:
            out.append(f"{title:<48}Number of obs     = {self.nobs:>10,}")
        if self.levels:
            wg = max([15] + [len(lv.name) for lv in self.levels])
            out.append("")
            out.append("-" * (wg + 47))
            # several outcomes: an observation is a (unit, outcome) cell
            per = "       Cells per Group" if self._outcomes() else "Observations per Group"
            out.append(f"{'':>{wg + 1}}|     No. of       {per}")
            out.append(f"{'Group Variable':>{wg}} |     Groups    Minimum    Average    Maximum")
            out.append("-" * (wg + 1) + "+" + "-" * 45)
            for lv in self.levels:
                out.append(f"{lv.name:>{wg}} | {lv.ngroups:>10,} {lv.min_obs:>10,} {lv.mean_obs:>10.1f} {lv.max_obs:>10,}")
            out.append("-" * (wg + 47))
        w = self.wald_fixed()
        out.append("")
        if "F" in w:        # survey fits: the design-adjusted F
            out.append(f"{'':<48}{'F(%d, %d)' % (w['df_num'], w['df_den']):<18}= {w['F']:>10.2f}")
        else:
            out.append(f"{'':<48}Wald chi2({w['df']}){'':<6}= {w['chi2']:>10.2f}")
        if self.adf is not None:
            fm = f"ADF F_min = {self.adf['fmin']:.6g}"
            out.append(f"{fm:<48}Prob > chi2       = {w['p_value']:>10.4f}")
        else:
            if self.survey is not None:
                pl_ = "Prob > F" if "F" in w else "Prob > chi2"
                out.append(f"Log pseudolikelihood = {self.loglik:<25.5f}{pl_:<18}= {w['p_value']:>10.4f}")
            else:
                out.append(f"Log likelihood = {self.loglik:<31.5f}Prob > chi2       = {w['p_value']:>10.4f}")
        out.append("")
        conv = "observed information matrix (OIM)" if self.vce == "oim" else (
            "mixed-model convention: fixed effects (X'V^-1X)^-1, variance components from their own observed information"
            if self.vce == "mixed" else self.vce)
        out.append(f"Std. errors: {conv}")
        if self.df_method:
            out.append(f"Fixed effects: t tests on {self.df_method} df"
                       + (" (Kenward-Roger adjusted std. errors)" if self.df_method == "Kenward-Roger" else ""))
        tab = self.params
        ci = _ci_override(self, tab)
        if self.ci_kind != "wald":
            rest = [n for n in self.names if n not in ci]
            if rest:          # confint(parm=...): the others keep the table's (Wald) intervals
                out.append(f"Confidence intervals: {self.ci_kind} for {', '.join(ci)}; "
                           f"Wald for the others")
            else:
                out.append(f"Confidence intervals: {self.ci_kind}")
        fixed = {n for n, k in zip(self.names, self.kinds) if k == "fixed"}
        # the name columns grow to fit the longest name (formula terms such as
        # schgend[T.girls]:standLRT); 12 and 28 characters as in Stata's layout
        wf = max([12, len(self.outcome)] + [len(n) for n in fixed])
        wr = max([28] + [len(n) for n in self.names if n not in fixed] + [len(n) for n in ci])
        line = "-" * (wf + 66)
        out.append(line)
        if self.df_method:
            out.append(f"{self.outcome:>{wf}} |      Coef.   Std. Err.      t       df  P>|t|  [95% Conf. Interval]")
        else:
            out.append(f"{self.outcome:>{wf}} |      Coef.   Std. Err.      z    P>|z|     [95% Conf. Interval]")
        out.append("-" * (wf + 1) + "+" + "-" * 64)
        for r in tab.iter_rows(named=True):
            lo, hi = ci.get(r["name"], (r["ci_low"], r["ci_high"]))
            if r["name"] in fixed:
                if self.df_method:
                    out.append(f"{r['name']:>{wf}} | {r['estimate']:>10.6g} {r['std_err']:>10.6g} {r['t']:>6.2f} {r['df']:>8.2f} {r['p_value']:>6.3f} {lo:>10.6g} {hi:>10.6g}")
                else:
                    out.append(f"{r['name']:>{wf}} | {r['estimate']:>10.6g} {r['std_err']:>10.6g} {r['z']:>8.2f} {r['p_value']:>7.3f}   {lo:>10.6g} {hi:>10.6g}")
        out.append(line)
        out.append("")
        line = "-" * (wr + 50)
        out.append(line)
        out.append(f"{'Random-effects Parameters':>{wr}} |   Estimate   Std. Err.     [95% Conf. Interval]")
        out.append("-" * (wr + 1) + "+" + "-" * 48)
        for r in tab.iter_rows(named=True):
            if r["name"] in fixed:
                continue
            est = "0 (boundary)" if r["estimate"] == 0.0 else f"{r['estimate']:.6g}"
            lo, hi = ci.get(r["name"], (r["ci_low"], r["ci_high"]))
            out.append(f"{r['name']:>{wr}} | {est:>10} {r['std_err']:>10.6g}     {lo:>10.6g} {hi:>10.6g}")
        for n, (lo, hi) in ci.items():        # profile rows beyond the parameters (correlations)
            if n not in self.names:
                out.append(f"{n:>{wr}} | {'':>10} {'':>10}     {lo:>10.6g} {hi:>10.6g}")
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
        variance = {n for n, k in zip(self.names, self.kinds) if k != "fixed"}
        if not self.identified and self.boundary and set(self.confounded) <= variance:
            out.append("WARNING: boundary (singular) fit: the information matrix is singular at this "
                       "estimate because a random-effect covariance is (see the note); no standard "
                       f"errors for: {', '.join(self.confounded)}.")
        elif not self.identified:
            out.append("WARNING: the model is NOT identified: the information matrix is singular; "
                       f"confounded parameters: {', '.join(self.confounded)}.")
            out.append("         The data cannot tell these parameters apart: their estimates are one "
                       "of many equally good solutions and have no standard errors.")
        for n in self.notes:
            out.append(f"Note: {n}")
        out.extend(_backend_footer(self))
        return "\n".join(out)

    def random_effects(self) -> pl.DataFrame:
        """Empirical Bayes predictions (posterior mean = BLUP, conditional sd) of
        every random effect per unit; see :func:`mlsem.results.predict.random_effects`."""
        from .predict import random_effects
        return random_effects(self)

    def predict(self, newdata=None, random: bool = True, se: bool = False) -> pl.DataFrame:
        """Predicted outcome x'beta + z'b (``random=False``: x'beta), on the
        estimation rows or on ``newdata``; see :func:`mlsem.results.predict.predict`."""
        from .predict import predict
        return predict(self, newdata, random=random, se=se)

    def fitted(self) -> pl.DataFrame:
        """Conditional fitted values of the estimation rows (lme4's ``fitted()``)."""
        from .predict import fitted
        return fitted(self)

    def residuals(self, kind: str = "conditional") -> pl.DataFrame:
        """Residuals of the estimation rows: y - x'beta - z'b (``"conditional"``)
        or y - x'beta (``"marginal"``)."""
        from .predict import residuals
        return residuals(self, kind)

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
            "boundary": [{"level": lv, "parameters": ps, "why": why} for lv, ps, why in self.boundary],
            "nobs": self.nobs,
            "npatterns": self.npatterns,
            "nslots": self.nslots,
            "dropped_covariate": self.dropped_covariate,
            "missing_outcome": self.missing_outcome,
            "aic": None if self.survey is not None else self.aic,
            "bic": None if self.survey is not None else self.bic,
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
            **({"adf": {k: self.adf[k] for k in ("fmin", "chi2", "df", "p_value", "nmom")}}
               if self.adf is not None else {}),
            **({"survey": _survey_record(self)} if self.survey is not None else {}),
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


def _wald_ci(res, level) -> pl.DataFrame:
    """The table's intervals at ``level``."""
    if not (0.0 < level < 1.0):
        raise MlsemError(f"confint: level={level!r} must be between 0 and 1")
    zq = float(stats.norm.ppf(0.5 + level / 2))
    dfs = res.df if res.df is not None else np.full(len(res.names), np.nan)
    rows = []
    for n, k, b, s, d in zip(res.names, res.kinds, res.estimate, res.std_err, dfs):
        if np.isfinite(d):
            q = float(stats.t.ppf(0.5 + level / 2, d))
            lo, hi = b - q * s, b + q * s
        elif k in ("var", "resid"):
            if b > 0 and np.isfinite(s) and s > 0:
                r = zq * s / b
                f = math.exp(r) if r < 700.0 else math.inf
                lo, hi = b / f, b * f
            else:
                lo = hi = float("nan")
        else:
            lo, hi = b - zq * s, b + zq * s
        rows.append((n, float(lo), float(hi)))
    return pl.DataFrame(rows, schema={"name": pl.String, "lower": pl.Float64, "upper": pl.Float64},
                        orient="row")


def _survey_record(res) -> dict:
    sv = res.survey
    d = sv.design
    return {"weights": dict(d.weights), "scale": d.scale, "strata": d.strata, "psu": d.psu,
            "fpc": d.fpc, "singleton": d.singleton,
            "subpop": None if d.subpop is None else str(d.subpop),
            "nstrata": sv.info.nstrata, "psus": sv.info.npsu, "design_df": sv.df,
            "weighted_counts": list(sv.weighted_counts), "pseudo_loglik": True}
