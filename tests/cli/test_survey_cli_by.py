"""mlsem fit --by COL with the survey options: each group is a subpopulation of
the whole design (the group's estimates, standard errors and df from all PSUs),
and --by may name the --strata column."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import SurveyDesign

from test_survey_cli import FORMULA, W, _run


@pytest.fixture(scope="module")
def data():
    return mlsem.example_data("unbalanced_weighted").with_columns(
        ((pl.col("k") - 1) // 50 + 1).alias("stratum"), ((pl.col("k") - 1) // 2 + 1).alias("psu"),
        (((pl.col("k") - 1) // 2) % 2).alias("half"))    # whole PSUs: half of each stratum's


def _cli_by(tmp_path, data, by, *extra):
    data.write_parquet(tmp_path / "d.parquet")
    rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", FORMULA, "--weight", "k=w_k",
                        "--weight", "j=w_j", "--weight", "obs=w_i", "--strata", "stratum",
                        "--psu", "psu", "--by", by, *extra, "--out", "r.parquet",
                        "--json", "r.json", "-q")
    assert rc == 0, err
    return pl.read_parquet(tmp_path / "r.parquet"), json.loads((tmp_path / "r.json").read_text())


def test_by_group_is_a_subpopulation_of_the_whole_design(tmp_path, data):
    """Before the fix each group was fitted as its own (smaller) design: group
    half=1, x1: SE 0.059524 on df 15, against 0.060949 on df 35 in the
    reviewer's design; here own designs would have df 75 - 6 = 69, the whole
    design's is 144."""
    tab, rec = _cli_by(tmp_path, data, "half")
    for h in (0, 1):
        ref = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu",
                                                           subpop=f"half = {h}"))
        got = tab.filter(pl.col("half") == h)
        est = dict(zip(got["name"], got["estimate"]))
        se = dict(zip(got["name"], got["std_err"]))
        for name in ref.names:
            assert est[name] == pytest.approx(ref.coef[name], rel=1e-8), name
            assert se[name] == pytest.approx(ref.std_err[ref.names.index(name)], rel=1e-8), name
        i = ref.names.index("x1")
        assert got.filter(pl.col("name") == "x1")["df"][0] == ref.df[i] == 150 - 6


def test_by_the_strata_column(tmp_path, data):
    """--by stratum (the --strata column) failed: "column 'stratum' is not in the data"."""
    tab, _ = _cli_by(tmp_path, data, "stratum")
    assert sorted(tab["stratum"].unique().to_list()) == sorted(data["stratum"].unique().to_list())
    s1 = tab.filter(pl.col("stratum") == 1)
    ref = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu",
                                                       subpop="stratum = 1"))
    np.testing.assert_allclose(s1["estimate"].to_numpy(), ref.estimate, rtol=1e-8)
    assert s1["status"].to_list() == ["ok"] * len(ref.names)


def test_by_within_a_subpop(tmp_path, data):
    tab, _ = _cli_by(tmp_path, data, "half", "--subpop", "x1 > 0")
    ref = mlsem.fit(data, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu",
                                                       subpop="half = 1 AND x1 > 0"))
    got = tab.filter(pl.col("half") == 1)
    np.testing.assert_allclose(got["estimate"].to_numpy(), ref.estimate, rtol=1e-8)
    np.testing.assert_allclose(got["std_err"].to_numpy(), ref.std_err, rtol=1e-8)


def test_cli_messages_name_command_line_options(tmp_path, data):
    """The design's messages said singleton='certainty' (Python) on the command line."""
    d = data.with_columns(      # county 1 alone in stratum 99: a single PSU (the counties)
        pl.when(pl.col("k") == 1).then(pl.lit(99)).otherwise(pl.col("stratum"))
                       .alias("stratum"))
    d.write_parquet(tmp_path / "d.parquet")
    rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", FORMULA, "--weight", "k=w_k",
                        "--strata", "stratum", "--out", "r.parquet", "-q")
    assert rc == 2, err
    assert "--singleton certainty, scaled or centered" in err and "singleton='" not in err
    assert "SurveyDesign" not in err


def test_cli_index_grouping_column_is_a_clear_error(tmp_path):
    """--index k (a grouping column, not unique within a group) was "internal error
    (DuplicateError)", exit 3 (with or without survey options)."""
    mlsem.example_data().with_columns(pl.lit(1.0).alias("w")).write_parquet(tmp_path / "d.parquet")
    for extra in ([], ["--weight", "k=w"]):
        rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", "y ~ x + (1 | k/j)", "--index", "k",
                            *extra, "--out", "r.parquet", "-q")
        assert rc == 2, err
        assert "internal error" not in err
        assert "index column 'k' has the value 1 more than once" in err
