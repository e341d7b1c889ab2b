"""The survey options of mlsem fit: --weight LEVEL=COL (repeated), --scale,
--strata, --psu, --fpc, --singleton, --subpop; the refused combinations."""
import json
import re

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem import SurveyDesign
from mlsem.cli import main as cli

FORMULA = "y ~ x1 + z + (1 | k/j)"
W = {"k": "w_k", "j": "w_j", "obs": "w_i"}


@pytest.fixture(scope="module")
def fitted():
    d = mlsem.example_data("unbalanced_weighted").with_columns(
        ((pl.col("k") - 1) // 50 + 1).alias("stratum"), ((pl.col("k") - 1) // 2 + 1).alias("psu"))
    return d, mlsem.fit(d, FORMULA, survey=SurveyDesign(weights=W, strata="stratum", psu="psu"))


def _run(tmp_path, *args):
    import contextlib
    import io
    import os
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main([str(a) for a in args])
            except SystemExit as exc:
                rc = exc.code
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def test_cli_survey(tmp_path, fitted):
    d, res = fitted
    d.write_parquet(tmp_path / "d.parquet")
    rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", FORMULA, "--weight", "k=w_k",
                        "--weight", "j=w_j", "--weight", "obs=w_i", "--strata", "stratum",
                        "--psu", "psu", "--out", "r.parquet", "--json", "r.json", "-q")
    assert rc == 0, err
    tab = pl.read_parquet(tmp_path / "r.parquet")
    np.testing.assert_allclose(tab["estimate"].to_numpy(), res.estimate, rtol=1e-10)
    np.testing.assert_allclose(tab["std_err"].to_numpy(), res.std_err, rtol=1e-8)
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["survey"]["psus"] == 150
    rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", FORMULA, "--weight", "j=w_j",
                        "--scale", "size", "--subpop", "z > 0", "--fpc", "0.5",
                        "--out", "s.parquet", "-q")
    assert rc == 0, err
    want = mlsem.fit(d, FORMULA, survey=SurveyDesign(weights={"j": "w_j"}, scale="size",
                                                     subpop="z > 0", fpc=0.5))
    np.testing.assert_allclose(pl.read_parquet(tmp_path / "s.parquet")["std_err"].to_numpy(),
                               want.std_err, rtol=1e-8)


@pytest.mark.parametrize("args,msg", [
    (["--weight", "k"], r"--weight 'k': expected LEVEL=COLUMN"),
    (["--weight", "k=w_k", "--method", "reml"], r"method='reml' with survey="),
    (["--weight", "k=w_k", "--weights", "w_k"], r"weights= and survey= together"),
    (["--weight", "k=w_k", "--df", "satterthwaite"], r"design degrees of freedom"),
    (["--weight", "k=w_k", "--ci", "profile"], r"profile"),
    (["--strata", "stratum", "--dask", "tcp://127.0.0.1:1"], r"--dask"),
    (["--weight", "k=w_k", "--effects", "j:variance=slot"], r"relaxations"),
])
def test_cli_refusals(tmp_path, fitted, args, msg):
    d, _ = fitted
    d.write_parquet(tmp_path / "d.parquet")
    rc, out, err = _run(tmp_path, "fit", "d.parquet", "-f", FORMULA, *args, "--out", "x.parquet", "-q")
    assert rc == 2
    assert re.search(msg, err), err
    assert not (tmp_path / "x.parquet").exists()
