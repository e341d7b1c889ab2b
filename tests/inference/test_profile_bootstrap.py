"""Profile-likelihood intervals against lme4 1.1-31's confint(method = "profile")
(tests/reference/small_sample.json: sd rows squared for variances), and the
parametric bootstrap."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import MlsemError

from conftest import REF

SS = json.loads((REF / "small_sample.json").read_text())
CASES = {"seed_balanced": "y ~ x + (1 | k/j)", "unbalanced": "y ~ x1 + z + (1 | k/j)",
         "pastes": "strength ~ 1 + (1 | batch/cask)",
         "sleepstudy": "Reaction ~ Days + (Days | Subject)"}


def _lme4_name(res, p):
    """lme4's profile row name -> (our name, square it?)."""
    if p == "sigma":
        return "var(Residual)", True
    if p == "(Intercept)":
        return "Intercept", False
    if p.startswith("sd_") or p.startswith("cor_"):
        term, grp = p[3:].split("|") if p.startswith("sd_") else p[4:].split("|")
        top = grp.split(":")[-1]          # lme4 writes j:k for the nested level j
        level = grp.split(":")[0]
        if p.startswith("cor_"):
            b, a = term.split(".")
            a = "Intercept" if a == "(Intercept)" else a
            b = "Intercept" if b == "(Intercept)" else b
            return f"cor({level}:{a},{level}:{b})", False
        eff = "Intercept" if term == "(Intercept)" else term
        single = f"var({level})"
        if single in res.names:
            return single, True
        return f"var({level}:{eff})", True
    return p, False


@pytest.mark.parametrize("case", list(CASES))
def test_profile_intervals_match_lme4(case):
    res = mlsem.fit(REF / f"{case}.parquet", CASES[case])
    ci = res.confint(method="profile")
    assert ci.columns == ["name", "lower", "upper"]
    got = {r["name"]: (r["lower"], r["upper"]) for r in ci.iter_rows(named=True)}
    ref = SS[case]["profile_ci"]
    for p, lo, hi in zip(ref["parameter"], ref["lower"], ref["upper"]):
        name, sq = _lme4_name(res, p)
        if sq:
            lo, hi = lo * lo, hi * hi
        glo, ghi = got[name]
        if lo == 0.0:
            assert glo == 0.0, name             # the profile does not cross: bound at 0
        else:
            assert glo == pytest.approx(lo, rel=1e-3), name
        assert ghi == pytest.approx(hi, rel=1e-3), name
    assert "profile likelihood" in res.summary()
    # every parameter has an interval, named as in res.params
    assert set(res.params["name"]) <= set(got)


def test_profile_of_a_reml_fit_is_the_ml_profile():
    """lme4's confint(profile) on a REML fit refits by ML first (devfun2 calls
    refitML): the intervals of the ML fit, with a note."""
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml")
    ml = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    est = res.estimate.copy()
    got = res.confint(method="profile", parm=["Intercept", "var(batch)"])
    ref = ml.confint(method="profile", parm=["Intercept", "var(batch)"])
    assert np.allclose(got["lower"], ref["lower"], rtol=1e-5, atol=1e-8)
    assert np.allclose(got["upper"], ref["upper"], rtol=1e-5)
    pr = SS["pastes"]["profile_ci"]          # lme4's confint(profile) (of the ML fit)
    assert got["upper"][1] == pytest.approx(pr["upper"][1] ** 2, rel=1e-3)
    assert any("refitted by ML" in n for n in res.notes)
    assert res.method == "REML" and np.array_equal(res.estimate, est)     # the fit is untouched
    assert list(got["name"]) == ["Intercept", "var(batch)"]
    with pytest.raises(MlsemError, match="method="):
        res.confint(method="exact")


def test_wald_confint_is_the_table():
    res = mlsem.fit(REF / "seed_balanced.parquet", CASES["seed_balanced"])
    ci = res.confint()
    tab = res.params
    assert np.allclose(ci["lower"], tab["ci_low"]) and np.allclose(ci["upper"], tab["ci_high"])


@pytest.fixture(scope="module")
def boot_fit():
    res = mlsem.fit(REF / "seed_balanced.parquet", CASES["seed_balanced"])
    draws = res.bootstrap(n=500, seed=20241130, progress=False)
    return res, draws


def test_bootstrap_percentile_interval_of_the_slope(boot_fit):
    """n = 500: the percentile interval of the slope covers the midpoint of
    lme4's profile interval, and its width is within 15% of that interval's."""
    res, draws = boot_fit
    assert draws.height == 500 and res.boot.failed == 0
    assert {"replicate", "converged", *res.names} == set(draws.columns)
    ci = res.confint(method="bootstrap").filter(pl.col("name") == "x").row(0, named=True)
    ref = SS["seed_balanced"]["profile_ci"]
    k = ref["parameter"].index("x")
    lo, hi = ref["lower"][k], ref["upper"][k]
    assert ci["lower"] < 0.5 * (lo + hi) < ci["upper"]
    assert abs((ci["upper"] - ci["lower"]) / (hi - lo) - 1.0) < 0.15
    se = res.boot.std_err
    assert se["x"] == pytest.approx(res.params.filter(pl.col("name") == "x")["std_err"][0], rel=0.15)
    assert "parametric bootstrap" in res.summary()


def test_bootstrap_reproducible():
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    a = res.bootstrap(n=20, seed=7, progress=False)
    b = res.bootstrap(n=20, seed=7, progress=False)
    c = res.bootstrap(n=20, seed=8, progress=False)
    assert a.equals(b)
    assert not a.equals(c)
    d = res.bootstrap(n=20, seed=7, parallel=2, progress=False)   # same draws in workers
    assert a.equals(d)


def test_bootstrap_counts_failed_refits(monkeypatch):
    import mlsem.inference.bootstrap as B
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    real = B.refit
    calls = {"n": 0}

    def flaky(model, y, start, method):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise MlsemError("simulated failure")
        return real(model, y, start, method)
    monkeypatch.setattr(B, "refit", flaky)
    draws = res.bootstrap(n=10, seed=1, progress=False)
    assert draws.height == 10
    assert res.boot.failed == 2 and (~draws["converged"]).sum() == 2
    assert "2 failed" in res.summary()


def test_bootstrap_lr_test_of_a_variance_at_the_boundary():
    d = REF / "pastes.parquet"
    r0 = mlsem.fit(d, "strength ~ 1 + (1 | batch)")
    r1 = mlsem.fit(d, "strength ~ 1 + (1 | batch/cask)")
    lr = mlsem.lrtest(r0, r1, bootstrap=40, seed=3, progress=False)
    assert lr.p_value_bootstrap == pytest.approx(1.0 / 41.0)   # chi2 = 54.6: never reached
    assert "Parametric bootstrap" in str(lr)
    # under the null, about half the bootstrap statistics are 0 (chi-bar-square)
    zeros = np.mean(lr.bootstrap["draws"][lr.bootstrap["converged"]] < 1e-6)
    assert 0.2 < zeros < 0.8


def test_command_line_df_ci_bootstrap(tmp_path, capsys):
    from mlsem.cli import main as cli
    out, js = tmp_path / "r.parquet", tmp_path / "r.json"
    rc = cli.main(["fit", str(REF / "pastes.parquet"), "-f", CASES["pastes"], "--df",
                   "satterthwaite", "--ci", "profile", "--bootstrap", "20", "--seed", "3",
                   "-o", str(out), "--json", str(js), "-q"])
    assert rc == 0
    tab = pl.read_parquet(out)
    assert {"t", "df", "ci_kind", "boot_se"} <= set(tab.columns)
    ref = SS["pastes"]["profile_ci"]
    row = tab.filter(pl.col("name") == "var(batch)").row(0, named=True)
    assert row["ci_low"] == 0.0
    assert row["ci_high"] == pytest.approx(ref["upper"][1] ** 2, rel=1e-3)
    rec = json.loads(js.read_text())
    assert rec["df"] == "satterthwaite" and rec["bootstrap"] == 20 and rec["seed"] == 3
    for bad, msg in ((["--ci", "bootstrap"], "--bootstrap N"),
                     (["--df", "kenward-roger"], "--method reml")):
        capsys.readouterr()
        rc = cli.main(["fit", str(REF / "pastes.parquet"), "-f", CASES["pastes"], *bad,
                       "-o", str(out), "-q"])
        assert rc != 0 and msg in capsys.readouterr().err


def test_reml_bootstrap_warm_refits_are_reml_estimates():
    """A REML replicate (warm-started L-BFGS-B) equals the full REML driver's fit
    of the same simulated data."""
    import mlsem.inference.bootstrap as B
    from mlsem.estimate.reml import optimize_reml
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml")
    draws = res.bootstrap(n=3, seed=11, progress=False)
    assert res.boot.failed == 0
    child = np.random.SeedSequence(11).spawn(3)[1]
    y = B.simulate_y(res.model, res.estimate, np.random.default_rng(child))
    opt, _ = optimize_reml(B.with_outcome(res.model, y))
    got = draws.filter(pl.col("replicate") == 1).select(res.names).row(0)
    assert np.allclose(got, opt.final, rtol=1e-4, atol=1e-6)


def test_reml_bootstrap_near_the_boundary_has_no_failed_refits():
    """A school variance of 0: replicates whose REML optimum is on or near
    the bound (before: 2 of 200 refits failed, the warm start stalled)."""
    import warnings
    d = mlsem.simulate(5, 2, 2, sd_school=0.0, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsem.fit(d, "y ~ x + (1 | k/j)", method="reml")
    res.bootstrap(n=200, seed=1, progress=False)
    assert res.boot.failed == 0


def test_bootstrap_refit_retries_before_failing(monkeypatch):
    """A REML refit that does not converge from the warm start is retried
    from the ML estimates (and from the smallest variance at 0)."""
    import dataclasses
    import mlsem.inference.bootstrap as B
    import mlsem.estimate.reml as R
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml")
    real = R.optimize_reml
    starts = []

    def first_fails(model, maxiter=5000, start=None):
        opt, obj = real(model, maxiter=maxiter, start=start)
        starts.append(start)
        if len(starts) == 1:
            opt = dataclasses.replace(opt, converged=False)
        return opt, obj
    monkeypatch.setattr(R, "optimize_reml", first_fails)
    y = B.simulate_y(res.model, res.estimate, np.random.default_rng(4))
    psi, ll, conv = B.refit(res.model, y, res.estimate, "REML")
    assert conv and len(starts) == 2
    assert not np.allclose(starts[1], res.estimate)          # the ML estimates
    opt, _ = real(B.with_outcome(res.model, y))
    assert np.allclose(psi, opt.final, rtol=1e-4, atol=1e-6)
    z = B._smallest_variance_at_zero(res.model, res.estimate)
    assert np.sum(z == 0.0) == 1 and z[np.argmin(res.estimate[1:3]) + 1] == 0.0


def test_bootstrap_counts_numerical_errors(monkeypatch):
    """A LinAlgError in one refit is counted with the failures, not raised."""
    import mlsem.inference.bootstrap as B
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    real = B.refit
    calls = {"n": 0}

    def singular(model, y, start, method):
        calls["n"] += 1
        if calls["n"] == 3:
            raise np.linalg.LinAlgError("Singular matrix")
        return real(model, y, start, method)
    monkeypatch.setattr(B, "refit", singular)
    draws = res.bootstrap(n=6, seed=1, progress=False)
    assert res.boot.failed == 1 and res.boot.errors == ["LinAlgError: Singular matrix"]
    assert draws.filter(~pl.col("converged")).height == 1
    assert "LinAlgError" in res.summary()
    assert B._STATE == {}


def test_bootstrap_refuses_parallel_zero():
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(MlsemError, match="parallel="):
            res.bootstrap(n=4, seed=1, parallel=bad, progress=False)


def test_summary_labels_only_the_listed_intervals():
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"])
    res.confint(method="profile", parm="var(batch)")
    s = res.summary()
    assert "profile likelihood (95%) for var(batch); Wald for the others" in s
    from mlsem.cli.output import _table
    kinds = dict(zip(*_table(res).select("name", "ci_kind").to_dict(as_series=False).values()))
    assert kinds["var(batch)"].startswith("profile") and kinds["Intercept"] == "wald"
    res.confint(method="profile")
    assert "Confidence intervals: profile likelihood (95%)\n" in res.summary()


def test_params_intervals_are_wald_ci():
    for df in (None, "satterthwaite"):
        res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml", df=df)
        from mlsem.results.fitresult import _wald_ci
        ci, tab = _wald_ci(res, 0.95), res.params
        assert ci["lower"].equals(tab["ci_low"].alias("lower"))
        assert ci["upper"].equals(tab["ci_high"].alias("upper"))
