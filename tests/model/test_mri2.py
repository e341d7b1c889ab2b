"""Issue 15 (mri2): the whole exact Hessian of grouped random intercepts of several
outcomes at two nested levels (mlsem.model.mri2, kernel mri2_eval) and Newton on it.

The kernel must equal the dense NumPy oracle (_oracle.mri2_dense) on random designs
(2 and 3 outcomes, missing outcomes, several pseudo-units per school, loadings other
than 1, weights, threads); the evaluator must give the grouped model's log-likelihood
and gradient, a gradient equal to finite differences of the log-likelihood and a
Hessian equal to finite differences of the gradient (unstructured and "independent"
structures, one and two levels); the fits must equal the previous path's (Newton with
difference columns), and models outside the path say why."""
import numpy as np
import polars as pl
import pytest

import mlsem
import mlsem.estimate.mnewton as MN
from mlsem.data.multivariate import load_multi, prepare_multi
from mlsem.model import _core, _oracle
from mlsem.model.mreduced import reduce_multi
from mlsem.model.mri2 import build_exact, why_not_exact
from mlsem.model.multivariate import MultiModel
from mlsem.spec.multivariate import check_structures, multivariate_table, parse_formulas

pytestmark = pytest.mark.skipif(_core is None, reason="the compiled kernel is not built")


# ---- kernel against the dense oracle ------------------------------------------------------
def _design(nout, rng, ncounty=7, kx=2):
    row_ptr, sch_ptr = [0], [0]
    cout, cpu, l0, l1 = [], [], [], []
    pu = s = 0
    for _ in range(ncounty):
        for _ in range(rng.integers(1, 4)):              # schools
            for _ in range(rng.integers(1, 4)):          # pseudo-units, own outcome sets
                S = [o for o in range(nout) if rng.random() < 0.6] or [int(rng.integers(nout))]
                ld = np.sqrt(rng.integers(1, 6))
                f1 = rng.uniform(0.7, 1.3)
                for o in S:
                    cout.append(o)
                    cpu.append(pu)
                    l0.append(ld)
                    l1.append(ld * f1)
                pu += 1
            s += 1
            sch_ptr.append(len(cout))
        row_ptr.append(s)
    n = len(cout)
    xoff = np.array([0] + [kx * (o + 1) for o in range(nout)], dtype=np.int32)

    def pd():
        A = rng.normal(size=(nout, nout))
        return A @ A.T + 0.5 * np.eye(nout)

    return dict(row_ptr=np.array(row_ptr, dtype=np.int64), sch_ptr=np.array(sch_ptr, dtype=np.int64),
                cout=np.array(cout, dtype=np.int32), cpu=np.array(cpu, dtype=np.int32),
                l0=np.array(l0), l1=np.array(l1), y=2 * rng.normal(size=n),
                Xc=np.ascontiguousarray(np.c_[np.ones(n), rng.normal(size=(n, kx - 1))]),
                xoff=xoff, beta=rng.normal(size=int(xoff[-1])), Gam=pd(), Tau=pd(), R=pd(),
                wrow=rng.uniform(0.5, 2.0, size=ncounty))


def _kernel(d, nt=1, hess=1):
    nout = d["Gam"].shape[0]
    ent, _ = _oracle.mri2_entries(nout)
    ea = np.array([a for a, _ in ent], dtype=np.int32)
    eb = np.array([b for _, b in ent], dtype=np.int32)
    Z = 3 * len(ent) + len(d["beta"])
    ll, g = np.zeros(nt), np.zeros((nt, Z))
    H, st = np.zeros((nt, Z * Z)), np.zeros(nt, dtype=np.int32)
    _core.mri2_eval(d["row_ptr"], d["sch_ptr"], d["cout"], d["cpu"], d["l0"], d["l1"], d["y"],
                    d["Xc"], d["xoff"], d["beta"], ea, eb, np.linalg.cholesky(d["Gam"]), d["Tau"],
                    d["R"], d["wrow"], ll, g, H, st, nt, hess)
    return ll.sum(), g.sum(axis=0), H.sum(axis=0).reshape(Z, Z), st


def _oracle_of(d):
    csch = np.repeat(np.arange(len(d["sch_ptr"]) - 1), np.diff(d["sch_ptr"]))
    return _oracle.mri2_dense(d["sch_ptr"][d["row_ptr"]], csch, d["cpu"], d["cout"], d["l0"],
                              d["l1"], d["y"], d["Xc"], d["xoff"], d["beta"], d["Gam"], d["Tau"],
                              d["R"], d["wrow"])


@pytest.mark.parametrize("nout", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nt", [1, 2])
def test_kernel_equals_dense_oracle(nout, seed, nt):
    d = _design(nout, np.random.default_rng(seed))
    ll, g, H, st = _kernel(d, nt)
    oll, og, oH = _oracle_of(d)
    assert not st.any()
    scale = np.abs(oH).max()
    assert ll == pytest.approx(oll, rel=1e-12)
    np.testing.assert_allclose(g, og, atol=1e-10 * scale)
    np.testing.assert_allclose(H, oH, atol=1e-10 * scale)
    # without the Hessian: the same log-likelihood and gradient
    ll2, g2, _, _ = _kernel(d, nt, hess=0)
    assert ll2 == pytest.approx(ll, rel=1e-14)
    np.testing.assert_allclose(g2, g, atol=1e-12 * scale)


def test_oracle_gradient_and_hessian_are_derivatives():
    """The oracle's gradient and Hessian against central differences of its own
    log-likelihood and gradient (in every entry of Gam, Tau, R and in beta)."""
    d = _design(2, np.random.default_rng(5), ncounty=4)
    ll, g, H = _oracle_of(d)
    ent, dirs = _oracle.mri2_entries(2)
    V = len(ent)

    def moved(z, h):
        e = dict(d)
        if z < 3 * V:
            key = ("Gam", "Tau", "R")[z // V]
            e[key] = d[key] + h * dirs[z % V]
        else:
            e["beta"] = d["beta"].copy()
            e["beta"][z - 3 * V] += h
        return _oracle_of(e)

    h = 1e-5
    for z in range(len(g)):
        up, dn = moved(z, h), moved(z, -h)
        assert (up[0] - dn[0]) / (2 * h) == pytest.approx(g[z], rel=1e-6, abs=1e-6)
        np.testing.assert_allclose((up[1] - dn[1]) / (2 * h), H[:, z], rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_bad_layout_and_flags_non_positive_definite():
    d = _design(2, np.random.default_rng(3))
    bad = dict(d, sch_ptr=d["sch_ptr"][:-1].copy())
    with pytest.raises(ValueError):
        _kernel(bad)
    d["R"] = -np.eye(2)
    assert _kernel(d)[3].any()


# ---- the evaluator on models ----------------------------------------------------------------
def _data(seed, nout=2, counties=40, miss=0.2):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(counties):
        uk = rng.normal(size=nout)
        for j in range(rng.integers(1, 5)):
            uj = 0.6 * rng.normal(size=nout)
            for i in range(rng.integers(1, 7)):
                x = rng.normal()
                e = rng.normal(size=nout)
                ys = [float(1 + 0.5 * x + uk[o] + uj[o] + e[o] + 0.5 * e[0]) for o in range(nout)]
                ys = [None if rng.uniform() < miss else v for v in ys]
                rows.append((k, j + 1, 100 * j + i + 1, x, *ys))
    names = ["k", "j", "i", "x"] + [f"y{o + 1}" for o in range(nout)]
    return pl.DataFrame(rows, schema=names, orient="row")


def _exact(df, formulas, outcomes=None):
    Fs, levels = parse_formulas(formulas)
    frame, encs = load_multi(df, Fs, levels, index="i")
    prep = prepare_multi(frame, Fs, encs, levels, index="i")
    table = multivariate_table(prep, [F.outcome for F in Fs],
                               check_structures(outcomes, [lv[-1] for lv in levels]))
    red, why = reduce_multi(MultiModel(prep, table), max_share=1.0)
    assert red is not None, why
    ex, why = build_exact(red)
    assert ex is not None, why
    return red, ex


CASES = [
    (2, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], None),
    (2, ["y1 ~ x + (1 | k/j)", "y2 ~ 1 + (1 | k/j)"], {"k": "independent", "residual": "independent"}),
    (2, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"], {"j": "independent"}),
    (2, ["y1 ~ x + (1 | k)", "y2 ~ x + (1 | k)"], None),
    (3, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)", "y3 ~ 1 + (1 | k/j)"], None),
    (3, ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)", "y3 ~ x + (1 | k/j)"],
     {"k": "independent", "j": "independent", "residual": "independent"}),
]


@pytest.mark.parametrize("nout,formulas,outcomes", CASES)
def test_evaluator_equals_the_grouped_model_and_differences(nout, formulas, outcomes):
    df = _data(nout + 10 * len(formulas[1]), nout=nout)
    red, ex = _exact(df, formulas, outcomes)
    rng = np.random.default_rng(1)
    t = red.table
    psi = red.start_values()
    psi = psi + 0.05 * rng.normal(size=psi.size) * np.where(
        np.array([p.kind in ("cov", "rcov") for p in t.params]), 0.2, 1.0) * np.abs(psi)
    ll, g, H = ex.evaluate(psi)
    rll, rg = red.evaluate(psi)
    assert ll == pytest.approx(rll, rel=1e-11)
    np.testing.assert_allclose(g, rg, atol=1e-8 * np.abs(rg).max())
    # gradient against differences of the log-likelihood, Hessian against differences
    # of the gradient (central, relative steps)
    Hfd = np.zeros_like(H)
    for i in range(psi.size):
        h = 1e-5 * max(abs(psi[i]), 0.1)
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        eu, ed = ex.evaluate(up, hess=False), ex.evaluate(dn, hess=False)
        assert (eu[0] - ed[0]) / (2 * h) == pytest.approx(g[i], rel=1e-5, abs=1e-5 * np.abs(g).max())
        Hfd[:, i] = (eu[1] - ed[1]) / (2 * h)
    np.testing.assert_allclose(H, Hfd, atol=1e-6 * np.abs(H).max())
    np.testing.assert_allclose(H, H.T, atol=1e-12 * np.abs(H).max())


def test_not_admissible_is_none():
    red, ex = _exact(_data(3), CASES[0][1])
    psi = red.start_values()
    t = red.table
    bad = psi.copy()
    bad[[i for i, p in enumerate(t.params) if p.kind == "resid"][0]] = -1.0
    assert ex.evaluate(bad) is None
    bad = psi.copy()
    cov = [i for i, p in enumerate(t.params) if p.kind == "cov"][0]
    bad[cov] = 10 * max(psi[cov - 1], psi[cov + 1])     # |corr| > 1 at the county level
    assert ex.evaluate(bad) is None
    assert 0.0 <= ex.step_cap(psi, bad - psi) < 1.0


def test_why_not_three_levels_and_numpy_backend():
    rng = np.random.default_rng(0)
    n = 400
    df = pl.DataFrame({"a": rng.integers(0, 5, n), "k": rng.integers(0, 20, n),
                       "j": rng.integers(0, 3, n), "x": rng.normal(size=n),
                       "y1": rng.normal(size=n), "y2": rng.normal(size=n)})
    r = mlsem.fit(df, ["y1 ~ x + (1 | a/k/j)", "y2 ~ x + (1 | a/k/j)"])
    assert r.opt.exact_hessian_reason is not None
    red, _ = reduce_multi(r.model, max_share=1.0)
    if red is not None:
        assert why_not_exact(red) == "more than two nested levels"
    r = mlsem.fit(_data(2), CASES[0][1], backend="numpy")
    assert r.opt.exact_hessian_reason is not None


# ---- the fits: unchanged ----------------------------------------------------------------------
@pytest.mark.parametrize("outcomes", [None, {"k": "independent", "residual": "independent"}])
def test_fit_equals_the_difference_column_path(monkeypatch, outcomes):
    df = mlsem.example_data("multivariate")
    F = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]
    new = mlsem.fit(df, F, outcomes=outcomes)
    assert new.opt.exact_hessian_reason is None
    assert "mlsem.model.mri2" in new.opt.message
    monkeypatch.setattr(MN, "build_exact", lambda red: (None, "switched off (test)"))
    old = mlsem.fit(df, F, outcomes=outcomes)
    assert old.opt.exact_hessian_reason == "switched off (test)"
    assert new.loglik == pytest.approx(old.loglik, rel=1e-12)
    np.testing.assert_allclose(new.estimate, old.estimate, rtol=1e-7, atol=1e-9)
    # the old path's Hessian columns are forward differences (error ~1e-6 relative)
    np.testing.assert_allclose(new.std_err, old.std_err, rtol=2e-5)
