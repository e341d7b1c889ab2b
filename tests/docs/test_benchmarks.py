"""Smoke test of the benchmark harness (benchmarks/run.py): a 2,000-row case,
one run, peers skipped.  Not a timing test: it checks that the harness runs,
skips peers with a line saying so, and writes its table, JSON and plot."""
import importlib.util
import json
import os

import pytest
from conftest import ROOT



def load_run():
    spec = importlib.util.spec_from_file_location("mlsem_bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_harness_quick_no_peers(tmp_path, capsys):
    run = load_run()
    payload = run.main(["--quick", "--no-peers", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "skipped all peers: --no-peers" in out
    assert "| case | rows | tool | median seconds | ratio to mlsem | peak memory (MB) |" in out
    (row,) = payload["summary"]
    assert row["tool"] == "mlsem" and row["runs"] == 1 and row["ratio_to_mlsem"] == 1.0
    assert row["rows"] > 1000 and row["median_seconds"] > 0 and row["peak_mb"] > 10
    assert row["loglik"] < 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"][0]["rows"] == row["rows"]
    assert "simulated 2k" in (tmp_path / "results.md").read_text()
    # the plot is tested on its own below, with and without matplotlib
    assert (tmp_path / "times.png").exists() == ("skipped the plot" not in out)


SUMMARY = [{"tool": "mlsem", "rows": 1000, "median_seconds": 0.01},
           {"tool": "mlsem", "rows": 10000, "median_seconds": 0.05},
           {"tool": "lme4", "rows": 1000, "median_seconds": 0.1}]


def test_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    run = load_run()
    run.plot(SUMMARY, str(tmp_path / "times.png"))
    png = (tmp_path / "times.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    run = load_run()
    run.plot(SUMMARY, str(tmp_path / "times.png"))
    assert "skipped the plot: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "times.png").exists()


def test_wide_form_is_the_lavaan_model(tmp_path):
    """The wide SEM form given to OpenMx and lavaan: one row per county, 24 slots
    of the unbalanced case, covariates of empty slots filled with 0."""
    run = load_run()
    assert os.path.exists(run.WIDE_CASE), "tests/reference/unbalanced.parquet is part of the repository"
    csv, lav, spec, nrows, nslots = run.wide_form(run.WIDE_CASE, run.WIDE_FORMULA, str(tmp_path))
    assert (nrows, nslots) == (300, 24)
    model = open(lav).read()
    assert model.count("~~ se*") == 24 and model.count(" ~ c*1 + b_x1*") == 24
    sp = json.load(open(spec))
    assert len(sp["slots"]) == 24 and sorted(set(sp["group"])) == [1, 2, 3, 4]
    import polars as pl
    wide = pl.read_csv(csv, null_values="NA")
    assert wide.height == 300
    assert wide.select(pl.col("^x1_.*$").null_count()).sum_horizontal().item() == 0
    assert wide.select(pl.col("^y_.*$").is_not_null().sum()).sum_horizontal().item() == 2598


def test_harness_multivariate_quick(tmp_path):
    """--multivariate: the bivariate fit against the univariate of the same rows (issue 15)."""
    run = load_run()
    out = run.main(["--multivariate", "--quick", "--out", str(tmp_path)])
    (v,) = out.values()
    assert len(v["univariate"]) == len(v["bivariate"]) == 1
    assert v["ratio"] > 0 and v["bivariate"][0]["loglik"] < v["univariate"][0]["loglik"]
    assert (tmp_path / "multivariate.json").exists()
