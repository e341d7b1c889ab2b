"""Scores for make_survey_design.R (tests/test_survey_design.py).

Fits y ~ x1 + z + (1 | k/j) on unbalanced_weighted with the design of
``design_data`` (strata: ceiling(k / 50), PSUs: pairs of counties
ceiling(k / 2), FPC: population PSUs per stratum 30 + 5 h, or the fraction
0.1 h; a singleton stratum variant where PSU 150 is its own stratum 7) and
writes, per case, the weighted per-county scores w_k s_k with k, psu, stratum
and fpc to <out_dir>/<case>.csv.  Usage: python make_survey_design.py <out_dir>
"""
import sys

import numpy as np
import polars as pl

import mlsem
from mlsem import SurveyDesign

FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


def design_data():
    d = mlsem.example_data("unbalanced_weighted")
    d = d.with_columns(((pl.col("k") - 1) // 50 + 1).alias("stratum"),
                       ((pl.col("k") - 1) // 2 + 1).alias("psu"))
    d = d.with_columns((30 + 5 * pl.col("stratum")).alias("npop"),
                       (0.1 * pl.col("stratum")).alias("frac"),
                       pl.when(pl.col("psu") == 150).then(7).otherwise(pl.col("stratum")).alias("stratum1"))
    return d


CASES = {
    "fpc_count": dict(strata="stratum", psu="psu", fpc="npop"),
    "fpc_fraction": dict(strata="stratum", psu="psu", fpc="frac"),
    "no_fpc": dict(strata="stratum", psu="psu"),
    "singleton_certainty": dict(strata="stratum1", psu="psu", singleton="certainty"),
    "singleton_scaled": dict(strata="stratum1", psu="psu", singleton="scaled"),
    "singleton_centered": dict(strata="stratum1", psu="psu", singleton="centered"),
    "subpop": dict(strata="stratum", psu="psu", fpc="npop", subpop="z > 0"),
}


def case_fit(name, data=None):
    d = design_data() if data is None else data
    return mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=W, **CASES[name]))


def score_frame(res, data):
    """Weighted scores of every county of the design (0 outside a subpopulation)."""
    sv = res.survey
    d = sv.design
    Sw = sv.scores * sv.top_weights[:, None]
    fr = pl.DataFrame({"k": sv.top_ids}).with_columns(
        [pl.Series(f"s{i}", Sw[:, i]) for i in range(Sw.shape[1])])
    units = data.group_by("k").agg(pl.col(d.psu).first().alias("psu"),
                                   pl.col(d.strata).first().alias("stratum"),
                                   (pl.col(d.fpc).first() if d.fpc else pl.lit(None)).alias("fpc"))
    out = units.join(fr, on="k", how="left").fill_null(0.0).sort("k")
    return out


if __name__ == "__main__":
    out = sys.argv[1]
    data = design_data()
    for name in CASES:
        res = case_fit(name, data)
        score_frame(res, data).write_csv(f"{out}/{name}.csv")
        print(name, res.converged, np.round(res.estimate, 6))
