"""Inputs of make_gmmfix.R (lavaan references of tests/estimate/test_adf.py's review fixes).

Writes tests/reference/gmmfix_multilevel.parquet (the long data of the
multilevel ADF cases, column ``case``) and, into <tmp_dir>, each case's wide
form (mlsem.multilevel(...).to_wide()) and lavaan syntax (.to_syntax()), the
seed's wide form with its weights, and hs_cfa's last 50 rows.
Usage: python make_gmmfix.py <tmp_dir>   (then Rscript make_gmmfix.R <tmp_dir> <out_json>)
"""
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

import mlsem

REF = Path(__file__).resolve().parents[1]
CASES = {
    # a normal covariate (the constant slot-intercept columns tie in the pivoted QR)
    "normal_x": (dict(counties=300, schools=2, pupils=2, seed=1, x="normal"), "y ~ x + (1 | k/j)"),
    # a second covariate with mean square >= 1
    "two_covariates": (dict(counties=200, schools=2, pupils=2, seed=2), "y ~ x + x2 + (1 | k/j)"),
    # a county-level covariate (the same value in every slot)
    "county_covariate": (dict(counties=200, schools=2, pupils=2, seed=3, x="normal"), "y ~ x + z + (1 | k/j)"),
    # three schools: 6 slots
    "six_slots": (dict(counties=250, schools=3, pupils=2, seed=5), "y ~ x + (1 | k/j)"),
}


def case_data(name):
    kw, _ = CASES[name]
    d = mlsem.simulate(**kw)
    rng = np.random.default_rng(100 + kw["seed"])
    d = d.with_columns(x2=pl.Series(rng.normal(1.0, 2.0, d.height)))
    z = pl.DataFrame({"k": pl.Series(np.arange(1, kw["counties"] + 1)).cast(d["k"].dtype),
                      "z": rng.normal(0.5, 1.5, kw["counties"])})
    return d.join(z, on="k", how="left").select("k", "j", "i", "x", "x2", "z", "y")


def main(tmp):
    tmp = Path(tmp)
    frames = []
    for name, (_, formula) in CASES.items():
        d = case_data(name)
        frames.append(d.with_columns(pl.lit(name).alias("case")))
        spec = mlsem.multilevel(formula, d, index="i")
        spec.to_wide().write_csv(tmp / f"{name}.csv")
        (tmp / f"{name}.lav").write_text(spec.to_syntax())
    pl.concat(frames).write_parquet(REF / "gmmfix_multilevel.parquet")
    seed = json.load(open(REF / "seed_balanced.json"))
    long = pl.read_parquet(REF / seed["data"])
    wide = mlsem.to_wide(long, "y ~ x + (1 | k/j)", index="i").join(
        pl.DataFrame(seed["inference"]["weights"]), on="k")
    wide.write_csv(tmp / "seed_wide.csv")
    pl.read_parquet(REF / "hs_cfa.parquet").tail(50).write_csv(tmp / "hs_tail50.csv")
    pl.read_parquet(REF / "hs_cfa.parquet").head(50).write_csv(tmp / "hs_head50.csv")


if __name__ == "__main__":
    main(sys.argv[1])
