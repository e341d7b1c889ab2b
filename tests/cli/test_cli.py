"""The command line end to end: simulate -> Parquet -> fit --by -> results,
and every way a run can fail (exit code, message, no partial output, an
earlier good output left intact).  Runs ``python -m mlsem`` in a subprocess
from the worktree root, so the package under test is the one imported."""
import json
import math
import os
import subprocess
import sys

import polars as pl
import pytest

from mlsem.cli import main as cli
from mlsem.cli import options
from conftest import REF, ROOT

FORMULA = "y ~ x + (1 | k/j)"
TRUTH = {"Intercept": 0.5, "x": 2.0, "var(k)": 1.0, "var(j)": 0.49, "var(Residual)": 1.0}


def run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "mlsem", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def run_here(*args, cwd):
    """The same command in this process (no interpreter start-up): for the many
    quick failure cases.  Returns (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main([str(a) for a in args])
            except SystemExit as exc:   # argparse usage errors
                rc = exc.code
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def leftovers(d):
    return [f for f in os.listdir(d) if f.startswith(".mlsem-")]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    rc, out, err = run("simulate", "--counties", 450, "--schools", "1-4", "--pupils", "1-6",
                       "--intercept", 0.5, "--slope", 2, "--sd-county", 1, "--sd-school", 0.7,
                       "--sd-resid", 1, "--regions", 3, "--seed", 11, "--out", "sim.parquet", cwd=d)
    assert rc == 0, err
    rc, out, err = run("fit", "sim.parquet", "--formula", FORMULA, "--by", "region",
                       "--out", "res.parquet", "--json", "fit.json", cwd=d)
    return d, rc, out, err


def test_simulate_is_deterministic(tmp_path):
    a = run("simulate", "--counties", 30, "--schools", "1-3", "--pupils", "2", "--seed", 4,
            "--out", "a.parquet", cwd=tmp_path)
    b = run_here("simulate", "--counties", 30, "--schools", "1-3", "--pupils", "2", "--seed", 4,
            "--out", "b.parquet", cwd=tmp_path)
    assert a[0] == b[0] == 0
    da, db = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert da.equals(db)
    assert da.columns == ["k", "j", "i", "x", "y"]
    assert da.group_by("k").agg(pl.col("j").n_unique())["j"].is_between(1, 3).all()
    assert da.group_by("k", "j").len()["len"].eq(2).all()


def test_simulate_school_cov_and_normal_x(tmp_path):
    rc, _, err = run_here("simulate", "--counties", 4000, "--schools", "2", "--pupils", "1",
                     "--sd-county", 0, "--sd-resid", 0.0, "--slope", 0, "--x", "normal",
                     "--school-cov", "1.5,0.6;0.6,1.0", "--seed", 2, "--out", "c.parquet", cwd=tmp_path)
    assert rc == 0, err
    d = pl.read_parquet(tmp_path / "c.parquet")
    w = d.pivot(on="j", index="k", values="y")
    import numpy as np
    C = np.cov(w["1"].to_numpy(), w["2"].to_numpy())
    # 4000 draws: sampling sd of a variance ~ v sqrt(2/4000) ~ 0.034 for 1.5
    assert abs(C[0, 0] - 1.5) < 0.15 and abs(C[1, 1] - 1.0) < 0.1 and abs(C[0, 1] - 0.6) < 0.1
    assert abs(d["x"].mean()) < 0.1 and abs(d["x"].std() - 1.0) < 0.1


def test_simulate_bad_options(tmp_path):
    rc, _, err = run_here("simulate", "--schools", "3-x", "--out", "s.parquet", cwd=tmp_path)
    assert rc == 2 and "--schools" in err and "3-x" in err
    rc, _, err = run_here("simulate", "--school-cov", "1,2;3", "--out", "s.parquet", cwd=tmp_path)
    assert rc == 2 and "--school-cov" in err
    rc, _, err = run_here("simulate", "--school-cov", "1,2;2,1", "--schools", "2", "--out", "s.parquet", cwd=tmp_path)
    assert rc == 2 and "positive definite" in err
    assert not (tmp_path / "s.parquet").exists()


def test_pipeline_results_cover_truth(pipeline):
    d, rc, out, err = pipeline
    assert rc == 0, err
    res = pl.read_parquet(d / "res.parquet")
    assert res.columns == ["region", "name", "estimate", "std_err", "z", "p_value", "ci_low", "ci_high", "status"]
    assert sorted(res["region"].unique().to_list()) == [1, 2, 3]
    assert res.height == 3 * len(TRUTH)
    assert (res["status"] == "ok").all()
    # 15 nominal 95% intervals: about 0.75 misses expected, P(more than 2) = 3.6%;
    # and every estimate within its 99.9% interval (P(any miss) = 1.5%), built as
    # the table builds its intervals (log scale for variances)
    misses = []
    for r in res.iter_rows(named=True):
        t = TRUTH[r["name"]]
        if not r["ci_low"] < t < r["ci_high"]:
            misses.append((r["region"], r["name"]))
        z, b, s = 3.2905, r["estimate"], r["std_err"]
        if r["name"].startswith("var("):
            f = math.exp(z * s / b)
            lo, hi = b / f, b * f
        else:
            lo, hi = b - z * s, b + z * s
        assert lo < t < hi, (r["region"], r["name"], lo, hi)
    assert len(misses) <= 2, misses
    # the table a user would get from the Python API on the same group
    import mlsem
    sim = pl.read_parquet(d / "sim.parquet")
    api = mlsem.fit(sim.filter(pl.col("region") == 2).drop("region"), FORMULA).params
    got = res.filter(pl.col("region") == 2).drop("region", "status")
    assert got.select("name").equals(api.select("name"))
    # not bit-identical: the kernel sums patterns over threads in a varying
    # order, so two runs agree to the optimizer's precision, not to the last bit
    assert max(abs(a - b) for a, b in zip(got["estimate"], api["estimate"])) < 1e-7
    # stdout carries the summary tables, stderr the progress
    assert "Random-effects Parameters" in out and "== region = 3 ==" in out
    assert "reshaped:" in err and "missing patterns" in err and "wrote res.parquet" in err


def test_pipeline_json_record(pipeline):
    d, rc, out, err = pipeline
    rec = json.loads((d / "fit.json").read_text())
    import mlsem
    assert rec["mlsem_version"] == mlsem.__version__
    assert rec["command"].startswith("mlsem fit sim.parquet --formula") and "--by region" in rec["command"]
    assert rec["by"] == "region" and rec["ngroups"] == 3 and rec["failed"] == [] and rec["exit_code"] == 0
    assert rec["timings_total"]["total"] > 0
    assert len(rec["fits"]) == 3
    for f in rec["fits"]:
        assert f["region"] in (1, 2, 3)
        assert f["converged"] is True and f["identified"] is True and f["status"] == "ok"
        assert isinstance(f["loglik"], float)
        assert f["optimizer"]["iterations"] > 0 and "message" in f["optimizer"]
        assert f["nobs"] > 0
        assert [g["level"] for g in f["groups"]] == ["k", "j"]
        assert f["groups"][0]["groups"] == 150
        assert f["tests"]["lr_vs_linear_regression"]["df"] == 2
        assert f["tests"]["wald_fixed_effects"]["df"] == 1
        assert {"prepare", "optimize", "inference"} <= set(f["timings"])
        assert [p["name"] for p in f["params"]] == list(TRUTH)


def test_quiet(pipeline):
    d = pipeline[0]
    rc, out, err = run("fit", "sim.parquet", "--formula", FORMULA, "--out", "q.parquet", "--quiet", cwd=d)
    assert rc == 0 and out == "" and err == ""
    assert pl.read_parquet(d / "q.parquet")["status"].to_list() == ["ok"] * 5


def test_by_group_with_one_observation(pipeline, tmp_path):
    d = pipeline[0]
    sim = pl.read_parquet(d / "sim.parquet")
    one = sim.head(1).with_columns(pl.lit(4, dtype=pl.Int64).alias("region"))
    pl.concat([sim, one]).write_parquet(tmp_path / "bad.parquet")
    rc, out, err = run("fit", "bad.parquet", "-f", FORMULA, "--by", "region", "-q",
                       "--out", "r.parquet", "--json", "r.json", cwd=tmp_path)
    assert rc == 1
    assert "region=4: error: data: 1 observation(s) for 4 parameters" in err
    assert "region=4: warning: the fixed-effect design is rank deficient, so 1 column (x) is dropped" in err
    res = pl.read_parquet(tmp_path / "r.parquet")
    bad = res.filter(pl.col("region") == 4)
    assert bad.height == 1 and bad["name"][0] is None and bad["estimate"][0] is None
    assert bad["status"][0].startswith("error: data: 1 observation(s) for 4 parameters")
    good = res.filter(pl.col("region") != 4)
    assert good.height == 15 and (good["status"] == "ok").all()
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["failed"] == [4] and rec["exit_code"] == 1


def test_by_group_that_errors_keeps_the_others(pipeline, tmp_path):
    d = pipeline[0]
    sim = pl.read_parquet(d / "sim.parquet").with_columns(pl.col("y").cast(pl.Float64))
    # region 2: every outcome missing -> the data layer refuses that group
    sim = sim.with_columns(pl.when(pl.col("region") == 2).then(None).otherwise(pl.col("y")).alias("y"))
    sim.write_parquet(tmp_path / "holes.parquet")
    rc, out, err = run("fit", "holes.parquet", "-f", FORMULA, "--by", "region", "-q",
                       "--out", "r.parquet", "--json", "r.json", cwd=tmp_path)
    assert rc == 1
    res = pl.read_parquet(tmp_path / "r.parquet")
    bad = res.filter(pl.col("region") == 2)
    assert bad.height == 1 and bad["name"][0] is None
    assert bad["status"][0].startswith("error: data:") and "'y'" in bad["status"][0]
    assert (res.filter(pl.col("region") != 2)["status"] == "ok").all()
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["failed"] == [2]
    assert [f["region"] for f in rec["fits"]] == [1, 2, 3]


@pytest.fixture()
def good_output(pipeline, tmp_path):
    """A directory with sim.parquet and an earlier good result."""
    d = pipeline[0]
    (tmp_path / "sim.parquet").write_bytes((d / "sim.parquet").read_bytes())
    (tmp_path / "res.parquet").write_bytes((d / "res.parquet").read_bytes())
    (tmp_path / "fit.json").write_bytes((d / "fit.json").read_bytes())
    (tmp_path / "garbage.parquet").write_text("this is not a parquet file")
    pl.read_parquet(d / "sim.parquet").with_columns(pl.lit("a").alias("name")).write_parquet(
        tmp_path / "strings.parquet")
    pl.read_parquet(d / "sim.parquet").with_columns(pl.lit(None, dtype=pl.Float64).alias("x")).write_parquet(
        tmp_path / "nullx.parquet")
    return tmp_path


FAILURES = [
    (["garbage.parquet", "-f", FORMULA], "cannot read 'garbage.parquet'"),
    (["nothere.parquet", "-f", FORMULA], "'nothere.parquet' does not exist"),
    (["sim.parquet", "-f", "y ~ w + (1 | k/j)"], "column 'w' is not in the data"),
    (["sim.parquet", "-f", "y ~ x + (1 | k/j"], "formula: unbalanced '('"),
    (["sim.parquet", "-f", "y ~ x + nosuchfn(x) + (1 | k/j)"], "cannot encode the fixed part 'x + nosuchfn(x)'"),
    (["sim.parquet", "-f", FORMULA, "--by", "county"], "column 'county' is not in the data"),
    (["sim.parquet", "-f", FORMULA, "--vce", "bogus"], "--vce 'bogus'"),
    (["sim.parquet", "-f", FORMULA, "--index", "nope"], "column 'nope'"),
    (["strings.parquet", "-f", "y ~ name + (1 | k/j)", "--by", "region"],
     "column 'name' has one level ('a')"),
    (["sim.parquet", "-f", "y ~ x + (1 | k/j)", "--by", "region", "--index", "region"],
     "--by 'region' is also the --index column"),
    # every --by group refused the same way: bad input (exit 2), not a partial result
    (["nullx.parquet", "-f", FORMULA, "--by", "region"], "no observation has both 'y' and the covariates"),
]


@pytest.mark.parametrize("i", range(len(FAILURES)))
def test_bad_input_exit_2_and_nothing_written(good_output, i):
    args, message = FAILURES[i]
    d = good_output
    before = {f: (d / f).read_bytes() for f in ("res.parquet", "fit.json")}
    runner = run if i == 0 else run_here   # one real process; the rest in this one
    rc, out, err = runner("fit", *args, "--out", "res.parquet", "--json", "fit.json", cwd=d)
    assert rc == 2, err
    assert message in err
    assert "Traceback" not in err
    assert {f: (d / f).read_bytes() for f in before} == before
    assert leftovers(d) == []


def test_unwritable_paths(good_output):
    d = good_output
    rc, _, err = run("fit", "sim.parquet", "-f", FORMULA, "--out", "nodir/res.parquet", cwd=d)
    assert rc == 2 and "nodir" in err and "does not exist" in err
    assert not (d / "nodir").exists()
    # a file where a directory should be
    rc, _, err = run_here("fit", "sim.parquet", "-f", FORMULA, "--out", "sim.parquet/x.parquet", cwd=d)
    assert rc == 2 and "--out" in err
    # the JSON path is checked before any work: the results file is not touched
    before = (d / "res.parquet").read_bytes()
    rc, _, err = run_here("fit", "sim.parquet", "-f", FORMULA, "--out", "res.parquet",
                          "--json", "nodir/fit.json", cwd=d)
    assert rc == 2 and "--json" in err
    assert (d / "res.parquet").read_bytes() == before
    rc, _, err = run_here("fit", "sim.parquet", "-f", FORMULA, "--out", "res.csv", cwd=d)
    assert rc == 2 and "must end with .parquet" in err


def test_write_failure_leaves_earlier_output(good_output, monkeypatch, capsys):
    """A failure while writing (disk full, say) leaves no temporary file and
    the earlier result in place."""
    d = good_output
    before = (d / "res.parquet").read_bytes()
    monkeypatch.chdir(d)

    def broken(self, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    rc = cli.main(["fit", "sim.parquet", "-f", FORMULA, "--out", "res.parquet", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "--out 'res.parquet'" in err
    assert (d / "res.parquet").read_bytes() == before
    assert leftovers(d) == []


def test_usage_errors_exit_2(tmp_path):
    rc, _, err = run("fit", "x.parquet", cwd=tmp_path)
    assert rc == 2 and "--formula" in err
    rc, _, err = run_here("frobnicate", cwd=tmp_path)
    assert rc == 2 and "invalid choice" in err


def test_ranef_and_wide_commands(tmp_path):
    ref = REF / "pastes.parquet"
    rc, out, err = run("ranef", ref, "-f", "strength ~ 1 + (1 | batch/cask)", "-q",
                       "--out", "eff.parquet", cwd=tmp_path)
    assert rc == 0, err
    eff = pl.read_parquet(tmp_path / "eff.parquet")
    assert eff.columns == ["level", "effect", "batch", "cask", "latent", "mean", "sd"]
    assert eff.group_by("level").len().sort("level").rows() == [("batch", 10), ("cask", 30)]
    rc, out, err = run_here("wide", ref, "-f", "strength ~ 1 + (1 | batch/cask)", "-q",
                       "--out", "wide.parquet", cwd=tmp_path)
    assert rc == 0, err
    w = pl.read_parquet(tmp_path / "wide.parquet")
    assert w.columns == ["batch"] + [f"strength{c}_{i}" for c in "abc" for i in (1, 2)]
    long = pl.read_parquet(ref)
    first = long.filter((pl.col("batch") == "B") & (pl.col("cask") == "c"))["strength"].to_list()
    row = w.filter(pl.col("batch") == "B")
    assert [row["strengthc_1"][0], row["strengthc_2"][0]] == first


def test_example_command(tmp_path):
    rc, out, err = run("example", cwd=tmp_path)
    assert rc == 0 and "Log likelihood" in out and "var(Residual)" in out


def test_outputs_get_ordinary_permissions(tmp_path):
    rc, _, err = run_here("simulate", "--counties", 5, "--out", "p.parquet", "-q", cwd=tmp_path)
    assert rc == 0, err
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.parquet").stat().st_mode & 0o777 == 0o666 & ~mask


def test_not_identified_exit_1_results_flagged(tmp_path):
    """One school of one pupil per county: only var(k) + var(j) + var(Residual)
    is identified.  The fit runs, the results are written and flagged, exit 1."""
    rc, _, err = run_here("simulate", "--counties", 60, "--schools", 1, "--pupils", 1, "--seed", 3,
                          "--out", "flat.parquet", "-q", cwd=tmp_path)
    assert rc == 0, err
    rc, out, err = run_here("fit", "flat.parquet", "-f", FORMULA, "--out", "r.parquet",
                            "--json", "r.json", "-q", cwd=tmp_path)
    assert rc == 1
    assert "not identified: confounded var(k), var(j), var(Residual)" in err
    res = pl.read_parquet(tmp_path / "r.parquet")
    assert res.height == 5 and res["status"].str.starts_with("not identified").all()
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["exit_code"] == 1 and rec["identified"] is False
    assert rec["confounded"] == ["var(k)", "var(j)", "var(Residual)"]


def test_directory_of_parquet_files(pipeline, tmp_path):
    """A directory of Parquet parts is one data set: the same fit as the single file."""
    d = pipeline[0]
    sim = pl.read_parquet(d / "sim.parquet").filter(pl.col("region") == 1).drop("region")
    (tmp_path / "parts").mkdir()
    sim.filter(pl.col("k") <= 60).write_parquet(tmp_path / "parts" / "a.parquet")
    sim.filter(pl.col("k") > 60).write_parquet(tmp_path / "parts" / "b.parquet")
    sim.write_parquet(tmp_path / "one.parquet")
    assert run_here("fit", "parts", "-f", FORMULA, "--out", "a.parquet", "-q", cwd=tmp_path)[0] == 0
    assert run_here("fit", "one.parquet", "-f", FORMULA, "--out", "b.parquet", "-q", cwd=tmp_path)[0] == 0
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a["name"].equals(b["name"])
    assert max(abs(x - y) for x, y in zip(a["estimate"], b["estimate"])) < 1e-7  # see above


# ---- relaxation, inference, SEM-syntax and Dask options ---------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """150 counties x 2 schools x 3 pupils, school effects with unequal variances,
    a region column (3 blocks of counties) and a sampling weight per county."""
    import mlsem
    d = tmp_path_factory.mktemp("small")
    sim = mlsem.simulate(150, 2, 3, school_cov=[[1.5, 0.0], [0.0, 0.5]], seed=5, regions=3)
    sim = sim.with_columns((1.0 + (pl.col("k") % 3)).alias("w"))
    sim.write_parquet(d / "s.parquet")
    return d, sim


def _fit_json(d, *args):
    rc, out, err = run_here("fit", "s.parquet", *args, "--out", "r.parquet", "--json", "r.json", "-q", cwd=d)
    assert rc == 0, err
    return pl.read_parquet(d / "r.parquet"), json.loads((d / "r.json").read_text())


def _same_as_api(tab, res):
    assert tab["name"].to_list() == res.names
    for a, b in zip(tab["estimate"], res.estimate):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    for a, b in zip(tab["std_err"], res.std_err):
        assert a == pytest.approx(b, rel=1e-5)


def test_fit_relaxations_end_to_end(small):
    import mlsem
    d, sim = small
    tab, rec = _fit_json(d, "-f", FORMULA, "--effects", "j:variance=slot", "--coefficients", "x=j",
                         "--residuals", "variance=j")
    res = mlsem.fit(sim, FORMULA, effects={"j": {"variance": "slot"}}, coefficients={"x": "j"},
                    residuals={"variance": "j"})
    _same_as_api(tab, res)
    assert "var(j[1])" in res.names and "x[2]" in res.names and "var(Residual[2])" in res.names
    assert rec["loglik"] == pytest.approx(res.loglik, abs=1e-6)
    assert rec["effects"] == {"j": {"variance": "slot"}}
    assert rec["coefficients"] == {"x": "j"} and rec["residuals"] == {"variance": "j"}
    # groups of slot labels and listed covariance pairs, with string labels on int ids
    tab, rec = _fit_json(d, "-f", "y ~ x + (1 | k:j)", "--effects", "j:variance=a=1;b=2,covariance=1-2")
    res = mlsem.fit(sim, "y ~ x + (1 | k:j)",
                    effects={"j": {"variance": {"a": [1], "b": [2]}, "covariance": [(1, 2)]}})
    assert tab["name"].to_list() == ["Intercept", "x", "var(j[a])", "var(j[b])", "cov(j[1],j[2])",
                                     "var(Residual)"]
    _same_as_api(tab, res)
    assert rec["effects"] == {"j": {"variance": {"a": ["1"], "b": ["2"]}, "covariance": [["1", "2"]]}}


def test_effects_grammar():
    assert options.parse_effects(["j:variance=slot,covariance=unstructured"]) == {
        "j": {"variance": "slot", "covariance": "unstructured"}}
    assert options.parse_effects(["j:covariance=1-2;1-3", "h:variance=north=1+2+3;south=4+5"]) == {
        "j": {"covariance": [("1", "2"), ("1", "3")]},
        "h": {"variance": {"north": ["1", "2", "3"], "south": ["4", "5"]}}}
    assert options.parse_effects(["j:covariance=g=1+2;h=3+4"]) == {
        "j": {"covariance": {"g": ["1", "2"], "h": ["3", "4"]}}}
    assert options.parse_residuals("variance=j,correlation=ar1", ["j"]) == {"variance": "j", "correlation": "ar1"}
    assert options.parse_coefficients(["x=j", "z=j"], ["j"], ["Intercept", "x", "z"]) == {"x": "j", "z": "j"}
    assert options.parse_vce("cluster:region") == ("cluster", "region")
    assert options.parse_vce("robust") == "robust"


OPTION_ERRORS = [
    (["--effects", "j"], "--effects 'j': expected LEVEL:KEY=VALUE"),
    (["--effects", "q:variance=slot"], "--effects 'q:variance=slot': unknown level 'q'"),
    (["--effects", "j:variance"], "--effects 'j:variance': 'variance' is not KEY=VALUE"),
    (["--effects", "j:varianse=slot"], "unknown key 'varianse'"),
    (["--effects", "j:variance=each"], "--effects 'j:variance=each': variance='each' is not"),
    (["--effects", "j:covariance=1-2-3"], "pair '1-2-3' is not LABEL-LABEL"),
    (["--effects", "j:variance=a=1+;b=2"], "empty slot label"),
    (["--effects", "j:variance=slot", "--effects", "j:variance=slot"], "'variance' is given twice"),
    (["--effects", "j:covariance=1-3"], "--effects['j']: covariance: level 'j' has no slot label '3'"),
    (["--residuals", "correlation=ar2"], "--residuals 'correlation=ar2': correlation='ar2' is not one of"),
    (["--residuals", "variance=k"], "--residuals 'variance=k': variance='k': not a level below the top"),
    (["--residuals", "shape=round"], "unknown key 'shape'"),
    (["--residuals", "correlation=ar1"], "--residuals: correlation='ar1' needs an observation order"),
    (["--coefficients", "z=j"], "--coefficients: 'z' is not a fixed term of the formula (terms: 'Intercept', 'x')"),
    (["--coefficients", "x"], "--coefficients 'x': 'x' is not KEY=VALUE"),
    (["--coefficients", "x=q"], "--coefficients 'x=q': unknown level 'q'"),
    (["--vce", "cluster:"], "--vce 'cluster:': name the cluster column"),
    (["--vce", "sandwich"], "--vce 'sandwich': expected mixed, oim, robust or cluster:COLUMN"),
    (["--vce", "cluster:nope"], "column 'nope' is not in the data"),
    (["--weights", "nope"], "column 'nope' is not in the data"),
    (["--weights", "x"], "varies within top-level unit"),
    (["--method", "reml", "--vce", "robust"], "method='reml' gives lme4's standard errors only"),
    (["--partitions", "2"], "--partitions 2: needs --dask ADDRESS"),
    (["--by", "region", "--vce", "cluster:region"], "--by 'region' is also the --vce cluster: column"),
]


@pytest.mark.parametrize("i", range(len(OPTION_ERRORS)))
def test_bad_option_values_exit_2(small, i):
    d = small[0]
    args, message = OPTION_ERRORS[i]
    rc, out, err = run_here("fit", "s.parquet", "-f", FORMULA, *args, "--out", "bad.parquet", "-q", cwd=d)
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert not (d / "bad.parquet").exists() and leftovers(d) == []


def test_fit_inference_options_end_to_end(small):
    import mlsem
    d, sim = small
    for cli_args, kw in [(["--vce", "robust"], {"vce": "robust"}),
                         (["--vce", "cluster:region"], {"vce": ("cluster", "region")}),
                         (["--weights", "w"], {"weights": "w"}),
                         (["--method", "reml"], {"method": "reml"})]:
        tab, rec = _fit_json(d, "-f", FORMULA, *cli_args)
        res = mlsem.fit(sim, FORMULA, **kw)
        _same_as_api(tab, res)
        assert rec["loglik"] == pytest.approx(res.loglik, abs=1e-6)
    assert rec["method"] == "reml"
    tab, rec = _fit_json(d, "-f", FORMULA, "--vce", "cluster:region", "--weights", "w")
    assert rec["vce"] == "cluster:region" and rec["weights"] == "w"
    _same_as_api(tab, mlsem.fit(sim, FORMULA, vce=("cluster", "region"), weights="w"))


def test_wide_syntax_out_then_fit_syntax(small):
    """wide --syntax-out writes the wide data and its lavaan syntax; fit --syntax on
    them is the same model as fit --formula on the long data."""
    d, sim = small
    rc, _, err = run_here("wide", "s.parquet", "-f", FORMULA, "--out", "w.parquet",
                          "--syntax-out", "m.lav", "-q", cwd=d)
    assert rc == 0, err
    assert "L_k =~ 1*y1_1" in (d / "m.lav").read_text()
    rc, _, err = run_here("fit", "w.parquet", "--syntax", "m.lav", "--out", "rs.parquet",
                          "--json", "rs.json", "-q", cwd=d)
    assert rc == 0, err
    _, rf = _fit_json(d, "-f", FORMULA)
    rs = json.loads((d / "rs.json").read_text())
    assert rs["loglik"] == pytest.approx(rf["loglik"], abs=1e-6)
    assert rs["syntax"] == "m.lav" and rs["formula"] is None and rs["vce"] == "oim"
    tab = pl.read_parquet(d / "rs.parquet")
    est = dict(zip(tab["name"], tab["estimate"]))
    assert est["var_k"] == pytest.approx(rf["params"][2]["estimate"], rel=1e-5)
    # a model without a plain syntax refuses before writing anything
    rc, _, err = run_here("wide", "s.parquet", "-f", "y ~ x + (1 + x | k)", "--out", "w2.parquet",
                          "--syntax-out", "m2.lav", "-q", cwd=d)
    assert rc == 2 and "definition variables" in err
    assert not (d / "w2.parquet").exists() and not (d / "m2.lav").exists()


def test_fit_syntax_with_by(small):
    d, sim = small
    rc, _, err = run_here("wide", "s.parquet", "-f", FORMULA, "--out", "w.parquet",
                          "--syntax-out", "m.lav", "-q", cwd=d)
    assert rc == 0, err
    region = sim.group_by("k").agg(pl.col("region").first())
    pl.read_parquet(d / "w.parquet").join(region, on="k").write_parquet(d / "wr.parquet")
    rc, _, err = run_here("fit", "wr.parquet", "--syntax", "m.lav", "--by", "region",
                          "--out", "rs.parquet", "--json", "rs.json", "-q", cwd=d)
    assert rc == 0, err
    _, rf = _fit_json(d, "-f", FORMULA, "--by", "region")
    rs = json.loads((d / "rs.json").read_text())
    assert [f["region"] for f in rs["fits"]] == [1, 2, 3]
    for a, b in zip(rs["fits"], rf["fits"]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-6)
    tab = pl.read_parquet(d / "rs.parquet")
    assert tab.columns[0] == "region" and (tab["status"] == "ok").all()
    # usage errors
    for args, message in [(["--syntax", "m.lav", "-f", FORMULA], "exactly one of --formula and --syntax"),
                          ([], "exactly one of --formula and --syntax"),
                          (["--syntax", "m.lav", "--effects", "j:variance=slot"],
                           "--syntax: --effects applies to --formula models only"),
                          (["--syntax", "m.lav", "--vce", "mixed"],
                           "--vce mixed: --syntax models support --vce oim, robust or cluster:COL"),
                          (["--syntax", "m.lav", "--method", "reml"], "--syntax: --method reml applies to --formula"),
                          (["--syntax", "nope.lav"], "--syntax 'nope.lav': cannot read"),
                          (["--syntax", "m.lav", "--by", "y1_1"], "--by 'y1_1' is a variable of the --syntax model")]:
        rc, _, err = run_here("fit", "wr.parquet", *args, "--out", "bad.parquet", "-q", cwd=d)
        assert rc == 2 and message in err, (args, err)
    (d / "broken.lav").write_text("L_k =~ 1*y1_1 +\n")
    rc, _, err = run_here("fit", "wr.parquet", "--syntax", "broken.lav", "--out", "bad.parquet", "-q", cwd=d)
    assert rc == 2 and "Traceback" not in err
    assert not (d / "bad.parquet").exists()


def test_ranef_and_diagram_with_relaxations(small):
    import importlib
    import mlsem
    d, sim = small
    rc, _, err = run_here("ranef", "s.parquet", "-f", FORMULA, "--effects", "j:variance=slot",
                          "--out", "eff.parquet", "-q", cwd=d)
    assert rc == 0, err
    eff = pl.read_parquet(d / "eff.parquet")
    want = mlsem.random_effects(mlsem.fit(sim, FORMULA, effects={"j": {"variance": "slot"}}))
    assert eff["latent"].equals(want["latent"])
    assert max(abs(a - b) for a, b in zip(eff["mean"], want["mean"])) < 1e-6
    # posterior sds differ between the two school slots once their variances do
    sd = eff.filter(pl.col("level") == "j").group_by("latent").agg(pl.col("sd").max()).sort("latent")
    assert sd["sd"][0] != pytest.approx(sd["sd"][1], rel=1e-3)
    rc, _, err = run_here("diagram", "-f", FORMULA, "--design", "3x2", "--effects", "j:covariance=1-2;2-3",
                          "--residuals", "correlation=ar1", "--index", "i", "--out", "m.dot", "-q", cwd=d)
    assert rc == 0, err
    dot = (d / "m.dot").read_text()
    assert "cov(j[1],j[2])" in dot and "cov(j[2],j[3])" in dot and "cov(j[1],j[3])" not in dot
    assert "corr(Residual)" in dot
    dg = importlib.import_module("mlsem.results.diagram")
    assert dot == dg.to_dot(dg.from_formula(FORMULA, (3, 2), effects={"j": {"covariance": [(1, 2), (2, 3)]}},
                                            residuals={"correlation": "ar1"}, index="i"))
    rc, _, err = run_here("diagram", "s.parquet", "-f", FORMULA, "--effects", "j:variance=slot",
                          "--out", "f.dot", "-q", cwd=d)
    assert rc == 0, err
    assert "var(j[1])" in (d / "f.dot").read_text()
    rc, _, err = run_here("ranef", "s.parquet", "-f", FORMULA, "--effects", "j:nope=1",
                          "--out", "eff2.parquet", "-q", cwd=d)
    assert rc == 2 and "--effects 'j:nope=1': unknown key 'nope'" in err


def test_fit_on_dask_scheduler(small):
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster
    import mlsem
    d, sim = small
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        tab, rec = _fit_json(d, "-f", FORMULA, "--dask", cluster.scheduler_address, "--partitions", "2")
    res = mlsem.fit(sim, FORMULA)
    assert rec["loglik"] == pytest.approx(res.loglik, abs=1e-6)
    assert rec["dask"].startswith("tcp://") and rec["partitions"] == 2
    _same_as_api(tab, res)


def test_unreachable_dask_scheduler_exit_2(small):
    pytest.importorskip("dask.distributed")
    d = small[0]
    rc, _, err = run_here("fit", "s.parquet", "-f", FORMULA, "--dask", "tcp://127.0.0.1:1",
                          "--out", "bad.parquet", "-q", cwd=d)
    assert rc == 2 and "cannot connect to the Dask scheduler at 'tcp://127.0.0.1:1'" in err
    assert not (d / "bad.parquet").exists()


def test_closed_stdout_is_not_an_error():
    """`mlsem example | head -1`: the reader closes the pipe early; mlsem ends
    quietly with exit 0 instead of reporting an internal error (exit 3)."""
    out = subprocess.run(["bash", "-c", f'"{sys.executable}" -m mlsem example | head -1; '
                          'echo "status ${PIPESTATUS[0]}"'], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "status 0", out.stdout + out.stderr
    assert "internal error" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
