"""Data layer: the fixed part of a formula and its random slopes as design columns.

The fixed part of ``y ~ standLRT + sex * vr + log(x) + (1 | school)`` is
formulaic's grammar, with R's (lme4's) semantics:

- string, Polars Categorical and boolean columns are factors with treatment
  contrasts; the reference level is the first in sorted order (C locale:
  code-point order; ``False`` before ``True``); a Polars Enum keeps its
  declared order, as an R factor keeps its levels.  Only levels present in
  the estimation rows are levels.  Integer columns stay numeric unless
  wrapped in ``C()``; another reference level is ``C(x, contr.treatment(base=...))``;
- interactions ``a*b``, ``a:b``; transforms ``log(x)``, ``I(x**2)``,
  ``poly(x, 2)``, ``center(x)``, ``scale(x)``; ``0 +`` or ``- 1`` for no intercept;
- column names are formulaic's: ``Intercept``, ``sex[T.M]``, ``x:sex[T.M]``,
  ``poly(x, 2)[1]``.

A random slope ``(1 + log(x) | k)`` is a numeric column or one numeric
transform of one (one design column, named as formulaic names it).

:class:`Encoding` holds formulaic's ModelSpec (the factor levels and the state
of stateful transforms such as ``center``, learned once on the estimation
rows) and applies it to any frame: the data it was learned on, a Dask
partition, or new data for ``predict``.  The design is built once, before the
data layer's reshape (mlsem.data.prepare.prepare reads the encoded columns as plain
covariates), so the per-evaluation cost does not depend on the formula.

Rows with a null in any column the fixed part or a random slope reads get
null design columns (mlsem.data.prepare.prepare drops and counts them); rows whose
outcome is null (missing cells, dropped by prepare) are not encoded.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import replace

import numpy as np
import polars as pl

from ..errors import NAN_HINT, MlsemError, RankDeficiencyWarning

_PLAIN = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


def _rows_text(rows, limit: int = 5) -> str:
    rows = [int(r) + 1 for r in rows]
    s = ", ".join(str(r) for r in rows[:limit])
    if len(rows) > limit:
        s += f", ... ({len(rows)} rows)"
    return s


def _context() -> dict:
    """Names formulaic evaluates besides its own: R's ``factor(x)`` is ``C(x)``."""
    from formulaic.transforms import C
    return {"factor": C}


def _plain(fixed_text: str):
    """(intercept, names) when the fixed part is plain column names, 1, 0 and
    '- 1' only (nothing for formulaic to compute); else None."""
    if not re.fullmatch(r"[A-Za-z0-9_.+\-\s]*", fixed_text):
        return None
    intercept, names = True, []
    for sign, term in re.findall(r"([+-]?)\s*([^+\-\s]+)", fixed_text):
        if term in ("1", "0"):
            intercept = (term == "1") != (sign == "-")
        elif _PLAIN.match(term) and sign != "-":
            names += [term] if term not in names else []
        else:
            return None
    return intercept, names


def _is_factor_type(dt) -> bool:
    return dt == pl.Boolean or dt == pl.String or isinstance(dt, (pl.Categorical, pl.Enum))


def factor_levels(series: pl.Series) -> list:
    """The levels of a factor column, as R orders them: the values present,
    sorted (an Enum: in its declared order)."""
    s = series.drop_nulls()
    dt = series.dtype
    if isinstance(dt, pl.Enum):
        present = set(s.cast(pl.String).unique().to_list())
        return [c for c in dt.categories.to_list() if c in present]
    if dt == pl.Boolean:
        return sorted(set(s.unique().to_list()))
    return sorted(s.cast(pl.String).unique().to_list())


class Encoding:
    """formulaic's encoding of one model's fixed part and random slopes.

    ``names``: the design column names (``Intercept`` first when there is one);
    ``slope_names``: {slope expression: design column name};
    ``factors``: {column: levels} of the factor columns;
    ``numeric``: the numeric columns read."""

    def __init__(self, fixed_text: str, slopes, variables, outcome: str):
        self.fixed_text = fixed_text
        self.slopes = [s for s in dict.fromkeys(slopes) if s != "Intercept"]
        self.variables = list(variables)
        self.outcome = outcome
        self.factors: dict = {}
        self.numeric: list = []
        self.spec = None
        self.slope_specs: dict = {}
        self.names: list = []
        self.slope_names: dict = {}
        self.plain = False   # every design column is a numeric data column (nothing to compute)
        self.dropped: list = []   # design columns dropped as linear combinations of earlier ones
        self._keep = None    # indices of the kept columns among formulaic's (None: all)
        self._learned = None  # (frame, X, slopes) of the rows learned on, for the apply() after learn()

    def __getstate__(self):   # (sent to Dask workers: not the learned matrices)
        d = dict(self.__dict__)
        d["_learned"] = None
        return d

    # ---- state -----------------------------------------------------------------
    @property
    def intercept(self) -> bool:
        return "Intercept" in self.names

    @property
    def fixed(self) -> list:
        return [n for n in self.names if n != "Intercept"]

    @property
    def stateful(self) -> list:
        """Transforms whose state is learned from the data (center, scale, poly)."""
        out = list(getattr(self.spec, "transform_state", None) or {})
        for sp in self.slope_specs.values():
            out += list(getattr(sp, "transform_state", {}) or {})
        return out

    def _types(self, schema):
        factors, numeric = [], []
        for c in self.variables:
            dt = schema[c]
            if dt.is_numeric():
                numeric.append(c)
            elif _is_factor_type(dt):
                factors.append(c)
            else:
                raise MlsemError(
                    f"data: column {c!r} is {dt}: a covariate must be numeric, boolean, string "
                    "or categorical")
        for e in self.slopes:
            read = [e] if _PLAIN.match(e) else [v for v in self.variables if re.search(
                rf"(?<![A-Za-z0-9_.]){re.escape(v)}(?![A-Za-z0-9_.])", e)]
            for v in read:
                if v in factors:
                    raise MlsemError(
                        f"formula: the random slope {e!r} reads {v!r}, which is {schema[v]}: a random "
                        "slope must be a numeric column or a transform of one")
        return factors, numeric

    def learn(self, df: pl.DataFrame, levels: dict | None = None, check_rank: bool = True) -> "Encoding":
        """Learn the encoding on the estimation rows of ``df`` (outcome and every
        covariate observed).  ``levels``: {column: levels} computed elsewhere (on
        the whole data set, for data spread over Dask workers).  ``check_rank``:
        drop design columns that are linear combinations of earlier ones on these
        rows, with a warning, as lme4 does (not for a share of the data)."""
        for c in self.variables:      # (a CSV reader types an empty column as text)
            if df.height and not df.schema[c].is_numeric() and df[c].null_count() == df.height:
                raise MlsemError(f"data: column {c!r} has no values (all {df.height:,} rows are empty)")
        factors, numeric = self._types(df.schema)
        self.numeric = numeric
        self._check_finite(df)
        rows = self._complete(df, with_outcome=True)
        n_used = int(rows.sum())
        sub = df if n_used == df.height else df.filter(rows)   # (no copy when every row is used)
        if levels is not None:
            self.factors = {c: list(levels[c]) for c in factors}
        else:
            self.factors = {c: factor_levels(sub[c]) for c in factors}
        if sub.height == 0:
            raise MlsemError(f"data: no observation has both {self.outcome!r} and the covariates observed")
        if self.outcome in sub.columns and sub.height > 1:
            y = sub[self.outcome]
            lo, hi = y.min(), y.max()
            if lo is not None and lo == hi:
                raise MlsemError(
                    f"data: the outcome {self.outcome!r} has the one value {lo!r} in all {sub.height:,} rows "
                    "used for estimation: there is no variance to model")
        for c, lv in self.factors.items():
            if len(lv) < 2:
                raise MlsemError(
                    f"data: column {c!r} has one level ({', '.join(map(repr, lv))}) in the rows used for "
                    "estimation: a factor needs two or more (as in R, contrasts need two levels)")
        plain = _plain(self.fixed_text)
        if (plain is not None and all(c in numeric for c in plain[1])
                and all(_PLAIN.match(e) and e in numeric for e in self.slopes)):
            # numeric columns read as they are: the design is the data's own columns,
            # nothing to learn (formulaic is not needed)
            self.plain = True
            self.spec = None
            self.names = (["Intercept"] if plain[0] else []) + plain[1]
            self.slope_names = {e: e for e in self.slopes}
            if check_rank:
                n = sub.height
                self._drop([None if c == "Intercept" else sub[c].cast(pl.Float64).to_numpy()
                            for c in self.names], n)
            return self
        import formulaic

        def learn_on(rows):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    return formulaic.model_matrix(self.fixed_text, self._pandas(rows),
                                                  na_action="ignore", context=_context())
                except MlsemError:
                    raise
                except Exception as exc:
                    raise MlsemError(f"formula: cannot encode the fixed part {self.fixed_text!r}: "
                                     f"{type(exc).__name__}: {exc}") from None
        mm = learn_on(sub)
        self.spec = mm.model_spec
        self.names = [str(c) for c in mm.columns]
        X = np.asarray(mm, dtype=np.float64)
        if check_rank and self._drop(X):
            X = X[:, self._keep]
        if "Intercept" in self.names and self.names[0] != "Intercept":
            raise MlsemError(f"internal: formulaic put the intercept at column "
                             f"{self.names.index('Intercept')} of {self.fixed_text!r}")
        pdf = None
        learned_S = {}
        for e in self.slopes:
            if _PLAIN.match(e) and e in numeric:
                self.slope_names[e] = e
                continue
            if pdf is None:
                pdf = self._pandas(sub)
            try:
                smm = formulaic.model_matrix("0 + " + e, pdf, na_action="ignore",
                                             context=_context())
            except Exception as exc:
                raise MlsemError(f"formula: cannot encode the random slope {e!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
            if smm.shape[1] != 1:
                raise MlsemError(
                    f"formula: the random slope {e!r} gives {smm.shape[1]} design columns "
                    f"({', '.join(map(str, smm.columns))}): a random slope must be one numeric "
                    "column or transform")
            self.slope_specs[e] = smm.model_spec
            self.slope_names[e] = str(smm.columns[0])
            learned_S[self.slope_names[e]] = np.asarray(smm, dtype=np.float64)[:, 0]
        # the matrices just built are the design of these rows: apply(df) reuses them
        self._learned = (df, X, learned_S)
        taken = set(df.columns) - set(numeric)
        for n in self.fixed + list(self.slope_names.values()):
            if n in taken:
                raise MlsemError(f"formula: the design column {n!r} has the name of the data column "
                                 f"{n!r}, which is not a numeric covariate; rename that column")
        return self

    def _drop(self, X, n=None) -> bool:
        """Drop the columns of the design ``X`` (of the estimation rows; see
        mlsem.data.rank) that are linear combinations of earlier ones; True if any was."""
        from .rank import deficient_columns
        bad = deficient_columns(X, n)
        if not bad:
            return False
        self.dropped = [self.names[j] for j in bad]
        self._keep = [j for j in range(len(self.names)) if j not in set(bad)]
        self.names = [self.names[j] for j in self._keep]
        k = len(bad)
        warnings.warn(
            f"the fixed-effect design is rank deficient, so {k} column{'s' if k > 1 else ''} "
            f"({', '.join(self.dropped)}) {'are' if k > 1 else 'is'} dropped: each is a linear "
            "combination of the columns before it in the estimation rows (as lme4 drops them)",
            RankDeficiencyWarning, stacklevel=4)
        return True

    def dropped_note(self) -> str | None:
        """The results' note on the dropped design columns (None if none)."""
        dropped = getattr(self, "dropped", None)
        if not dropped:
            return None
        return (f"{', '.join(dropped)} dropped from the fixed part: a linear combination of the design "
                "columns before it in the estimation rows (the design is rank deficient; lme4 drops "
                "such columns too)")

    def resolve(self, F):
        """The Formula ``F`` with the design's names (``fixed``, ``intercept``,
        the random slopes' names) filled in."""
        random = tuple(replace(rt, effects=tuple(self.slope_names.get(e, e) for e in rt.effects))
                       for rt in F.random)
        return replace(F, fixed=tuple(self.fixed), intercept=self.intercept, random=random,
                       encoded=True)

    # ---- application -----------------------------------------------------------
    def _check_finite(self, df):
        floats = [c for c in self.numeric if df.schema[c].is_float()]
        if not floats:
            return
        # one pass says whether any value is not finite; the rows are listed only then
        row = df.select([(pl.col(c).is_infinite() | pl.col(c).is_nan()).any().alias(c)
                         for c in floats]).row(0)
        for c, suspect in zip(floats, row):
            if suspect:
                bad = np.flatnonzero((df[c].is_infinite() | df[c].is_nan()).fill_null(False).to_numpy())
                if len(bad):
                    raise MlsemError(f"data: column {c!r} has infinite or NaN values, rows {_rows_text(bad)}"
                             f"{NAN_HINT}")

    def _complete(self, df, with_outcome: bool) -> pl.Series:
        cols = list(self.variables) + ([self.outcome] if with_outcome and self.outcome in df.columns else [])
        if not cols:
            return pl.Series(np.ones(df.height, dtype=bool))
        return df.select(pl.all_horizontal([pl.col(c).is_not_null() for c in cols])).to_series()

    def _pandas(self, sub: pl.DataFrame, rows=None):
        """``sub`` as the pandas frame formulaic reads; ``rows``: the row numbers
        of ``sub`` in the user's data (for messages)."""
        import pandas as pd
        data = {}
        for c in self.variables:
            s = sub[c]
            if c in self.factors:
                levels = self.factors[c]
                if s.dtype == pl.Boolean:
                    lookup = np.full(2, -1, dtype=np.int32)
                    for i, lv in enumerate(levels):
                        lookup[int(lv)] = i
                    codes = lookup[s.cast(pl.Int8).to_numpy()]
                else:
                    if not _is_factor_type(s.dtype):
                        raise MlsemError(f"data: column {c!r} is {s.dtype}, but the model was fitted with "
                                         f"it as a factor (levels {', '.join(map(str, levels))})")
                    codes = s.cast(pl.String).replace_strict(
                        [str(v) for v in levels], list(range(len(levels))), default=-1,
                        return_dtype=pl.Int32).to_numpy()
                bad = np.flatnonzero(codes < 0)
                if len(bad):
                    unseen = list(dict.fromkeys(s.gather(bad[:20]).to_list()))
                    at = bad if rows is None else np.asarray(rows)[bad]
                    raise MlsemError(
                        f"data: column {c!r} has the level {unseen[0]!r}, which the model was not fitted "
                        f"with (levels: {', '.join(map(repr, levels))}), rows {_rows_text(at)}")
                data[c] = pd.Categorical.from_codes(codes, categories=levels)
            else:
                if not s.dtype.is_numeric():
                    raise MlsemError(f"data: column {c!r} must be numeric as in the fitted model, but it "
                                     f"is {s.dtype}")
                data[c] = s.to_numpy()
        return pd.DataFrame(data, index=pd.RangeIndex(sub.height))

    def _matrix(self, spec, pdf, what):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mm = spec.get_model_matrix(pdf, na_action="ignore", context=_context())
        for w in caught:
            if "categories outside" in str(w.message) or "not seen" in str(w.message):
                raise MlsemError(f"data: {what}: {w.message}")
        return mm

    def design(self, df: pl.DataFrame, with_outcome: bool = True):
        """(rows, X, S): the boolean mask of the encoded rows, the fixed design
        (encoded rows x len(names)) and the slope columns {name: values}."""
        self._check_finite(df)
        rows = self._complete(df, with_outcome)
        sub = df.filter(rows)
        idx = np.flatnonzero(rows.to_numpy())
        learned, self._learned = self._learned, None
        if self.spec is None:      # plain numeric columns
            X = np.empty((sub.height, len(self.names)))
            for j, n in enumerate(self.names):
                X[:, j] = 1.0 if n == "Intercept" else sub[n].cast(pl.Float64).to_numpy()
            S, pdf = {}, None
        elif learned is not None and learned[0] is df and with_outcome:
            X, S = learned[1], dict(learned[2])
            pdf = None
        else:
            pdf = self._pandas(sub, idx)
            X = np.asarray(self._matrix(self.spec, pdf, f"the fixed part {self.fixed_text!r}"),
                           dtype=np.float64)
            keep = getattr(self, "_keep", None)
            names = list(map(str, self.spec.column_names))
            if (names if keep is None else [names[j] for j in keep]) != self.names:  # pragma: no cover
                raise MlsemError("internal: the encoding's column names changed")
            if keep is not None:
                X = X[:, keep]
            S = {}
        for e, name in self.slope_names.items():
            if name in S:
                continue
            if e in self.slope_specs:
                S[name] = np.asarray(self._matrix(self.slope_specs[e], pdf, f"the random slope {e!r}"),
                                     dtype=np.float64)[:, 0]
            else:
                S[name] = sub[e].cast(pl.Float64).to_numpy()
        for j, n in enumerate(self.names):
            bad = np.flatnonzero(~np.isfinite(X[:, j]))
            if len(bad):
                raise MlsemError(f"data: the design column {n!r} is not finite (log of a value <= 0?) "
                                 f"at rows {_rows_text(idx[bad])}")
        for n, v in S.items():
            bad = np.flatnonzero(~np.isfinite(v))
            if len(bad):
                raise MlsemError(f"data: the random slope {n!r} is not finite at rows "
                                 f"{_rows_text(idx[bad])}")
        return rows.to_numpy(), X, S

    def apply(self, df: pl.DataFrame, with_outcome: bool = True, _checked: bool = False) -> pl.DataFrame:
        """``df`` with the design columns added (numeric covariates read as they
        are).  A row with a null covariate gets nulls; with ``with_outcome`` a row
        whose outcome is null (a missing cell) is not encoded and gets zeros."""
        if self.plain:
            if not _checked:             # (encode: learn() has just checked this frame)
                self._check_finite(df)   # the design is the data's own numeric columns
            return df
        rows, X, S = self.design(df, with_outcome)
        n = df.height
        incomplete = ~self._complete(df, False).to_numpy()
        cols = []
        added = {}
        for j, name in enumerate(self.names):
            if name != "Intercept":
                added[name] = X[:, j]
        added.update(S)
        for name, v in added.items():
            if name in self.numeric:
                continue          # the data column itself (same values)
            full = np.zeros(n)
            full[rows] = v
            full[incomplete] = np.nan
            cols.append(pl.Series(name, full, nan_to_null=True))
        return df.with_columns(cols) if cols else df


def encode(df: pl.DataFrame, F, levels: dict | None = None):
    """(frame with the design columns, the resolved Formula, the Encoding)."""
    slopes = [e for rt in F.random for e in rt.effects]
    enc = Encoding(F.fixed_text, slopes, F.variables, F.outcome).learn(df, levels)
    return enc.apply(df, _checked=True), enc.resolve(F), enc


def outcome_column(df: pl.DataFrame, F) -> pl.DataFrame:
    """``df`` with the column of a transformed outcome (``log(Reaction) ~ ...``:
    F.outcome is the expression, F.outcome_vars the columns it reads) computed
    through formulaic as R computes it; a null input gives a null (a missing cell)."""
    if not getattr(F, "outcome_vars", ()):
        return df
    import formulaic
    from ..spec.formula import formulaic_text
    import pandas as pd
    pdf = pd.DataFrame({c: df[c].cast(pl.Float64).to_numpy() for c in F.outcome_vars})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mm = formulaic.model_matrix("0 + " + formulaic_text(F.outcome), pdf, na_action="ignore",
                                        context=_context())
    except Exception as exc:
        raise MlsemError(f"formula: cannot compute the outcome {F.outcome!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    if mm.shape[1] != 1:
        raise MlsemError(f"formula: the outcome {F.outcome!r} gives {mm.shape[1]} columns; it must be one")
    y = np.asarray(mm, dtype=np.float64)[:, 0]
    observed = df.select(pl.all_horizontal([pl.col(c).is_not_null() for c in F.outcome_vars])).to_series()
    bad = np.flatnonzero(observed.to_numpy() & ~np.isfinite(y))
    if len(bad):
        raise MlsemError(f"data: the outcome {F.outcome!r} is not finite (log of a value <= 0?) at rows "
                         f"{_rows_text(bad)}")
    return df.with_columns(pl.Series(F.outcome, y, nan_to_null=True))


def load(data, F, extra=(), numeric=(), encoding=None):
    """Read the formula's columns (and ``extra``) once and encode them: (frame,
    resolved Formula, Encoding).  ``numeric``: extra columns that must be numeric;
    ``encoding``: apply this one (learned on other data) instead of learning one."""
    from .prepare import collect_columns
    cols = list(F.columns)
    for c in extra:
        if c and c not in cols:
            cols.append(c)
    ids = list(dict.fromkeys(c for rt in F.random for c in rt.group))
    df = collect_columns(data, cols, [*(F.outcome_vars or (F.outcome,)), *numeric], ids)
    df = outcome_column(df, F)
    if encoding is not None:
        return encoding.apply(df), encoding.resolve(F), encoding
    return encode(df, F)
