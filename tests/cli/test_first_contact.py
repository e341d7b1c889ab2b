"""First-contact failures a new user met (issue 12 part 5), each fixed."""
import hashlib
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.cli.main import main


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_fit_test_refuses_design_wider_than_units():
    data = mlsem.simulate(20, (1, 5), (1, 10), seed=1)
    res = mlsem.fit(data, "y ~ x + (1 | k/j)")
    with pytest.raises(mlsem.MlsemError, match=r"regressors .* for 20 top-level units.*more parameters"):
        res.fit_test()


@pytest.mark.parametrize("cmd", ["fit", "wide"])
def test_output_that_is_the_input_is_refused(tmp_path, monkeypatch, capsys, cmd):
    monkeypatch.chdir(tmp_path)
    mlsem.example_data().write_parquet("d.parquet")
    before = _md5("d.parquet")
    # the same file by another spelling
    for out in ("d.parquet", "./d.parquet", str(tmp_path / "d.parquet")):
        rc = main([cmd, "d.parquet", "--formula", "y ~ x + (1 | k/j)", "--out", out, "--quiet"])
        assert rc == 2
        assert "refusing to overwrite the data being read" in capsys.readouterr().err
    assert _md5("d.parquet") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]   # no partial output


def test_output_inside_an_input_directory_or_glob_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dd").mkdir()
    mlsem.example_data().write_parquet("dd/a.parquet")
    for data in ("dd", "dd/*.parquet"):
        rc = main(["fit", data, "--formula", "y ~ x + (1 | k/j)", "--out", "dd/a.parquet", "-q"])
        assert rc == 2
        assert "is the input DATA" in capsys.readouterr().err
        rc = main(["fit", data, "--formula", "y ~ x + (1 | k/j)", "--out", "dd/new.parquet", "-q"])
        assert rc == 2
    rc = main(["fit", "dd", "--formula", "y ~ x + (1 | k/j)", "--out", "res.parquet", "-q"])
    assert rc == 0 and (tmp_path / "res.parquet").exists()


def test_write_error_names_the_path_given():
    res = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)")
    with pytest.raises(FileNotFoundError, match=r"cannot write '/missing/dir/x.json': its directory does not exist"):
        res.to_json("/missing/dir/x.json")
    with pytest.raises(FileNotFoundError, match="/missing/dir/x.parquet"):
        res.to_parquet("/missing/dir/x.parquet")


def test_empty_column_and_header_only_csv(tmp_path):
    (tmp_path / "h.csv").write_text("k,j,x,y\n")
    with pytest.raises(mlsem.MlsemError, match=r"the data set is empty \(0 rows\)"):
        mlsem.fit(str(tmp_path / "h.csv"), "y ~ x + (1 | k/j)")
    (tmp_path / "e.csv").write_text("k,j,x,y\n1,1,,1.0\n1,2,,2\n2,1,,3\n")
    with pytest.raises(mlsem.MlsemError, match=r"column 'x' has no values \(all 3 rows are empty\)"):
        mlsem.fit(str(tmp_path / "e.csv"), "y ~ x + (1 | k/j)")


def test_summary_shows_long_names_whole():
    long = "a_covariate_with_a_rather_long_name"
    data = mlsem.example_data().rename({"x": long, "k": "county_identifier_long"})
    res = mlsem.fit(data, f"y ~ {long} + (1 | county_identifier_long/j)")
    text = res.summary()
    lines = text.splitlines()
    assert any(ln.startswith(f"{long} | ") for ln in lines)
    assert any(ln.strip().startswith("var(county_identifier_long) | ") for ln in lines)
    assert any(ln.startswith("county_identifier_long | ") for ln in lines)


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_default_vcov_is_complete(method):
    res = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)", method=method)
    V = res.cov
    assert np.all(np.isfinite(V))
    fixed = np.array([k == "fixed" for k in res.kinds])
    assert np.all(V[np.ix_(fixed, ~fixed)] == 0.0)
    assert np.all(np.diag(V) > 0)
    assert "the covariances" in type(res).vcov.__doc__
