"""Data layer: survey weights per level and the sampling design per top-level
unit (issue 17), checked and scaled.  The declaration is mlsem.spec.survey's
SurveyDesign; the likelihood that uses the weights is mlsem.model.pseudo and
the design-based variance mlsem.inference.design.

Every error names the column and the offending unit (its ids)."""
from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import MlsemError

SUBPOP = "__mlsem_subpop"


def survey_columns(design, level_cols) -> list:
    """The data columns the design reads (weights, strata, PSU, FPC, subpop)."""
    cols = []
    for key, col in design.weights.items():
        if key != "obs" and key not in level_cols:
            raise MlsemError(f"SurveyDesign: weights key {key!r} is not a grouping column of the "
                             f"formula ({', '.join(level_cols)}) nor 'obs'")
        cols.append(col)
    for c in (design.strata, design.psu, design.fpc if isinstance(design.fpc, str) else None):
        if c is not None:
            cols.append(c)
    cols += subpop_columns(design.subpop)
    return list(dict.fromkeys(cols))


def _subpop_expr(sp):
    if isinstance(sp, pl.Expr):
        return sp
    return None


def subpop_columns(sp) -> list:
    if sp is None:
        return []
    if isinstance(sp, pl.Expr):
        return list(sp.meta.root_names())
    if sp.isidentifier():
        return [sp]
    try:
        return list(pl.sql_expr(sp).meta.root_names())
    except Exception as exc:
        raise MlsemError(f"SurveyDesign: subpop={sp!r} is neither a column name nor an SQL "
                         f"expression Polars can read ({exc})") from None


def subpop_rows(df: pl.DataFrame, sp) -> pl.DataFrame:
    """The rows of ``df`` in the subpopulation ``sp`` (``df`` itself when None);
    an error when it selects no row."""
    if sp is None:
        return df
    mask = subpop_mask(df, sp)
    if not mask.any():
        raise MlsemError(f"SurveyDesign: subpop={sp!r} selects no row")
    return df.filter(pl.Series(mask))


def subpop_mask(df: pl.DataFrame, sp) -> np.ndarray:
    """The rows of ``df`` in the subpopulation (a boolean array)."""
    what = f"subpop={sp!r}" if not isinstance(sp, pl.Expr) else f"subpop={sp}"
    if isinstance(sp, str) and sp.isidentifier():
        s = df[sp]
        if s.null_count():
            raise MlsemError(f"SurveyDesign: subpop column {sp!r} has {s.null_count()} missing value(s)")
        if s.dtype == pl.Boolean:
            return s.to_numpy().astype(bool)
        if s.dtype.is_numeric():
            v = s.cast(pl.Float64).to_numpy()
            if not np.all((v == 0) | (v == 1)):
                raise MlsemError(f"SurveyDesign: subpop column {sp!r} must be boolean or 0/1")
            return v == 1
        raise MlsemError(f"SurveyDesign: subpop column {sp!r} must be boolean or 0/1, not {s.dtype}")
    expr = sp if isinstance(sp, pl.Expr) else pl.sql_expr(sp)
    try:
        s = df.select(expr.alias(SUBPOP))[SUBPOP]
    except Exception as exc:
        raise MlsemError(f"SurveyDesign: {what} cannot be evaluated on the data ({exc})") from None
    if s.dtype != pl.Boolean:
        raise MlsemError(f"SurveyDesign: {what} gives {s.dtype} values, not booleans")
    return s.fill_null(False).to_numpy().astype(bool)


def _unit_text(frame, cols, pos) -> str:
    row = frame.row(int(pos), named=True)
    return ", ".join(f"{c} = {row[c]!r}" for c in cols)


def _check_values(v, col, describe, unit_of=None):
    """Missing, zero, negative or infinite weights: an error naming the first
    unit (``unit_of``: the unit of each value, to count units, not rows)."""
    for bad, what in ((np.isnan(v), "a missing"), (np.isinf(v), "an infinite"),
                      (v < 0, "a negative"), (v == 0, "a zero")):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            n = int(bad.sum()) if unit_of is None else len(np.unique(unit_of[bad]))
            raise MlsemError(f"SurveyDesign: weights column {col!r} has {what} value at "
                             f"{describe(i)} ({n} unit(s) in all); sampling weights "
                             "must be positive and finite")


def level_weights(df: pl.DataFrame, prep, H, design, level_cols) -> list:
    """Per level (top first) the units' conditional weights in the model's
    order, then the observations'; None where the level has none.  Scaled
    within the parent unit as ``design.scale`` says (levels below the top)."""
    frame = prep.meta["frame"]
    L = len(level_cols)
    out = [None] * (L + 1)
    rows = prep.obs_row
    for key, col in design.weights.items():
        d = L if key == "obs" else level_cols.index(key)
        if not df.schema[col].is_numeric():
            raise MlsemError(f"SurveyDesign: weights column {col!r} must be numeric, not {df.schema[col]}")
        v = df[col].cast(pl.Float64).fill_null(float("nan")).to_numpy()[rows]
        if d == L:
            _check_values(v, col, lambda i: "the observation with " + _unit_text(frame, level_cols, i)
                          + f" (data row {int(frame['__mlsem_row'][i]) + 1})")
            out[d] = v.copy()
            continue
        st = H.starts[d]
        cols = level_cols[:d + 1]
        unit_of = np.cumsum(np.isin(np.arange(len(v)), st)) - 1
        _check_values(v, col, lambda i: _unit_text(frame, cols, i), unit_of)  # i: an observation
        lo = np.minimum.reduceat(v, st)
        hi = np.maximum.reduceat(v, st)
        diff = np.flatnonzero(hi != lo)
        if diff.size:
            u = int(diff[0])
            raise MlsemError(f"SurveyDesign: weights column {col!r} (level {key!r}) varies within "
                             f"{_unit_text(frame, cols, st[u])} ({lo[u]:g} to {hi[u]:g}; "
                             f"{diff.size} unit(s) in all): a level's weight must be constant "
                             f"within each of its units")
        out[d] = v[st].copy()
    if design.scale != "none":
        for d in range(1, L + 1):
            if out[d] is None:
                continue
            w = out[d]
            # parent of each unit of level d (the observations' parent: the lowest level)
            par = H.obs_unit if d == L else H.parent[d]
            s1 = np.bincount(par, weights=w)
            if design.scale == "size":
                n = np.bincount(par).astype(float)
                out[d] = w * (n / s1)[par]
            else:
                s2 = np.bincount(par, weights=w * w)
                out[d] = w * (s1 / s2)[par]
    return out


def top_design(df: pl.DataFrame, top: str, design) -> pl.DataFrame:
    """One row per top-level unit (all of the data, before any subpopulation):
    ``top``, ``__stratum``, ``__psu`` and ``__fpc`` (a population count or a
    fraction; null without one), checked: constant within the unit, a PSU in
    one stratum, no missing values."""
    exprs = [pl.col(top)]
    cols = {"__stratum": design.strata, "__psu": design.psu}
    if isinstance(design.fpc, str):
        cols["__fpc"] = design.fpc
    for alias, c in cols.items():
        if c is None:
            continue
        nnull = df[c].null_count()
        if nnull:
            bad = df.filter(pl.col(c).is_null())[top].head(1).to_list()
            raise MlsemError(f"SurveyDesign: column {c!r} has {nnull} missing value(s) "
                             f"(first in {top} = {bad[0]!r})")
        exprs.append(pl.col(c).alias(alias))
    t = df.select(exprs)
    for alias, c in cols.items():
        if c is None:
            continue
        agg = t.group_by(top).agg(pl.col(alias).n_unique().alias("n")).filter(pl.col("n") > 1).sort(top)
        if agg.height:
            u = agg[top][0]
            what = ("is in two PSUs" if alias == "__psu" else
                    f"has more than one value of {c!r}")
            raise MlsemError(f"SurveyDesign: top-level unit {top} = {u!r} {what} "
                             f"(column {c!r} must be constant within each {top}; "
                             f"{agg.height} unit(s) in all)")
    t = t.unique(subset=[top], keep="first").sort(top)
    if design.strata is None:
        t = t.with_columns(pl.lit(1).alias("__stratum"))
    if design.psu is None:
        t = t.with_columns(pl.col(top).alias("__psu"))
    else:
        bad = (t.group_by("__psu").agg(pl.col("__stratum").n_unique().alias("n"),
                                       pl.col("__stratum").unique().sort().alias("s"))
               .filter(pl.col("n") > 1).sort("__psu"))
        if bad.height:
            r = bad.row(0, named=True)
            raise MlsemError(f"SurveyDesign: PSU {design.psu} = {r['__psu']!r} is in two strata "
                             f"({design.strata} = {', '.join(map(repr, r['s'][:4]))}): PSUs must "
                             "nest in strata (give PSUs ids that are unique across strata)")
    if isinstance(design.fpc, str):
        if not t.schema["__fpc"].is_numeric():
            raise MlsemError(f"SurveyDesign: fpc column {design.fpc!r} must be numeric")
        t = t.with_columns(pl.col("__fpc").cast(pl.Float64))
    elif design.fpc is not None:
        t = t.with_columns(pl.lit(float(design.fpc)).alias("__fpc"))
    else:
        t = t.with_columns(pl.lit(None, dtype=pl.Float64).alias("__fpc"))
    return t
