"""backend="dask": the same fit with the data spread over Dask workers.

A LocalCluster with 2 worker processes; the distributed fit must equal the
in-process fit (1e-8), from one file or from several files not partitioned by
the top-level id, and survive (or refuse clearly) a worker killed mid-fit.
"""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

pytest.importorskip("distributed", reason="dask[distributed] is not installed (pip install 'mlsem[dask]')")

from dask.distributed import Client, LocalCluster  # noqa: E402

import mlsem  # noqa: E402
from conftest import REF, ROOT, load_case  # noqa: E402

CASES = ["seed_balanced", "unbalanced", "hetero_corr", "pastes", "egsingle", "medium"]


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _two_workers(client):
    client.wait_for_workers(2, timeout=60)


def assert_same_fit(r0, r1, se_rel=1e-6):
    assert r1.converged and r0.converged
    assert abs(r1.loglik - r0.loglik) < 1e-8
    assert r1.names == r0.names
    np.testing.assert_allclose(r1.estimate, r0.estimate, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r1.std_err, r0.std_err, rtol=se_rel)
    assert r1.nobs == r0.nobs
    assert r1.nslots == r0.nslots and r1.npatterns == r0.npatterns
    assert [(lv.name, lv.ngroups, lv.min_obs, lv.max_obs) for lv in r1.levels] == \
        [(lv.name, lv.ngroups, lv.min_obs, lv.max_obs) for lv in r0.levels]
    for a, b in zip(r1.levels, r0.levels):
        assert abs(a.mean_obs - b.mean_obs) < 1e-12 * b.mean_obs
    assert abs(r1.lr_ols["chi2"] - r0.lr_ols["chi2"]) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_reference_case_equals_in_process(client, name):
    _two_workers(client)
    case = load_case(name)
    path = REF / case["data"]
    r0 = mlsem.fit(path, case["formula"])
    r1 = mlsem.fit(path, case["formula"], backend="dask", client=client)
    assert_same_fit(r0, r1)
    # and both match lme4 (the reference itself, not only each other)
    assert abs(r1.loglik - case["lme4"]["loglik"]) < 1e-4 * max(1.0, abs(case["lme4"]["loglik"]) / 1e4)
    assert any(n.startswith("dask: 2 partitions") for n in r1.notes)


RELAXED = [
    # heterogeneous j variances and residual variances by slot label of j
    ("y ~ x + (1 | k/j)", dict(effects={"j": {"variance": "slot"}}, residuals={"variance": "j"})),
    # unstructured j block (Cholesky parameterised), no county effect
    ("y ~ x + (1 | k:j)", dict(effects={"j": {"variance": "slot", "covariance": "unstructured"}})),
    # residual correlation: the dense kernel path and the warm start from the mixed model
    ("y ~ x + (1 | k/j)", dict(residuals={"correlation": "exchangeable"})),
]


def test_formula_with_factors_equals_in_process(client, tmp_path):
    """Factors, an interaction and a transform: the levels of every factor are
    computed over the whole data set and one encoding is applied by every
    partition, also when a level is absent from some files (a file per county
    block; level "d" only in the last counties)."""
    _two_workers(client)
    d = load_case("unbalanced")
    data = pl.read_parquet(REF / d["data"])
    n = data.height
    rng = np.random.default_rng(11)
    g = rng.choice(["a", "b", "c"], n)
    kmax = data["k"].max()
    g = np.where(data["k"].to_numpy() > kmax - 20, "d", g)
    data = data.with_columns(pl.Series("g", g), pl.Series("x2", rng.uniform(1, 3, n)))
    data = data.with_columns((pl.col("y") + 0.5 * (pl.col("g") == "b") - 0.3 * (pl.col("g") == "d")).alias("y"))
    block = data.with_columns((pl.col("k") * 4 // (kmax + 1)).alias("__b"))
    for i, part in enumerate(block.partition_by("__b", maintain_order=True)):
        part.drop("__b").write_parquet(tmp_path / f"part{i}.parquet")
    f = "y ~ x1*g + log(x2) + z + (1 | k/j)"
    r0 = mlsem.fit(data, f)
    r1 = mlsem.fit(str(tmp_path / "*.parquet"), f, backend="dask", client=client)
    assert "g[T.d]" in r1.names and "x1:g[T.d]" in r1.names
    assert_same_fit(r0, r1)
    # the encoding comes back with the result: predictions on new data work alike
    nd = data.head(20)
    np.testing.assert_allclose(r1.predict(nd, random=False)["predicted"].to_numpy(),
                               r0.predict(nd, random=False)["predicted"].to_numpy(), rtol=1e-8)
    with pytest.raises(mlsem.MlsemError, match="stay on the workers"):
        r1.predict(nd)
    with pytest.raises(mlsem.MlsemError, match=r"backend='dask': the transform\(s\) center\(x2\)"):
        mlsem.fit(str(tmp_path / "*.parquet"), "y ~ center(x2) + (1 | k/j)", backend="dask", client=client)


def test_group_specific_coefficients_equal_in_process(client, tmp_path):
    """coefficients=: every partition gets one column per label of the whole data
    set, even a partition where a label does not occur."""
    _two_workers(client)
    df = mlsem.simulate(60, (1, 4), (1, 5), seed=13)
    first = df["k"].min()
    df = df.filter((pl.col("j") < 4) | (pl.col("k") == first))   # label 4 in one county only
    assert df.filter(pl.col("j") == 4)["k"].n_unique() == 1
    d, _ = _write_unpartitioned(tmp_path, df, nfiles=3)
    formula = "y ~ x + (1 | k/j)"
    r0 = mlsem.fit(df, formula, index="i", coefficients={"x": "j"})
    r1 = mlsem.fit(str(d), formula, index="i", coefficients={"x": "j"}, backend="dask",
                   client=client, npartitions=5)
    assert [n for n in r0.names if n.startswith("x[")] == ["x[1]", "x[2]", "x[3]", "x[4]"]
    assert_same_fit(r0, r1)



@pytest.mark.parametrize("formula, relax", RELAXED, ids=["hetero", "unstructured_noU", "exchangeable"])
def test_relaxed_case_equals_in_process(client, formula, relax):
    _two_workers(client)
    path = REF / "hetero_corr.parquet"
    r0 = mlsem.fit(path, formula, vce="oim", **relax)
    r1 = mlsem.fit(path, formula, vce="oim", backend="dask", client=client, **relax)
    m = r1.model            # the relaxed table, built on the driver from the global metadata
    assert m.base_table is not None and m.table.nparams > m.base_table.nparams
    assert_same_fit(r0, r1)
    assert r1.model.table.theta_diagonal == ("correlation" not in relax.get("residuals", {}))


def test_relaxed_errors_reported(client):
    _two_workers(client)
    path = REF / "hetero_corr.parquet"
    with pytest.raises(mlsem.MlsemError, match="unknown level 'jj'"):
        mlsem.fit(path, "y ~ x + (1 | k/j)", effects={"jj": {"variance": "slot"}},
                  backend="dask", client=client)
    with pytest.raises(mlsem.MlsemError, match="'xx' is not a fixed term"):
        mlsem.fit(path, "y ~ x + (1 | k/j)", coefficients={"xx": "j"}, backend="dask", client=client)


def _write_unpartitioned(tmp_path, df, nfiles=8, seed=7):
    """Rows shuffled, then cut into files: every file holds pieces of many
    counties and every county is spread over several files."""
    perm = np.random.default_rng(seed).permutation(df.height)
    shuffled = df[perm]
    d = tmp_path / "ds"
    d.mkdir()
    bounds = np.linspace(0, df.height, nfiles + 1).astype(int)
    for f in range(nfiles):
        shuffled[bounds[f]:bounds[f + 1]].write_parquet(d / f"part-{f}.parquet")
    return d, shuffled


def test_eight_files_not_partitioned_by_top_id(client, tmp_path):
    _two_workers(client)
    df = mlsem.simulate(300, (1, 10), (1, 20), seed=11)       # ~17k rows
    d, shuffled = _write_unpartitioned(tmp_path, df)
    per_file = [pl.read_parquet(f)["k"].unique() for f in sorted(d.glob("*.parquet"))]
    files_per_k = pl.concat(per_file).value_counts()["count"]
    assert files_per_k.max() > 1 and files_per_k.mean() > 2      # not partitioned by k
    formula = "y ~ x + (1 | k/j)"
    # index= makes the slot of an observation independent of the row order
    r0 = mlsem.fit(df, formula, index="i")
    r1 = mlsem.fit(str(d / "*.parquet"), formula, index="i", backend="dask", client=client,
                   npartitions=4)
    assert_same_fit(r0, r1)
    assert any("4 partitions of 8 source(s)" in n for n in r1.notes)
    # a URL (here file://; s3:// and gs:// go through the same fsspec listing)
    r4 = mlsem.fit(f"file://{d}/*.parquet", formula, index="i", backend="dask", client=client)
    assert_same_fit(r0, r4)
    assert any("of 8 source(s)" in n for n in r4.notes)
    # without index=, row order within a school is the files' order, as in-process
    r2 = mlsem.fit(str(d), formula)
    r3 = mlsem.fit(str(d), formula, backend="dask", client=client)
    assert_same_fit(r2, r3)


def _top_ids(part):
    return part.model.prep.top_ids.to_list()


def test_every_top_unit_on_exactly_one_partition(client, tmp_path):
    _two_workers(client)
    from mlsem.backends import dask as distributed
    from mlsem.spec.formula import nest_levels, parse_formula
    df = mlsem.simulate(150, (1, 5), (1, 6), seed=12)
    d, _ = _write_unpartitioned(tmp_path, df)
    F = parse_formula("y ~ x + (1 | k/j)")
    m = distributed.build(str(d), client, F, nest_levels(F), {0: ["Intercept"], 1: ["Intercept"]},
                          None, npartitions=3)
    try:
        ids = client.gather([client.submit(_top_ids, p) for p in m.parts])
        where = {pid: set(client.who_has([p])[p.key]) for pid, p in enumerate(m.parts)}
    finally:
        m.close()
    allk = [k for part in ids for k in part]
    assert len(ids) == 3 and all(ids)
    assert len(allk) == len(set(allk)) == df["k"].n_unique()
    assert set().union(*where.values()) == set(client.ncores())   # spread over both workers


def _kill_one_worker(client):
    addr = sorted(client.ncores())[0]
    pid = client.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)


def test_scheduler_address_instead_of_client(client):
    _two_workers(client)
    df = mlsem.simulate(40, 2, (1, 3), seed=4)
    r0 = mlsem.fit(df, "y ~ x + (1 | k/j)")
    r1 = mlsem.fit(df, "y ~ x + (1 | k/j)", backend="dask", client=client.scheduler.address)
    assert_same_fit(r0, r1)
    assert client.status == "running"          # the caller's client is left alone


def test_worker_killed_mid_fit_is_recovered(client):
    _two_workers(client)
    df = mlsem.simulate(400, (1, 6), (1, 10), seed=5)
    formula = "y ~ x + (1 | k/j)"
    r0 = mlsem.fit(df, formula)
    killed = []

    def progress(it, ll):
        if it == 3 and not killed:
            _kill_one_worker(client)
            killed.append(it)

    r1 = mlsem.fit(df, formula, backend="dask", client=client, progress=progress)
    assert killed
    assert any("rebuilt on another worker" in n for n in r1.notes), r1.notes
    assert_same_fit(r0, r1)


def test_worker_killed_and_partition_cannot_be_rebuilt_fails_clearly(client, tmp_path):
    _two_workers(client)
    df = mlsem.simulate(300, (1, 6), (1, 10), seed=6)
    d, _ = _write_unpartitioned(tmp_path, df, nfiles=3)
    killed = []

    def progress(it, ll):
        if it == 3 and not killed:
            shutil.rmtree(d)                 # the recipe can no longer be followed
            _kill_one_worker(client)
            killed.append(it)

    with pytest.raises(mlsem.MlsemError, match="could not be evaluated or rebuilt.*no result"):
        mlsem.fit(str(d / "*.parquet"), "y ~ x + (1 | k/j)", backend="dask", client=client,
                  progress=progress)
    assert killed


def test_bad_input_is_reported_from_the_workers(client, tmp_path):
    _two_workers(client)
    df = mlsem.simulate(50, 2, 2, seed=1)
    d, _ = _write_unpartitioned(tmp_path, df, nfiles=2)
    with pytest.raises(mlsem.MlsemError, match="'xx' is not in the data"):
        mlsem.fit(str(d), "y ~ xx + (1 | k/j)", backend="dask", client=client)
    bad = df.with_columns(pl.when(pl.col("k") == 3).then(None).otherwise(pl.col("k")).alias("k"))
    with pytest.raises(mlsem.MlsemError, match="id column 'k' has .* null"):
        mlsem.fit(bad, "y ~ x + (1 | k/j)", backend="dask", client=client)


def test_options_refused():
    df = mlsem.simulate(20, 2, 2, seed=1)
    with pytest.raises(mlsem.MlsemError, match="needs client="):
        mlsem.fit(df, "y ~ x + (1 | k/j)", backend="dask")
    with pytest.raises(mlsem.MlsemError, match="neither a dask.distributed.Client"):
        mlsem.fit(df, "y ~ x + (1 | k/j)", backend="dask", client=42)
    from mlsem.backends.dask import connect
    with pytest.raises(mlsem.MlsemError, match="cannot connect to the Dask scheduler at 'tcp://127.0.0.1:9'"):
        connect("tcp://127.0.0.1:9", timeout=1)   # what fit(client="tcp://...") calls
    with pytest.raises(mlsem.MlsemError, match="need backend='dask'"):
        mlsem.fit(df, "y ~ x + (1 | k/j)", client=object())


def test_without_dask_the_backend_says_how_to_install_it(monkeypatch):
    from mlsem.backends import dask as distributed
    monkeypatch.setattr(distributed, "_dd", None)
    with pytest.raises(mlsem.MlsemError, match=r"pip install 'mlsem\[dask\]'"):
        mlsem.fit(mlsem.simulate(20, 2, 2), "y ~ x + (1 | k/j)", backend="dask", client="tcp://x:1")


def test_core_package_does_not_import_dask():
    code = ("import sys, mlsem; mlsem.fit(mlsem.example_data(), 'y ~ x + (1 | k/j)'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_rebuilt_partition_with_other_data_stops_the_fit(client, tmp_path):
    _two_workers(client)
    df = mlsem.simulate(300, (1, 6), (1, 10), seed=8)
    d, shuffled = _write_unpartitioned(tmp_path, df, nfiles=2)
    killed = []

    def progress(it, ll):
        if it == 3 and not killed:
            f = d / "part-0.parquet"
            pl.read_parquet(f).with_columns(pl.col("y") + 1.0).write_parquet(f)
            _kill_one_worker(client)
            killed.append(it)

    with pytest.raises(mlsem.MlsemError, match="data differ from the first read.*no result"):
        mlsem.fit(str(d), "y ~ x + (1 | k/j)", backend="dask", client=client, progress=progress)
    assert killed


@pytest.mark.timeout(300)   # fail after 300 s, never stall the suite
def test_worker_retired_mid_fit(client):
    """A graceful retirement moves the partition (no rebuild); the pinned
    evaluations follow it.  Last in the file: the cluster keeps 1 worker."""
    _two_workers(client)
    df = mlsem.simulate(200, (1, 6), (1, 10), seed=9)
    r0 = mlsem.fit(df, "y ~ x + (1 | k/j)")
    done = []

    def progress(it, ll):
        if it == 3 and not done:
            client.retire_workers([sorted(client.ncores())[0]], close_workers=True)
            done.append(it)

    r1 = mlsem.fit(df, "y ~ x + (1 | k/j)", backend="dask", client=client, progress=progress)
    assert done and len(client.ncores()) == 1
    assert_same_fit(r0, r1)

