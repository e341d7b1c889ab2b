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

from ..data.encode import load
from ..data.multivariate import load_multi, prepare_multi
from ..data.prepare import prepare
from ..errors import MlsemError
from ..spec.formula import effects_of, nest_levels, parse_formula
from ..spec.multivariate import check_structures, multivariate_table, parse_formulas
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
        self._name_parameters(table, prep, allc)

    def _name_parameters(self, table, prep, allc):
        """SEM labels of the parameters (``b_x``, ``var_k``) and names of the latents
        (``L_k``), distinct from each other and from the data columns ``allc``."""
        self.labels, used = {}, set()
        for p in table.params:
            base = f"b_{p.name}" if p.kind == "fixed" else \
                p.name.replace("var(", "var_").replace("cov(", "cov_")
            lb = _ident(base)
            while lb in used:
                lb += "_"
            used.add(lb)
            self.labels[p.name] = lb
        self.latent_names = []
        for nm in prep.latent_names:
            ln = _ident(f"L_{nm}")
            while ln in self.latent_names or ln in allc:
                ln += "_"
            self.latent_names.append(ln)

    def _latent_lines(self, header):
        """The header, the measurement lines (unit loadings) and the latents' (co)variances
        (labels; 0 for a pair without a parameter)."""
        prep, t = self.prep, self.multilevel_table
        P, M = prep.nslots, prep.nlatent
        lines = [header]
        for g in range(M):
            ind = [self.y_cols[s] for s in range(P) if (prep.slot_lat[s] == g).any()]
            lines.append(f"{self.latent_names[g]} =~ " + " + ".join(f"1*{v}" for v in ind))
        done = set()
        for r, c, p in zip(t.phi_row, t.phi_col, t.phi_param):
            a, b = (int(r), int(c)) if r <= c else (int(c), int(r))
            if (a, b) not in done:
                done.add((a, b))
                lines.append(f"{self.latent_names[a]} ~~ {self.labels[t.params[int(p)].name]}*"
                             f"{self.latent_names[b]}")
        for a in range(M):
            for b in range(a + 1, M):
                if (a, b) not in done:
                    lines.append(f"{self.latent_names[a]} ~~ 0*{self.latent_names[b]}")
        return lines

    def _outcome_columns(self, prep):
        """({top id, then each slot's outcome column}, the CSR row of each observation)."""
        nr, P = prep.nrows, prep.nslots
        row_of_obs = np.repeat(np.arange(nr), np.diff(prep.row_ptr))
        Y = np.full((nr, P), np.nan)
        Y[row_of_obs, prep.slot] = prep.y
        cols = {self.top: prep.top_ids}
        for s in range(P):
            cols[self.y_cols[s]] = Y[:, s]
        return cols, row_of_obs

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
        cols, row_of_obs = self._outcome_columns(prep)
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
        lines = self._latent_lines(f"# {self.formula} as a wide SEM: {P} slots, {M} latent variables")
        lab = {i: self.labels[p.name] for i, p in enumerate(t.params)}
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


def multilevel(formula: str, data, *, index: str | None = None, outcomes=None) -> MultilevelSpec:
    """The wide SEM form of a nested model ``formula`` (lme4 syntax) on ``data``;
    ``index``: the column ordering observations within the innermost group (the
    ``{obs}`` part of the wide column names).  A list of formulas (several outcomes,
    ``outcomes=`` as in mlsem.fit): :class:`SeveralOutcomesSpec`."""
    if isinstance(formula, (list, tuple)):
        return multilevel_several(formula, data, index=index, outcomes=outcomes)
    if outcomes is not None:
        raise MlsemError("outcomes= needs several outcomes (a list of formulas)")
    prep, F, levels = _prep_for(formula, data, index)
    table = multilevel_table(prep, F, levels)
    return MultilevelSpec(formula, prep, table, levels, F, index=index)


def to_wide(data, formula: str, *, index: str | None = None, outcomes=None) -> pl.DataFrame:
    """The wide form a user sees: one row per top-level unit, one column per slot.

    ``to_wide(data, "y ~ x + (1 | k/j)")`` gives columns ``k, y1_1, y1_2, y2_1,
    ..., x1_1, ...``: ``y{label}_{obs}`` is the outcome of observation ``obs`` in
    the group labelled ``label`` below the top (labels of several levels are
    joined by ``_``: ``y{j}_{h}_{obs}``).  Slots are the data layer's slots, so
    this is exactly the layout the model is fitted on, and the data that
    ``multilevel(formula, data).to_syntax()`` is written for; an absent cell is
    null."""
    return multilevel(formula, data, index=index, outcomes=outcomes).to_wide()


# ---- several outcomes -------------------------------------------------------------
# The SEM bridge for several outcomes: ``mlsem.multilevel([f1, f2], data)`` writes the
# multivariate nested model as wide data and lavaan syntax, so that
#
#     spec = mlsem.multilevel(["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], d)
#     mlsem.sem(spec.to_syntax(), spec.to_wide())
#
# is the same fit as ``mlsem.fit(d, [...])``.  A slot is a (unit, outcome) cell of the
# data layer (mlsem.data.multivariate): column ``{outcome}_{group labels}_{unit}``; each
# slot loads 1 on its nodes' latents of its outcome (``L_k_y1``), regresses on its own
# outcome's design columns (one column per covariate and slot, shared by the outcomes of
# one unit: a pupil's x is one value), and the slots of one unit have the residual
# covariance R across outcomes.


def _prep_several(formulas, data, index, outcomes):
    Fs, levels = parse_formulas(formulas)
    structures = check_structures(outcomes, [lv[-1] for lv in levels])
    frame, encs = load_multi(data, Fs, levels, index=index)
    prep = prepare_multi(frame, Fs, encs, levels, index=index)
    table = multivariate_table(prep, [F.outcome for F in Fs], structures)
    return prep, table, levels, Fs


class SeveralOutcomesSpec(MultilevelSpec):
    """:class:`mlsem.api.bridge.MultilevelSpec` of a several-outcome model."""

    def __init__(self, formulas, prep, table, levels, Fs, index=None, outcomes=None):
        self.formula = list(formulas)
        self.index = index
        self.outcomes_option = outcomes
        self.prep = prep
        self.multilevel_table = table
        self.levels = levels
        self.F = None
        self.Fs = Fs
        outs = list(table.outcomes)
        nout = len(outs)
        self.sout = np.asarray(prep.meta["sout"])
        self.spup = np.asarray(prep.meta["spup"])
        lab = prep.slot_labels.sort("slot")
        keys = [c for c in lab.columns if c not in ("slot", "obs")]
        self.slot_names, self.y_cols = [], []
        for r in lab.iter_rows(named=True):
            parts = [str(r[c]) for c in keys] + [str((int(r["obs"]) - 1) // nout + 1)]
            self.slot_names.append("_".join(parts))
            self.y_cols.append(_ident(f"{outs[int(self.sout[r['slot']])]}_{'_'.join(parts)}"))
        # design column c of outcome o ("y1:x") -> the covariate's own name ("x")
        self.col_outcome = np.full(len(prep.xnames), -1, dtype=np.int64)
        for o, cols in enumerate(table.beta_cols):
            self.col_outcome[np.asarray(cols, dtype=np.int64)] = o
        self.bare = [n.split(":", 1)[1] for n in prep.xnames]
        self.covariates = sorted({b for b in self.bare if b != "Intercept"}, key=self.bare.index)
        self.x_cols = {c: [_ident(f"{c}_{s}") for s in self.slot_names] for c in self.covariates}
        # the slots of one unit share a covariate column (the same pupil's x)
        allc = self.y_cols + list(dict.fromkeys(c for v in self.x_cols.values() for c in v))
        if len(set(allc)) != len(allc):
            raise MlsemError("the wide column names collide; rename the outcomes or covariates")
        self._name_parameters(table, prep, allc)

    def to_wide(self, data=None) -> pl.DataFrame:
        """One row per top-level unit: the top id, each slot's outcome value, then each
        covariate per slot; null where the cell is empty.  ``data``: another data set
        laid out on this spec's slots (the same slots and design columns)."""
        prep = self.prep
        if data is not None:
            prep = _prep_several(self.formula, data, self.index, self.outcomes_option)[0]
            if prep.nslots != self.prep.nslots or list(prep.xnames) != list(self.prep.xnames):
                raise MlsemError("data: its slots or design columns differ from the spec's; "
                                 "build the spec from this data")
        nr, P = prep.nrows, prep.nslots
        cols, row_of_obs = self._outcome_columns(prep)
        X = np.asarray(prep.X)
        ocell = self.sout[prep.slot]
        for c in self.covariates:
            Xc = np.full((nr, P), np.nan)
            for k, b in enumerate(self.bare):
                if b != c:
                    continue
                mine = ocell == self.col_outcome[k]
                Xc[row_of_obs[mine], prep.slot[mine]] = X[mine, k]
            # the slots of one unit share the covariate's column (named by the unit): it
            # holds the value of whichever of its cells is observed
            for s in range(P):
                name = self.x_cols[c][s]
                have = cols.get(name)
                cols[name] = Xc[:, s] if have is None else np.where(np.isnan(have), Xc[:, s], have)
        df = pl.DataFrame(cols)
        return df.with_columns(pl.exclude(self.top).fill_nan(None)).sort(self.top)

    def to_syntax(self) -> str:
        prep, t = self.prep, self.multilevel_table
        P, M = prep.nslots, prep.nlatent
        lines = self._latent_lines(f"# {' ;; '.join(self.formula)} as a wide SEM: {P} slots, "
                                   f"{M} latent variables")
        lab = {i: self.labels[p.name] for i, p in enumerate(t.params)}
        for s in range(P):
            o = int(self.sout[s])
            terms = []
            for k in np.asarray(t.beta_cols[o], dtype=np.int64):
                lb = lab[int(t.beta_param[k])]
                b = self.bare[k]
                terms.append(f"{lb}*1" if b == "Intercept" else f"{lb}*{self.x_cols[b][s]}")
            lines.append(f"{self.y_cols[s]} ~ " + (" + ".join(terms) if terms else "0*1"))
        Rp = {}
        for r, c, p in zip(t.theta_row, t.theta_col, t.theta_param):
            Rp[(int(r), int(c))] = Rp[(int(c), int(r))] = int(p)
        for s in range(P):
            for s2 in range(s, P):
                if self.spup[s2] != self.spup[s]:
                    continue
                p = Rp.get((int(self.sout[s]), int(self.sout[s2])))
                if p is not None:
                    lines.append(f"{self.y_cols[s]} ~~ {lab[p]}*{self.y_cols[s2]}")
        return "\n".join(lines) + "\n"


def multilevel_several(formulas, data, *, index=None, outcomes=None) -> SeveralOutcomesSpec:
    prep, table, levels, Fs = _prep_several(formulas, data, index, outcomes)
    return SeveralOutcomesSpec(formulas, prep, table, levels, Fs, index=index, outcomes=outcomes)
