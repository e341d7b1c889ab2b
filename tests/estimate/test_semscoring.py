"""Fisher scoring for mlsem.sem (mlsem.estimate.semscoring): fewer evaluations
on the wide SEM of ``unbalanced``, the same optimum as L-BFGS-B (the previous
path) on random SEMs, and the fallbacks, which say so."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.api import semfit
from mlsem.estimate import semscoring
from mlsem.estimate.optimize import optimize

FORMULA = "y ~ x1 + z + (1 | k/j)"


def _lbfgsb(m, start, progress=None):
    return optimize(m, start=start, progress=progress)


def _both(syntax, data):
    """(scoring fit, L-BFGS-B fit) of the same model."""
    new = mlsem.sem(syntax, data)
    old_fit = semfit.scoring_fit
    semfit.scoring_fit = _lbfgsb
    try:
        old = mlsem.sem(syntax, data)
    finally:
        semfit.scoring_fit = old_fit
    return new, old


@pytest.fixture(scope="module")
def unbalanced():
    d = mlsem.example_data("unbalanced")
    spec = mlsem.multilevel(FORMULA, d)
    return spec.to_syntax(), spec.to_wide()


def test_unbalanced_wide_needs_few_evaluations(unbalanced):
    new, old = _both(*unbalanced)
    assert new.opt.message.startswith("Fisher scoring (") and new.converged
    # all evaluations of the fit, the observed information's included (before: 49)
    assert new.model.nevals <= 30 < old.model.nevals
    assert new.loglik == pytest.approx(old.loglik, rel=1e-12)
    assert new.loglik >= old.loglik - 1e-9 * abs(old.loglik)
    np.testing.assert_allclose(new.estimate, old.estimate, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(new.std_err, old.std_err, rtol=1e-5)
    long = mlsem.fit(mlsem.example_data("unbalanced"), FORMULA)
    assert new.loglik == pytest.approx(long.loglik, rel=1e-9)


def test_failure_falls_back_to_lbfgsb_from_the_start(unbalanced, monkeypatch):
    monkeypatch.setattr(semscoring, "expected_information", lambda m, psi: None)
    res = mlsem.sem(*unbalanced)
    assert res.opt.message.startswith("Fisher scoring: no expected information at step 0; "
                                      "L-BFGS-B from the start")
    assert res.converged and res.opt.log[0] == ("fallback", 0, "no expected information at step 0")
    assert res.loglik == pytest.approx(-4302.969604995839, rel=1e-12)


def test_slow_scoring_hands_over_to_lbfgsb():
    """The Holzinger-Swineford CFA does not fit well: the expected information
    is far from the observed Hessian, scoring keeps 45% of its gain per step."""
    from conftest import REF
    import json
    d = pl.read_parquet(REF / "hs_cfa.parquet")
    model = json.loads((REF / "hs_cfa.json").read_text())["sem"]["model"]
    new, old = _both(model, d)
    assert "slow progress" in new.opt.message and "from where scoring stopped" in new.opt.message
    assert new.converged and new.loglik >= old.loglik - 1e-9 * abs(old.loglik)
    np.testing.assert_allclose(new.std_err, old.std_err, rtol=1e-5)


def _random_cfa(rng, scale):
    n, nf, per = int(rng.integers(80, 300)), int(rng.integers(1, 4)), int(rng.integers(3, 5))
    F = rng.standard_normal((n, nf)) @ np.linalg.cholesky(0.5 * np.eye(nf) + 0.5).T
    cols, lines = {}, []
    for f in range(nf):
        names = []
        for j in range(per):
            nm = f"v{f}_{j}"
            y = rng.uniform(0.5, 1.5) * F[:, f] + rng.uniform(0.4, 1.0) * rng.standard_normal(n) + rng.normal()
            y = y * scale
            y[rng.random(n) < 0.15] = np.nan
            cols[nm] = y
            names.append(nm)
        lines.append(f"f{f} =~ " + " + ".join(names))
    return "\n".join(lines), pl.DataFrame(cols).fill_nan(None)


@pytest.mark.parametrize("seed", range(6))
def test_random_cfas_with_missing_cells(seed):
    rng = np.random.default_rng(100 + seed)
    scale = 10.0 ** rng.uniform(-3, 3)
    syntax, d = _random_cfa(rng, scale)
    new, old = _both(syntax, d)
    assert new.converged, new.opt.message
    assert new.loglik >= old.loglik - 1e-9 * abs(old.loglik), (new.loglik, old.loglik, new.opt.message)
    np.testing.assert_allclose(new.estimate, old.estimate, rtol=2e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("name,formula", [("unbalanced_weighted", "y ~ x1 + (1 | k/j)"),
                                          ("sleepstudy", "Reaction ~ Days + (1 | Subject)")])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_multilevel_wide_forms(name, formula, scale):
    d = mlsem.example_data(name)
    out = formula.split("~")[0].strip()
    d = d.with_columns(pl.col(out) * scale)
    spec = mlsem.multilevel(formula, d)
    new, old = _both(spec.to_syntax(), spec.to_wide())
    assert new.converged, new.opt.message
    assert new.loglik >= old.loglik - 1e-9 * abs(old.loglik)
    assert new.loglik == pytest.approx(mlsem.fit(d, formula).loglik, rel=1e-9)
    np.testing.assert_allclose(new.std_err, old.std_err, rtol=1e-4)
