"""The speed-ups keep results identical (not timing tests: those are in
benchmarks/).  Each shortcut is checked against the long way round."""
import numpy as np
import pytest
import polars as pl

import mlsem
from conftest import REF
from mlsem.estimate import grouped
from mlsem.estimate import optimize as estimate
from mlsem.data.prepare import collect_columns, prepare
from mlsem.spec.formula import nest_levels, parse_formula
from mlsem.model.multilevel import SERIAL_BELOW, Model, _core
from mlsem.spec.table import multilevel_table


def build(path, formula, nthreads=None):
    F = parse_formula(formula)
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    df = collect_columns(path, F.columns, [F.outcome] + list(F.fixed), [lv[-1] for lv in levels])
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects)
    return prep, Model(prep, multilevel_table(prep, F, levels), nthreads=nthreads)


def test_reused_newton_hessian_equals_a_fresh_one():
    """The information taken from the polish's last Hessian (a negligible step
    away) gives the standard errors of a Hessian computed at the estimate."""
    prep, model = build(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)")
    opt = estimate.optimize(model)
    assert opt.hessian is not None
    n0 = model.nevals
    reused = estimate.information(model, opt.final, opt)
    assert model.nevals == n0                      # no evaluation spent
    fresh = estimate.information(model, opt.final)
    # one pass for the exact Phi block, two gradients for each other parameter
    assert model.nevals == n0 + 1 + 2 * (len(opt.final) - len(model.hess_params))
    se_r = np.sqrt(np.diag(np.linalg.inv(reused)))
    se_f = np.sqrt(np.diag(np.linalg.inv(fresh)))
    np.testing.assert_allclose(se_r, se_f, rtol=1e-5)


def test_information_is_recomputed_after_a_real_step():
    prep, model = build(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)")
    opt = estimate.optimize(model)
    moved = opt.final * (1 + 1e-3)
    n0 = model.nevals
    estimate.information(model, moved, opt)
    assert model.nevals == n0 + 1 + 2 * (len(opt.final) - len(model.hess_params))


def test_layout_is_deterministic():
    """Pattern numbering and row order do not depend on hash order: the same
    data give the same CSR layout (and so the same sums and iterations)."""
    a, _ = build(REF / "medium.parquet", "y ~ x + (1 | k/j)")
    b, _ = build(REF / "medium.parquet", "y ~ x + (1 | k/j)")
    for name in ("row_ptr", "pat_ptr", "slot", "y", "X", "obs_row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_observation_index_follows_row_order():
    """Without ``index`` the slot of an observation is its position in its
    (k, j) group in row order, whatever the order of the groups in the file."""
    df = pl.DataFrame({"k": [2, 1, 2, 1, 2], "j": [1, 1, 1, 1, 2],
                       "y": [5.0, 1.0, 6.0, 2.0, 7.0], "x": [0.0, 0.1, 0.2, 0.3, 0.4]})
    F = parse_formula("y ~ x + (1 | k/j)")
    prep = prepare(df, "y", ["x"], True, nest_levels(F), {0: ["Intercept"], 1: ["Intercept"]})
    obs = dict(zip(prep.obs_row.tolist(), prep.slot_labels["obs"].gather(prep.slot).to_list()))
    assert obs == {0: 1, 2: 2, 4: 1, 1: 1, 3: 2}


def test_small_data_default_to_one_thread():
    prep, model = build(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)")
    assert prep.nobs < SERIAL_BELOW and model.nthreads == 1
    _, big = build(REF / "medium.parquet", "y ~ x + (1 | k/j)")
    assert big.nthreads >= 1
    _, forced = build(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)", nthreads=2)
    assert forced.nthreads == 2


def test_fused_kernel_threads_agree():
    """1 and 2 threads (fused residuals and X'w) give the same log-likelihood
    and gradient up to summation order."""
    if _core is None or not _core.HAVE_OPENMP:
        pytest.skip("the compiled kernel has no OpenMP here: one thread only, nothing to compare")
    _, m1 = build(REF / "medium.parquet", "y ~ x + (1 | k/j)", nthreads=1)
    _, m2 = build(REF / "medium.parquet", "y ~ x + (1 | k/j)", nthreads=2)
    psi = estimate.start_values(m1)
    l1, g1 = m1.evaluate(psi)
    l2, g2 = m2.evaluate(psi)
    assert abs(l1 - l2) < 1e-7 * abs(l1)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-6)


def test_fit_end_to_end_unchanged_by_threads():
    r1 = mlsem.fit(REF / "medium.parquet", "y ~ x + (1 | k/j)", nthreads=1)
    r2 = mlsem.fit(REF / "medium.parquet", "y ~ x + (1 | k/j)", nthreads=2)
    assert abs(r1.loglik - r2.loglik) < 1e-6
    np.testing.assert_allclose(r1.estimate, r2.estimate, rtol=1e-6)


def test_stalled_lbfgsb_handed_to_newton_gives_the_same_fit(monkeypatch):
    """egsingle: L-BFGS-B stalls at rounding level; stopping it there (and
    letting the Newton polish finish) gives the fit of running it to its end."""
    path, formula = REF / "egsingle.parquet", "math ~ year + (1 | schoolid/childid)"
    _, m1 = build(path, formula)
    # whether L-BFGS-B meets rounding before its own stopping rule depends on
    # the last bits of the start values and the units (issue 12 changed both);
    # a gain threshold of 1e-10 (relative) makes the rule fire near the optimum
    # on this case whatever the rounding, so that the mechanism is what is tested
    monkeypatch.setattr(estimate, "STALL_REL", 1e-10)
    o1 = estimate.optimize(m1)
    monkeypatch.setattr(estimate, "STALL_REL", 1e-13)
    assert "stalled" in o1.message and o1.converged
    monkeypatch.setattr(estimate, "STALL_EVALS", 10**9)
    _, m2 = build(path, formula)
    o2 = estimate.optimize(m2)
    assert "stalled" not in o2.message and o2.converged
    assert m1.nevals < m2.nevals
    assert abs(o1.loglik - o2.loglik) < 1e-8
    np.testing.assert_allclose(o1.final, o2.final, rtol=1e-7, atol=1e-9)


UNST = {"effects": {"j": {"variance": "slot", "covariance": "unstructured"}}}


def _unst_fit(monkeypatch=None, **consts):
    """The unstructured fit on the L-BFGS-B driver (the Newton path of mlsem.model.unst
    switched off: these tests are about the driver's early switch to Newton)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "why_not_unst", lambda model: "switched off for this test")
        if monkeypatch is not None:
            for k, v in consts.items():
                monkeypatch.setattr(estimate, k, v)
        return mlsem.fit(REF / "medium.parquet", "y ~ x + (1 | k:j)", **UNST)


def test_newton_takes_over_where_the_hessian_is_cheap(monkeypatch):
    """An unstructured block (many parameters, exact Hessian block) leaves
    L-BFGS-B early for Newton steps; the optimum is the one L-BFGS-B reaches
    all the way (early switch disabled)."""
    early = _unst_fit()
    assert "Newton steps (exact Hessian) finish" in early.opt.message
    assert early.converged
    full = _unst_fit(monkeypatch, EARLY_GAIN=-1.0)
    assert "exact Hessian" not in full.opt.message
    assert early.loglik == pytest.approx(full.loglik, abs=1e-8)
    np.testing.assert_allclose(early.opt.final, full.opt.final, rtol=1e-5, atol=1e-7)


def test_early_newton_that_fails_goes_back_to_lbfgsb(monkeypatch):
    """Switching after the first iteration, far from the optimum: whatever
    Newton manages, the fit ends at the same optimum, judged converged."""
    full = _unst_fit(monkeypatch, EARLY_GAIN=-1.0)
    rushed = _unst_fit(monkeypatch, EARLY_GAIN=1e12, EARLY_MIN_ITER=1)
    assert any(stage == "lbfgsb after the polish" for stage, *_ in rushed.opt.log)
    assert rushed.converged
    assert rushed.loglik == pytest.approx(full.loglik, abs=1e-7)


def test_standard_model_keeps_lbfgsb():
    res = mlsem.fit(REF / "unbalanced.parquet", "y ~ x1 + z + (1 | k/j)")
    assert 4 * estimate._hessian_cost(res.model) > res.nparams
    assert "exact Hessian" not in res.opt.message


def test_no_early_newton_on_small_data(monkeypatch):
    res = _unst_fit(monkeypatch, EARLY_MIN_OBS=10 ** 9)
    assert "exact Hessian" not in res.opt.message
    assert res.converged


def test_snap_to_bounds_only_moves_entries_a_hair_inside():
    """The restart-from-the-bounds candidate: only bounded entries whose way to
    the bound is worth < 1e-3 log-likelihood units, never a residual variance."""
    res = mlsem.fit(REF / "hetero_corr.parquet", "y ~ x + (1 + x | k/j)")
    m = res.model
    psi = res.opt.final
    _, g = m.evaluate(psi)
    tau = m.psi_to_tau(psi)
    snapped = estimate._snap_to_bounds(m, psi, g)
    assert snapped is not None                      # the singular k block's last Cholesky diagonal
    moved = np.flatnonzero(snapped != tau)
    assert len(moved) >= 1 and np.all(np.abs(tau[moved]) < 1e-3)
    resid = [k for k, i in enumerate(m.free_plain) if m.table.params[i].kind == "resid"]
    assert not set(moved) & set(resid)
    # a start far from the optimum: nothing is a hair inside a bound
    psi0 = estimate.start_values(m)
    _, g0 = m.evaluate(psi0)
    assert estimate._snap_to_bounds(m, psi0, g0) is None
