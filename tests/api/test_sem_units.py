"""The delta-method standard error of a defined parameter does not depend on the units
of the variables.  Before the fix the difference step was 1e-6 x max(|psi|, 1): with x2
and x3 in units 1e5 times smaller, loadings ~1e-5 were stepped by a tenth of
themselves and the SE of a ratio of loadings was off by ~1%."""
import os

import polars as pl
import pytest

import mlsem

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference")
MODEL = "visual =~ x1 + a*x2 + b*x3\ntextual =~ x4 + x5 + x6\nratio := a / b"


def test_defined_parameter_se_follows_the_units():
    d = pl.read_parquet(os.path.join(REF, "hs_cfa_missing.parquet"))
    base = {x["lhs"]: x for x in mlsem.sem(MODEL, d).defined}["ratio"]
    small = d.with_columns(pl.col("x2") * 1e-5, pl.col("x3") * 1e-5)
    got = {x["lhs"]: x for x in mlsem.sem(MODEL, small).defined}["ratio"]
    assert got["est"] == pytest.approx(base["est"], rel=1e-5)
    assert got["se"] == pytest.approx(base["se"], rel=1e-4)
