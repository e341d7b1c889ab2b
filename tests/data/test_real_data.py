"""Public data sets nobody here made, as people bring them: factor covariates
(string columns), interactions, I() and poly() transforms, a factor that is
also a grouping level, string ids, random slopes, missing outcomes, 31k rows, and a boundary (singular) random-slope
fit with y in the 1000s (REML from the default start stalls at a corner: the
second start from the ML estimates finds lme4's optimum).
lme4 1.1-31 references made by tests/reference/extra/make_real.R (ML and REML)."""
import json
import math
import re

import polars as pl
import pytest

import mlsem
from conftest import REF

REAL = REF / "real"
CASES = ["chem97", "hsb82", "hsb82_missing", "oats", "oxboys", "singular_slope"]


def lme4_name(name: str) -> str:
    """lme4's coefficient name -> formulaic's (the data's factors are strings,
    so the levels are the strings themselves)."""
    if name == "(Intercept)":
        return "Intercept"
    name = re.sub(r"I\((\w+)\^(\d+)\)", r"I(\1 ** \2)", name)
    name = re.sub(r"(poly\([^)]*\))(\d+)", r"\1[\2]", name)
    for fac, levels in (("gender", ["M"]), ("sector", ["Public"]), ("sx", ["Male"]),
                        ("minrty", ["Yes"]), ("Variety", ["Marvellous", "Victory"]),
                        ("sex", ["M"]), ("stype", ["private", "public"])):
        for lev in levels:
            name = re.sub(rf"\b{fac}{lev}\b", f"{fac}[T.{lev}]", name)
    # a true/false column: R reads it from the CSV as text, Polars as a Boolean
    return name.replace("flagtrue", "flag[T.True]")


def vc_name(row: dict, slopes: bool) -> str:
    grp = row["grp"].split(":")[0]           # lme4's "school:lea" is the school level
    if grp == "Residual":
        return "var(Residual)"
    v1 = "Intercept" if row["var1"] == "(Intercept)" else row["var1"]
    v2 = row.get("var2")
    if v2:
        v2 = "Intercept" if v2 == "(Intercept)" else v2
        return f"cov({grp}:{v1},{grp}:{v2})"
    return f"var({grp}:{v1})" if slopes else f"var({grp})"


def close(a, b, rel, abs_=0.0):
    return abs(a - b) <= max(rel * abs(b), abs_)


@pytest.mark.parametrize("method", ["ml", "reml"])
@pytest.mark.parametrize("case", CASES)
def test_real_data_matches_lme4(case, method):
    ref = json.loads((REAL / f"{case}.json").read_text())
    data = (pl.read_parquet(REAL / f"{case}.parquet") if (REAL / f"{case}.parquet").exists()
            else pl.read_csv(REAL / f"{case}.csv"))
    res = mlsem.fit(data, ref["formula"], method=method)
    r = ref[method]
    assert res.converged, res.opt.message
    assert res.nobs == r["nobs"]
    ll = -0.5 * r["reml_criterion"] if method == "reml" else r["loglik"]
    assert close(res.loglik, ll, 1e-7, 1e-4), (res.loglik, ll)
    est = dict(zip(res.names, res.estimate))
    se = dict(zip(res.names, res.std_err))
    for name, val in r["fixef"].items():
        n = lme4_name(name)
        assert close(est[n], val, 1e-4, 1e-5), (n, est[n], val)
        assert close(se[n], r["se"][name], 1e-3), (n, se[n], r["se"][name])
    slopes = "+" in ref["formula"].split("(")[-1].split("|")[0]
    for row in r["vc"]:
        n = vc_name(row, slopes)
        assert close(est[n], row["vcov"], 1e-3, 1e-6), (n, est[n], row["vcov"])


def test_missing_outcomes_are_counted():
    data = pl.read_parquet(REAL / "hsb82_missing.parquet")
    res = mlsem.fit(data, "mAch ~ meanses*cses + sector + sx + minrty + (1 + cses | school)")
    assert res.missing_outcome == data["mAch"].null_count() > 0
    assert res.nobs == data.height - res.missing_outcome
