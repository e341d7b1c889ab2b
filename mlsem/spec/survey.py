"""Spec layer: a survey design (issue 17) — what the user declares, checked
for form only (the data are checked in mlsem.data.weights).

``SurveyDesign(weights={"k": "w_k", "j": "w_j", "obs": "w_i"}, scale="size",
strata="stratum", psu="psu", fpc="fpc", singleton="fail", subpop="x1 > 0")``:

* ``weights``: a conditional inverse-probability weight column per level, keys
  the formula's grouping columns plus ``"obs"`` for the observations; any
  level may be left out (weight 1).
* ``scale``: the weights of every level below the top, each within its parent
  unit: ``"none"`` (as given; integer weights then give the replicated data's
  log-likelihood), ``"size"`` (w n / sum w: they sum to the number of units in
  the parent) or ``"effective"`` (w sum w / sum w^2: they sum to the effective
  sample size (sum w)^2 / sum w^2, Stata's ``pwscale(effective)``).  Top-level
  weights are never rescaled.
* ``strata``, ``psu`` (default: the top-level units; else a column nesting
  them), ``fpc`` (a column: the population number of PSUs in the stratum, or a
  sampling fraction <= 1; or one number for every stratum).
* ``singleton``: a stratum with one PSU: ``"fail"`` (an error, as R's survey
  package), ``"certainty"`` (contributes nothing), ``"scaled"`` (certainty,
  the variance scaled by #strata / #strata with several PSUs), ``"centered"``
  (its PSU centred at the grand mean of the PSU totals), as Stata's
  ``singleunit()``.
* ``subpop``: a boolean (or 0/1) column, a Polars expression or an SQL
  expression string (``"x1 > 0 and z < 1"``): estimates on those rows, the
  standard errors from the whole design (Stata's ``svy, subpop()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MlsemError

SCALES = ("none", "size", "effective")
SINGLETONS = ("fail", "certainty", "scaled", "centered")


@dataclass(frozen=True)
class SurveyDesign:
    """A survey design for ``mlsem.fit(data, formula, survey=SurveyDesign(...))``:
    pseudo-maximum likelihood with conditional sampling weights at every level
    and standard errors by linearisation over the design (docs/survey.md).

    ``weights``: ``{level: column}``, levels the formula's grouping columns and
    ``"obs"``; a level left out has weight 1.  ``scale``: "none", "size" (w n / sum w
    within the parent unit) or "effective" (w sum w / sum w^2), for every level
    below the top; top-level weights are never rescaled.  ``strata``, ``psu``
    (default: the top-level units; else a column nesting them), ``fpc`` (a column
    or a number: the population count of PSUs per stratum, or a sampling fraction
    <= 1).  ``singleton``: a stratum with one PSU: "fail", "certainty", "scaled"
    or "centered" (Stata's ``singleunit()``).  ``subpop``: a boolean or 0/1
    column, an SQL expression string or a Polars expression; estimates on
    those rows, standard errors from the whole design."""
    weights: dict = field(default_factory=dict)
    scale: str = "none"
    strata: str | None = None
    psu: str | None = None
    fpc: object = None
    singleton: str = "fail"
    subpop: object = None

    def __post_init__(self):
        w = self.weights
        if w is None:
            object.__setattr__(self, "weights", {})
            w = {}
        if isinstance(w, str):
            raise MlsemError(f"SurveyDesign: weights={w!r} must be a dict {{level: column}}, "
                             "e.g. {'k': 'w_k', 'obs': 'w_i'} (levels: the formula's grouping "
                             "columns and 'obs')")
        if not isinstance(w, dict):
            raise MlsemError(f"SurveyDesign: weights={w!r} must be a dict {{level: column}}")
        for k, v in w.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise MlsemError(f"SurveyDesign: weights entry {k!r}: {v!r} must map a level name "
                                 "to a column name")
        object.__setattr__(self, "weights", dict(w))
        if self.scale not in SCALES:
            raise MlsemError(f"SurveyDesign: scale={self.scale!r} is not one of "
                             f"{', '.join(map(repr, SCALES))}")
        if self.singleton not in SINGLETONS:
            raise MlsemError(f"SurveyDesign: singleton={self.singleton!r} is not one of "
                             f"{', '.join(map(repr, SINGLETONS))}")
        for name in ("strata", "psu"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise MlsemError(f"SurveyDesign: {name}={v!r} must be a column name")
        f = self.fpc
        if f is not None and not isinstance(f, str):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
                raise MlsemError(f"SurveyDesign: fpc={f!r} must be a column name or a positive "
                                 "number (a population count of PSUs, or a sampling fraction <= 1)")
        s = self.subpop
        if s is not None and not isinstance(s, str):
            try:
                import polars as pl
                ok = isinstance(s, pl.Expr)
            except Exception:   # pragma: no cover
                ok = False
            if not ok:
                raise MlsemError(f"SurveyDesign: subpop={s!r} must be a column name, an SQL "
                                 "expression string or a Polars expression")

    @property
    def has_design(self) -> bool:
        return self.strata is not None or self.psu is not None or self.fpc is not None

    def describe(self) -> str:
        parts = []
        if self.weights:
            parts.append("weights " + ", ".join(f"{k}: {v}" for k, v in self.weights.items()))
        parts.append(f"scale={self.scale}")
        for name in ("strata", "psu", "fpc"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v}")
        if self.subpop is not None:
            parts.append(f"subpop={self.subpop}")
        return "SurveyDesign(" + "; ".join(parts) + ")"
