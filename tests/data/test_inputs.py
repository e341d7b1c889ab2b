"""Data inputs, id conventions and bad input (each a clear error naming the culprit)."""
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import mlsem
from mlsem import MlsemError
from conftest import REF, load_case

SEED = load_case("seed_balanced")
LL = SEED["lme4"]["loglik"]


@pytest.fixture(scope="module")
def seed():
    return pl.read_parquet(REF / "seed_balanced.parquet")


@pytest.mark.parametrize("kind", ["polars", "lazy", "pandas", "arrow", "csv", "dir", "glob"])
def test_every_input_kind_gives_the_same_fit(seed, kind, tmp_path):
    if kind == "polars":
        data = seed
    elif kind == "lazy":
        data = seed.lazy()
    elif kind == "pandas":
        data = seed.to_pandas()
    elif kind == "arrow":
        data = seed.to_arrow()
    elif kind == "csv":
        data = tmp_path / "d.csv"
        seed.write_csv(data)
    else:
        seed.filter(pl.col("k") <= 50).write_parquet(tmp_path / "a.parquet")
        seed.filter(pl.col("k") > 50).write_parquet(tmp_path / "b.parquet")
        data = tmp_path if kind == "dir" else str(tmp_path / "*.parquet")
    res = mlsem.fit(data, SEED["formula"])
    assert abs(res.loglik - LL) < 1e-6


def test_string_ids_and_global_ids(seed):
    s = seed.with_columns(pl.format("county{}", "k").alias("k"),
                          (pl.col("k") * 100 + pl.col("j")).alias("j"))  # global school id
    res = mlsem.fit(s, SEED["formula"])
    assert abs(res.loglik - LL) < 1e-6
    res2 = mlsem.fit(seed, "y ~ x + (1 | k) + (1 | k:j)")
    assert abs(res2.loglik - LL) < 1e-6


def test_row_order_and_index_column(seed):
    shuffled = seed.sample(fraction=1.0, shuffle=True, seed=3)
    a = mlsem.fit(shuffled, SEED["formula"], index="i")
    b = mlsem.fit(shuffled, SEED["formula"])
    assert abs(a.loglik - LL) < 1e-6 and abs(b.loglik - LL) < 1e-6


def test_four_levels_and_two_levels():
    d = mlsem.simulate(40, (1, 3), (1, 4), seed=5).with_columns(
        ((pl.col("k") - 1) // 4 + 1).alias("l"))
    r4 = mlsem.fit(d, "y ~ x + (1 | l/k/j)")
    assert r4.converged and "var(l)" in r4.names and len(r4.levels) == 3
    r2 = mlsem.fit(d, "y ~ x + (1 | k)")
    assert r2.converged and r2.names == ["Intercept", "x", "var(k)", "var(Residual)"]


def test_null_outcome_is_missing_cell_and_null_covariate_drops(seed):
    d = seed.with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(None).otherwise(pl.col("y")).alias("y"),
        pl.when(pl.int_range(pl.len()) % 11 == 0).then(None).otherwise(pl.col("x")).alias("x"))
    res = mlsem.fit(d, SEED["formula"])
    n_null_x = d["x"].null_count()
    n_null_y_only = d.filter(pl.col("x").is_not_null())["y"].null_count()
    assert res.dropped_covariate == n_null_x
    assert res.missing_outcome == n_null_y_only
    assert res.nobs == 400 - n_null_x - n_null_y_only
    assert "dropped for a missing covariate" in res.summary()
    # the same fit as dropping those rows by hand
    ref = mlsem.fit(d.drop_nulls(["x", "y"]), SEED["formula"])
    assert abs(res.loglik - ref.loglik) < 1e-8


@pytest.mark.parametrize("mutate, formula, match", [
    (lambda d: d.drop("x"), "y ~ x + (1 | k/j)", r"column 'x' is not in the data"),
    (lambda d: d, "y ~ w + (1 | k/j)", r"column 'w' is not in the data"),
    (lambda d: d.with_columns(pl.col("y").cast(pl.String)), "y ~ x + (1 | k/j)", r"column 'y' must be numeric"),
    (lambda d: d.with_columns(pl.when(pl.col("k") == 3).then(None).otherwise(pl.col("j")).alias("j")),
     "y ~ x + (1 | k/j)", r"id column 'j' has 4 null value\(s\), rows 9, 10, 11, 12"),
    (lambda d: d.with_columns(pl.when(pl.col("k") == 2).then(float("inf")).otherwise(pl.col("k").cast(pl.Float64)).alias("k")),
     "y ~ x + (1 | k/j)", r"id column 'k' has non-finite values, rows 5"),
    (lambda d: d.with_columns(pl.when(pl.int_range(pl.len()) == 9).then(float("inf")).otherwise(pl.col("x")).alias("x")),
     "y ~ x + (1 | k/j)", r"column 'x' has infinite or NaN values, rows 10"),
    (lambda d: d.head(0), "y ~ x + (1 | k/j)", r"empty"),
    (lambda d: d, "y ~ x", r"no random term"),
    (lambda d: d, "y ~ x + (1 | k) + (1 | j)", r"crossed"),
    (lambda d: d, "y ~ x + nosuchfn(x) + (1 | k)", r"cannot encode the fixed part 'x \+ nosuchfn\(x\)'.*name 'nosuchfn' is not defined"),
    (lambda d: d, "y x (1 | k)", r"expected 'outcome ~ terms'"),
    (lambda d: d, "y ~ x + (1 | k", r"unbalanced"),
    (lambda d: d.with_columns(pl.lit(2.5).alias("y")), "y ~ x + (1 | k/j)",
     r"outcome 'y' has the one value 2.5 in all 400 rows used for estimation"),
])
def test_bad_input(seed, mutate, formula, match):
    with pytest.raises(MlsemError, match=match):
        mlsem.fit(mutate(seed), formula, index="i")


def test_duplicate_keys_with_index(seed):
    d = pl.concat([seed, seed.head(1)])
    with pytest.raises(MlsemError, match=r"duplicate observations for \(k=1, j=1, i=1\) at rows 1, 401"):
        mlsem.fit(d, SEED["formula"], index="i")


def test_bad_paths_and_options(tmp_path, seed):
    with pytest.raises(MlsemError, match="does not exist"):
        mlsem.fit(tmp_path / "nope.parquet", SEED["formula"])
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(MlsemError, match="cannot read"):
        mlsem.fit(bad, SEED["formula"])
    with pytest.raises(MlsemError, match="vce="):
        mlsem.fit(seed, SEED["formula"], vce="robustish")


def test_results_export(tmp_path, seed):
    res = mlsem.fit(seed, SEED["formula"])
    res.to_parquet(tmp_path / "p.parquet")
    res.to_json(tmp_path / "f.json")
    back = pl.read_parquet(tmp_path / "p.parquet")
    assert back["name"].to_list() == res.names
    import json
    d = json.load(open(tmp_path / "f.json"))
    assert d["loglik"] == pytest.approx(res.loglik) and d["converged"] is True
    assert [g["level"] for g in d["groups"]] == ["k", "j"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "p.parquet"]  # no temp files left
    s = res.summary()
    for piece in ("Number of obs", "var(k)", "var(j)", "var(Residual)", "LR test vs. linear regression",
                  "conservative", "Wald chi2(1)"):
        assert piece in s


def test_zero_variance_is_a_legitimate_answer():
    """Data without school effects (seed 1: the ML estimate of var(j) is on its
    bound): the fit converges AT 0, not near it, and is then the model without
    the school level -- same log-likelihood and estimates as (1 | k) alone."""
    d = mlsem.simulate(60, 2, 3, sd_school=0.0, seed=1)
    res = mlsem.fit(d, "y ~ x + (1 | k/j)")
    assert res.converged
    assert res.coef["var(j)"] == 0.0
    without = mlsem.fit(d, "y ~ x + (1 | k)")
    assert abs(res.loglik - without.loglik) < 1e-8
    for name in ("Intercept", "x", "var(k)", "var(Residual)"):
        assert res.coef[name] == pytest.approx(without.coef[name], rel=1e-5)
    assert "var(j) | 0 (boundary)" in res.summary()


def test_csv_missing_value_codes(seed, tmp_path):
    """R's write.csv writes NA for a missing value: read as null (pandas' set of
    codes); a code that is not one of them is named with its row."""
    d = seed.with_columns(pl.when(pl.col("i") == 1).then(None).otherwise(pl.col("y")).alias("y"))
    ref = mlsem.fit(d, "y ~ x + (1 | k/j)")
    for code in ("NA", "", "NaN", "N/A"):
        path = tmp_path / "na.csv"
        d.write_csv(path, null_value=code)
        res = mlsem.fit(path, "y ~ x + (1 | k/j)")
        assert res.missing_outcome == ref.missing_outcome > 0
        assert res.loglik == pytest.approx(ref.loglik, rel=1e-12)
    d.write_csv(tmp_path / "dot.csv", null_value=".")
    with pytest.raises(MlsemError, match=r"column 'y' must be numeric, but it is String \(row 1 holds '\.'"):
        mlsem.fit(tmp_path / "dot.csv", "y ~ x + (1 | k/j)")


def test_pandas_ids_in_the_index(seed):
    """Ids moved into a pandas index (set_index, groupby) are read as columns."""
    ref = mlsem.fit(seed, "y ~ x + (1 | k/j)")
    res = mlsem.fit(seed.to_pandas().set_index(["k", "j"]), "y ~ x + (1 | k/j)")
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-12)
    # an unnamed (default) index is not a column
    assert mlsem.fit(seed.to_pandas(), "y ~ x + (1 | k/j)").loglik == pytest.approx(ref.loglik, rel=1e-12)
