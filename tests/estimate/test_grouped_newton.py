"""Issue 14: the grouped data (mlsem.model.reduced) and Newton's method from the
first iteration (mlsem.estimate.newton), chosen by mlsem.estimate.grouped.

The grouped model must give the full model's log-likelihood, gradient and exact
Hessian block; Newton's whole Hessian must equal the differenced one; the fits
must equal the L-BFGS-B driver's on the full data; models outside the new paths
keep the old ones, and say why."""
import json

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.estimate import newton as NW
from mlsem.estimate.grouped import optimize_auto
from mlsem.estimate.optimize import hessian, optimize
from mlsem.model import reduced as R
from mlsem.model.multilevel import Model

from conftest import REF


def _case(name):
    c = json.load(open(REF / f"{name}.json"))
    return REF / c["data"], c["formula"]


def _fresh(res):
    return Model(res.model.prep, res.model.table, nthreads=1)


def _points(res):
    """The estimate and two points away from it (variances and coefficients moved)."""
    psi = res.estimate
    rng = np.random.default_rng(3)
    out = [psi]
    for _ in range(2):
        out.append(psi * (1.0 + 0.2 * rng.uniform(-1, 1, size=psi.size)))
    return out


FITS = {
    "medium": lambda: mlsem.fit(*_case("medium")),
    "unbalanced": lambda: mlsem.fit(*_case("unbalanced")),
    "pastes": lambda: mlsem.fit(*_case("pastes")),
    "egsingle": lambda: mlsem.fit(*_case("egsingle")),
    "weighted": lambda: mlsem.fit(mlsem.example_data("unbalanced_weighted"),
                                  "y ~ x1 + z + (1 | k/j)", weights="w_k"),
    "resid_by_slot": lambda: mlsem.fit(*_case("hetero_corr"), residuals={"variance": "j"}),
    "var_by_slot": lambda: mlsem.fit(*_case("hetero_corr"), effects={"j": {"variance": "slot"}}),
}


@pytest.fixture(scope="module", params=sorted(FITS))
def fitted(request):
    return request.param, FITS[request.param]()


def test_grouped_model_equals_full(fitted):
    name, res = fitted
    m = _fresh(res)
    red, why = R.reduce_model(m)
    assert why is None and red is not None, why
    assert red._w.size < m.prep.nobs           # fewer pseudo-observations than observations
    unit = m.pscale
    tol = 1e-8 * np.sqrt(m.prep.nobs)           # gradients in the parameters' units
    for psi in _points(res):
        a, b = m.evaluate(psi), red.evaluate(psi)
        assert b[0] == pytest.approx(a[0], rel=1e-12, abs=1e-9)
        assert np.allclose(b[1] * unit, a[1] * unit, rtol=1e-8, atol=tol)
        ha, hb = m.phi_hessian(psi), red.phi_hessian(psi)
        assert np.allclose(hb[2], ha[2], rtol=1e-8, atol=1e-9 * np.max(np.abs(ha[2])))


def test_group_sums_kernel_equals_numpy(fitted):
    """The kernel's one-pass grouping (group_count, group_sums) and the NumPy
    reference (reduced._group_sums) give the same groups and sums."""
    from mlsem.model import _core
    name, res = fitted
    m = _fresh(res)
    prep = m.prep
    row_ptr = np.asarray(prep.row_ptr, dtype=np.int64)
    code = np.ascontiguousarray(np.arange(m.P) // 3, dtype=np.int64)   # any slot classes
    ng = _core.group_count(row_ptr, m._slot, code)
    start = np.empty(ng, dtype=np.int64)
    grow = np.empty(ng, dtype=np.int64)
    sums = np.empty((ng, m.q + 1))
    W = np.zeros((m.P, m.q + 1, m.q + 1))
    y = np.ascontiguousarray(prep.y, dtype=float)
    wrow = np.ascontiguousarray(prep.wrow, dtype=float)
    _core.group_sums(row_ptr, m._slot, code, m._X, y, wrow, start, grow, sums, W)
    c = code[m._slot]
    new = np.ones(prep.nobs, dtype=bool)
    new[1:] = c[1:] != c[:-1]
    new[row_ptr[:-1]] = True
    assert np.array_equal(start, np.flatnonzero(new))
    assert np.array_equal(grow, np.searchsorted(row_ptr, start, side="right") - 1)
    counts = np.diff(np.append(start, prep.nobs))
    rep = m._slot[start].astype(np.int64)
    s2, W2 = R._group_sums(m._X, y, start, counts, rep, wrow[grow], m.P)
    assert np.allclose(sums, s2, rtol=1e-12, atol=1e-9)
    assert np.allclose(W, W2, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(W2).max()))


def test_newton_hessian_equals_differences(fitted):
    """Euler's identity for theta's row and the exact fixed-effects block and
    cross terms: the whole Hessian equals central differences of the gradient."""
    name, res = fitted
    m = _fresh(res)
    if NW.why_not_newton(m) is not None:
        pytest.skip(NW.why_not_newton(m))
    red, _ = R.reduce_model(m)
    for model in (m, red):
        lay = NW._Layout(model)
        for psi in _points(res)[1:]:
            ll, g, Hphi = model.phi_hessian(psi)
            H = NW.full_hessian(model, lay, psi, g, Hphi, model._w.copy())
            Hd = hessian(model, psi)
            assert np.allclose(H, Hd, rtol=1e-5, atol=1e-6 * np.max(np.abs(Hd))), name


def test_fit_equals_lbfgsb_on_full_data(fitted):
    name, res = fitted
    old = optimize(_fresh(res))
    new = optimize_auto(_fresh(res))
    assert old.converged and new.converged
    assert new.path == "grouped"
    assert new.loglik == pytest.approx(old.loglik, abs=1e-7)
    scale = np.maximum(np.abs(old.final), 1e-3)
    assert np.max(np.abs(new.final - old.final) / scale) < 1e-6
    # the information handed to the results is the Hessian at the estimate
    near = np.abs(new.hessian_at - new.final) / np.maximum(np.abs(new.final), 0.1 * res.model.pscale)
    assert np.max(near) <= 1e-6
    Hd = hessian(_fresh(res), new.final)
    assert np.allclose(new.hessian, Hd, rtol=1e-5, atol=1e-6 * np.max(np.abs(Hd)))
    if new.method == "newton":
        assert new.evaluations < old.evaluations, (new.evaluations, old.evaluations)


def test_newton_evaluations_on_medium():
    """The evaluation counts of docs/benchmarks.md (round three): medium 31 -> 13."""
    res = FITS["medium"]()
    assert res.opt.method == "newton" and res.opt.path == "grouped"
    assert res.opt.evaluations <= 16
    assert optimize(_fresh(res)).evaluations >= 25


def test_paths_not_covered_say_why():
    sleep = mlsem.fit(mlsem.example_data("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
    assert sleep.opt.path == "full" and sleep.opt.method == "lbfgsb"
    assert "random slopes" in sleep.opt.grouped_reason
    assert "covariance" in sleep.opt.newton_reason
    npy = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)", backend="numpy")
    assert npy.opt.path == "full" and "numpy" in npy.opt.grouped_reason
    hc = mlsem.fit(*_case("hetero_corr"), residuals={"correlation": "exchangeable"})
    assert hc.opt.path == "full" and "dense" in hc.opt.grouped_reason


def test_newton_failure_falls_back_to_lbfgsb(monkeypatch):
    """A Newton run that stops (here: after one iteration) hands over to
    L-BFGS-B from the original start: the result is the old path's."""
    monkeypatch.setattr(NW, "MAX_ITER", 1)
    res = FITS["unbalanced"]()
    assert res.converged and res.opt.method == "lbfgsb"
    assert "no convergence in 1 Newton iterations" in res.opt.newton_reason
    monkeypatch.undo()
    ref = FITS["unbalanced"]()
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-7)
    assert np.allclose(res.std_err, ref.std_err, rtol=1e-5)


def test_grouped_lbfgsb_not_converged_falls_back_to_full(monkeypatch):
    """A run on the grouped data that does not converge is repeated on the full
    data, and the full run's result (converged) is the one returned."""
    import mlsem.estimate.grouped as G
    res = FITS["medium"]()
    calls = []
    real = G.optimize

    def fake(model, start=None, maxiter=5000, progress=None):
        calls.append(type(model).__name__)
        out = real(model, start=start, maxiter=maxiter, progress=progress)
        if isinstance(model, R.ReducedModel):
            out.converged = False          # as if the grouped run had not converged
            out.loglik -= 1.0
        return out

    monkeypatch.setattr(G, "optimize", fake)
    monkeypatch.setattr(NW, "MAX_ITER", 1)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = optimize_auto(_fresh(res))
    assert not [w for w in caught if "converge" in str(w.message)]
    assert calls == ["ReducedModel", "Model"]
    assert opt.converged and opt.path == "full"
    assert "did not converge" in opt.grouped_reason
    assert opt.loglik == pytest.approx(res.loglik, abs=1e-6)


def test_units_invariance_newton():
    """y in other units: the same Newton path (same evaluations), estimates scaled."""
    d = pl.read_parquet(_case("unbalanced")[0])
    f = _case("unbalanced")[1]
    a = mlsem.fit(d, f)
    b = mlsem.fit(d.with_columns(pl.col("y") * 1e4), f)
    assert a.opt.method == b.opt.method == "newton"
    assert abs(a.opt.evaluations - b.opt.evaluations) <= 2
    kinds = np.array(a.kinds)
    scale = np.where(kinds == "fixed", 1e4, 1e8)
    assert np.allclose(b.estimate / scale, a.estimate, rtol=1e-6)


def test_variance_on_its_bound_active_set():
    """A school variance estimated at 0 (simulated without school effects):
    Newton holds it on the bound (no hand-over), and the fit equals the
    L-BFGS-B driver's on the full data, with fewer evaluations."""
    df = mlsem.simulate(300, (1, 5), (1, 8), intercept=1.0, slope=0.5, sd_county=1.0,
                        sd_school=0.0, sd_resid=1.0, x="normal", seed=5)
    res = mlsem.fit(df, "y ~ x + (1 | k/j)")
    old = optimize(_fresh(res))
    assert res.converged and old.converged
    assert res.opt.method == "newton", res.opt.newton_reason
    j = res.names.index("var(j)")
    assert res.estimate[j] == 0.0 and old.final[j] == 0.0
    assert res.loglik == pytest.approx(old.loglik, abs=1e-8)
    assert np.allclose(res.estimate, old.final, rtol=1e-7, atol=1e-9)
    assert res.opt.evaluations < old.evaluations
    Hd = hessian(_fresh(res), res.estimate)      # forward differences at the bound
    assert np.allclose(res.opt.hessian, Hd, rtol=1e-4, atol=1e-6 * np.max(np.abs(Hd)))
