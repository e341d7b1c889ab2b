"""The wide form a user sees: one row per top-level unit, one column per slot.

``to_wide(data, "y ~ x + (1 | k/j)")`` gives columns ``k, y1_1, y1_2, y2_1,
..., x1_1, ...``: ``y{label}_{obs}`` is the outcome of observation ``obs`` in
the group labelled ``label`` below the top (labels of several levels are
joined by ``_``: ``y{j}_{h}_{obs}``).  Slots are the data layer's slots, so
this is exactly the layout the model is fitted on; an absent cell is null.
"""
from __future__ import annotations

import polars as pl

from .data import collect_columns, prepare
from .formula import nest_levels, parse_formula


def to_wide(data, formula: str, *, index: str | None = None, progress=None) -> pl.DataFrame:
    F = parse_formula(formula)
    levels = nest_levels(F)
    level_cols = [lv[-1] for lv in levels]
    effects = {}
    for rt in F.random:
        effects[len(rt.group) - 1] = list(rt.effects)
    cols = F.columns + ([index] if index else [])
    numeric = [F.outcome] + list(F.fixed) + [e for v in effects.values() for e in v if e != "Intercept"]
    df = collect_columns(data, cols, numeric, level_cols)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index)
    if progress is not None and hasattr(progress, "prepared"):
        progress.prepared(prep)
    top = level_cols[0]
    lab = prep.slot_labels
    parts = [pl.col(c).cast(pl.String) for c in level_cols[1:]] + [pl.col("obs").cast(pl.String)]
    names = lab.sort("slot").select(pl.concat_str(parts, separator="_").alias("n"))["n"].to_list()
    xs = [c for c in F.fixed]
    frame = pl.DataFrame({
        top: prep.top_ids.gather(_row_of_obs(prep)),
        "__slot": prep.slot,
        F.outcome: prep.y,
        **{c: df[c].gather(prep.obs_row) for c in xs},
    })
    frame = frame.with_columns(pl.col("__slot").replace_strict(
        list(range(len(names))), names, return_dtype=pl.String).alias("__name"))
    out = None
    for v in [F.outcome] + xs:
        w = frame.pivot(on="__name", index=top, values=v, aggregate_function=None)
        w = w.rename({n: f"{v}{n}" for n in names if n in w.columns})
        w = w.select([top] + [f"{v}{n}" for n in names if f"{v}{n}" in w.columns])
        out = w if out is None else out.join(w, on=top, how="left")
    return out.sort(top)


def _row_of_obs(prep):
    import numpy as np
    counts = np.diff(prep.row_ptr)
    return pl.Series(np.repeat(np.arange(prep.nrows), counts))
