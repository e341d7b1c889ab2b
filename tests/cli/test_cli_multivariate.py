"""``mlsem fit`` with --formula given once per outcome (issue 15)."""
import json

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
    (["--vce", "robust"], "--vce robust"),
    (["--effects", "j:variance=slot"], "--effects"),
    (["--by", "k"], "--by"),
])
def test_refused_options(data, extra, msg):
    rc, out, err = run_here("fit", "mv.parquet", "-f", F1, "-f", F2, *extra, "--out", "q.parquet",
                            cwd=data)
    assert rc == 2 and msg in err and "several outcomes" in err
    assert not (data / "q.parquet").exists()


def test_other_commands_refuse_two_formulas(data):
    rc, out, err = run_here("ranef", "mv.parquet", "-f", F1, "-f", F2, "--out", "r.parquet",
                            cwd=data)
    assert rc == 2 and "mlsem fit` only" in err
