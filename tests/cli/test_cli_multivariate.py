"""``mlsem fit`` with --formula given once per outcome (issue 15)."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from test_cli import run_here

F1, F2 = "y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mv")
    mlsem.example_data("multivariate").write_parquet(d / "mv.parquet")
    return d


def test_fit_two_formulas(data):
    rc, out, err = run_here("fit", "mv.parquet", "-f", F1, "-f", F2, "--index", "i", "--quiet",
                            "--out", "p.parquet", "--json", "f.json", cwd=data)
    assert rc == 0, err
    tab = pl.read_parquet(data / "p.parquet")
    assert "cov(Residual:y1,Residual:y2)" in tab["name"].to_list()
    rec = json.loads((data / "f.json").read_text())
    assert rec["formula"] == [F1, F2]
    ref = mlsem.fit(mlsem.example_data("multivariate"), [F1, F2], index="i")
    assert rec["loglik"] == pytest.approx(ref.loglik, rel=1e-10)


@pytest.mark.parametrize("extra,msg", [
    (["--method", "reml"], "--method reml"),
    (["--df", "satterthwaite"], "--df"),
    (["--effects", "j:variance=slot"], "--effects"),
    (["--by", "k"], "--by"),
])
def test_refused_options(data, extra, msg):
    rc, out, err = run_here("fit", "mv.parquet", "-f", F1, "-f", F2, *extra, "--out", "q.parquet",
                            cwd=data)
    assert rc == 2 and msg in err and "several outcomes" in err
    assert not (data / "q.parquet").exists()


def test_other_commands_refuse_two_formulas(data):
    rc, out, err = run_here("diagram", "mv.parquet", "-f", F1, "-f", F2, "--out", "r.dot",
                            cwd=data)
    assert rc == 2 and "`mlsem fit`, `mlsem ranef` and `mlsem predict` only" in err
    assert not (data / "r.dot").exists()


def test_predict_two_formulas(data):
    rc, out, err = run_here("predict", "mv.parquet", "-f", F1, "-f", F2, "--index", "i", "--se",
                            "--quiet", "--out", "p.parquet", cwd=data)
    assert rc == 0, err
    p = pl.read_parquet(data / "p.parquet")
    assert p.columns == ["k", "j", "row", "outcome", "predicted", "se"]
    d = pl.read_parquet(data / "mv.parquet")
    ref = mlsem.fit(d, [F1, F2], index="i").predict(se=True)
    np.testing.assert_allclose(p["predicted"], ref["predicted"], rtol=1e-8)


def test_outcomes_option(data):
    """--outcomes LEVEL=independent (repeatable) is mlsem.fit's outcomes= (was missing)."""
    rc, out, err = run_here("fit", "mv.parquet", "-f", F1, "-f", F2, "--index", "i", "--quiet",
                            "--outcomes", "k=independent", "--outcomes", "residual=independent",
                            "--out", "o.parquet", "--json", "o.json", cwd=data)
    assert rc == 0, err
    names = pl.read_parquet(data / "o.parquet")["name"].to_list()
    assert "cov(k:y1,k:y2)" not in names and "cov(Residual:y1,Residual:y2)" not in names
    assert "cov(j:y1,j:y2)" in names
    ref = mlsem.fit(mlsem.example_data("multivariate"), [F1, F2], index="i",
                    outcomes={"k": "independent", "residual": "independent"})
    rec = json.loads((data / "o.json").read_text())
    assert rec["loglik"] == pytest.approx(ref.loglik, rel=1e-10)
    rc, out, err = run_here("fit", "--help", cwd=data)
    assert "--outcomes" in out and "independent" in out


@pytest.mark.parametrize("args,msg", [
    (["-f", F1, "-f", F2, "--outcomes", "school=independent"], "'school' is not a level"),
    (["-f", F1, "-f", F2, "--outcomes", "k=diagonal"], "is not one of"),
    (["-f", F1, "-f", F2, "--outcomes", "k"], "is not KEY=VALUE"),
    (["-f", F1, "--outcomes", "k=independent"], "--outcomes k=independent: needs several outcomes"),
])
def test_outcomes_option_refusals(data, args, msg):
    rc, out, err = run_here("fit", "mv.parquet", *args, "--out", "z.parquet", cwd=data)
    assert rc == 2 and msg in err, err
    assert not (data / "z.parquet").exists()


def test_ranef_two_formulas(data):
    """mlsem ranef with --formula once per outcome (refused before): random_effects() of the fit."""
    rc, out, err = run_here("ranef", "mv.parquet", "-f", F1, "-f", F2, "--index", "i", "--quiet",
                            "--outcomes", "j=independent", "--out", "re.parquet", cwd=data)
    assert rc == 0, err
    got = pl.read_parquet(data / "re.parquet")
    want = mlsem.fit(mlsem.example_data("multivariate"), [F1, F2], index="i",
                     outcomes={"j": "independent"}).random_effects()
    assert got.columns == want.columns and got.height == want.height
    assert set(got["effect"].unique()) == {"y1", "y2"}
    assert (got["mean"] - want["mean"]).abs().max() < 1e-8
    rc, out, err = run_here("ranef", "mv.parquet", "-f", F1, "-f", F2, "--effects",
                            "j:variance=slot", "--out", "re2.parquet", cwd=data)
    assert rc == 2 and "--effects" in err and "several outcomes" in err
