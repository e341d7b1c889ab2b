"""The bridge between the nested model and the SEM side: ``sem()``
(mlsem.api.semfit) fits a model written in lavaan syntax on wide data;
``multilevel()`` writes a nested model as that wide data
(``to_wide``) and that syntax (``to_syntax``), so that

    spec = mlsem.multilevel("y ~ x + (1 | k/j)", data=d)
    mlsem.sem(spec.to_syntax(), spec.to_wide(d))

is the same fit as ``mlsem.fit(d, "y ~ x + (1 | k/j)")`` (the seed's "double
reshape wide" and the constraints "a little loop" writes).
"""
from __future__ import annotations

import re

import numpy as np
import polars as pl

from ..data.prepare import prepare
from ..errors import MlsemError
from ..data.encode import load
from ..spec.formula import effects_of, nest_levels, parse_formula
from ..spec.table import multilevel_table


# ---- multilevel <-> wide SEM ---------------------------------------------------------
def _ident(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.]", "_", str(text)).strip("_")
    s = re.sub(r"_+", "_", s)
    if not s or not (s[0].isalpha() or s[0] in "_."):
        s = "v" + s
    return s


class MultilevelSpec:
    """A nested model in its wide SEM form: ``to_wide(d)`` the data, ``to_syntax()``
    the constrained SEM in lavaan syntax."""

    def __init__(self, formula: str, prep, table, levels, F, index=None):
        self.formula = formula
        self.index = index
        self.prep = prep
        self.multilevel_table = table
        self.levels = levels
        self.F = F
        if table.theta_func is not None:
            raise MlsemError("a structured residual covariance has no plain lavaan-syntax form")
        lab = prep.slot_labels
        below = [c for c in lab.columns if c not in ("slot",)]
        self.slot_names = []
        for r in lab.sort("slot").iter_rows(named=True):
            parts = [str(r[c]) for c in below]
            self.slot_names.append("_".join(parts))
        self.y_cols = [_ident(f"{F.outcome}{s}") for s in self.slot_names]
        self.covariates = [c for c in prep.xnames if c != "Intercept"]
        self.x_cols = {c: [_ident(f"{c}{s}") for s in self.slot_names] for c in self.covariates}
        allc = self.y_cols + [c for v in self.x_cols.values() for c in v]
        if len(set(allc)) != len(allc):
            raise MlsemError("the wide column names collide; rename the outcome or covariates")
        self.labels = {}
        used = set()
        for p in table.params:
            if p.kind == "fixed":
                base = f"b_{p.name}"
            else:
                base = p.name.replace("var(", "var_").replace("cov(", "cov_")
            lb = _ident(base)
            while lb in used:
                lb += "_"
            used.add(lb)
            self.labels[p.name] = lb
        self.latent_names = []
        for g, nm in enumerate(prep.latent_names):
            ln = _ident(f"L_{nm}")
            while ln in self.latent_names or ln in allc:
                ln += "_"
            self.latent_names.append(ln)

    @property
    def top(self) -> str:
        return self.prep.levels[0].name

    def to_wide(self, data=None) -> pl.DataFrame:
        """One row per top-level unit; columns: the top id, then y per slot
        (``y{j}_{i}``), then each covariate per slot (``x{j}_{i}``); null where the
        slot is empty.  ``data`` defaults to the data the spec was built from;
        another data set is laid out on this spec's slots."""
        prep = self.prep if data is None else _prep_for(self.formula, data, self.index,
                                                         self.prep.meta.get("encoding"))[0]
        if data is not None and prep.nslots != self.prep.nslots:
            raise MlsemError("data: its slots differ from the spec's; build the spec from this data")
        nr, P = prep.nrows, prep.nslots
        row_of_obs = np.repeat(np.arange(nr), np.diff(prep.row_ptr))
        Y = np.full((nr, P), np.nan)
        Y[row_of_obs, prep.slot] = prep.y
        cols = {self.top: prep.top_ids}
        for s in range(P):
            cols[self.y_cols[s]] = Y[:, s]
        for c in self.covariates:
            k = prep.xnames.index(c)
            Xc = np.full((nr, P), np.nan)
            Xc[row_of_obs, prep.slot] = prep.X[:, k]
            for s in range(P):
                cols[self.x_cols[c][s]] = Xc[:, s]
        df = pl.DataFrame(cols).with_columns(pl.exclude(self.top).fill_nan(None))
        return df.sort(self.top)

    def to_syntax(self) -> str:
        """The constrained SEM in lavaan syntax: latents with unit loadings, shared
        coefficients, variances and residual variances as labels."""
        prep, t = self.prep, self.multilevel_table
        if any(e != "Intercept" for _, e in prep.latent_term):
            raise MlsemError("the wide SEM form of a random-slope model needs loadings equal to each row's "
                             "covariate values (definition variables), which lavaan syntax cannot write")
        P, M = prep.nslots, prep.nlatent
        lines = [f"# {self.formula} as a wide SEM: {P} slots, {M} latent variables"]
        for g in range(M):
            ind = [self.y_cols[s] for s in range(P) if (prep.slot_lat[s] == g).any()]
            lines.append(f"{self.latent_names[g]} =~ " + " + ".join(f"1*{v}" for v in ind))
        lab = {i: self.labels[p.name] for i, p in enumerate(t.params)}
        done = set()
        for r, c, p in zip(t.phi_row, t.phi_col, t.phi_param):
            a, b = (int(r), int(c)) if r <= c else (int(c), int(r))
            if (a, b) in done:
                continue
            done.add((a, b))
            lines.append(f"{self.latent_names[a]} ~~ {lab[int(p)]}*{self.latent_names[b]}")
        for a in range(M):
            for b in range(a + 1, M):
                if (a, b) not in done:
                    lines.append(f"{self.latent_names[a]} ~~ 0*{self.latent_names[b]}")
        for s in range(P):
            terms = []
            for k, nm in enumerate(prep.xnames):
                pl_ = lab[int(t.beta_param[k])]
                terms.append(f"{pl_}*1" if nm == "Intercept" else f"{pl_}*{self.x_cols[nm][s]}")
            if terms:
                lines.append(f"{self.y_cols[s]} ~ " + " + ".join(terms))
            else:
                lines.append(f"{self.y_cols[s]} ~ 0*1")
        done = set()
        for r, c, p in zip(t.theta_row, t.theta_col, t.theta_param):
            a, b = (int(r), int(c)) if r <= c else (int(c), int(r))
            if (a, b) in done:
                continue
            done.add((a, b))
            lines.append(f"{self.y_cols[a]} ~~ {lab[int(p)]}*{self.y_cols[b]}")
        return "\n".join(lines) + "\n"

    def sem_name(self, name: str) -> str:
        """The SEM label of a multilevel parameter name (e.g. "var(k)" -> "var_k")."""
        return self.labels[name]


def _prep_for(formula, data, index=None, encoding=None):
    """The prepared data of ``formula`` on ``data``; with ``encoding`` (a spec's),
    the fixed part is encoded as it was for the spec (same factor levels)."""
    if isinstance(formula, (list, tuple)):
        raise MlsemError("several outcomes (a list of formulas): the SEM bridge (mlsem.multilevel, "
                         "mlsem.to_wide) is not available for them yet; fit them with mlsem.fit")
    F = parse_formula(formula)
    levels = nest_levels(F)
    df, F, encoding = load(data, F, [index] if index else [], encoding=encoding)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects_of(F), index=index)
    prep.meta["encoding"] = encoding
    return prep, F, levels


def multilevel(formula: str, data, *, index: str | None = None) -> MultilevelSpec:
    """The wide SEM form of a nested model ``formula`` (lme4 syntax) on ``data``;
    ``index``: the column ordering observations within the innermost group (the
    ``{obs}`` part of the wide column names)."""
    prep, F, levels = _prep_for(formula, data, index)
    table = multilevel_table(prep, F, levels)
    return MultilevelSpec(formula, prep, table, levels, F, index=index)


def to_wide(data, formula: str, *, index: str | None = None) -> pl.DataFrame:
    """The wide form a user sees: one row per top-level unit, one column per slot.

    ``to_wide(data, "y ~ x + (1 | k/j)")`` gives columns ``k, y1_1, y1_2, y2_1,
    ..., x1_1, ...``: ``y{label}_{obs}`` is the outcome of observation ``obs`` in
    the group labelled ``label`` below the top (labels of several levels are
    joined by ``_``: ``y{j}_{h}_{obs}``).  Slots are the data layer's slots, so
    this is exactly the layout the model is fitted on, and the data that
    ``multilevel(formula, data).to_syntax()`` is written for; an absent cell is
    null."""
    return multilevel(formula, data, index=index).to_wide()
