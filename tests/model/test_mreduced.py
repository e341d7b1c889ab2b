"""Several outcomes on grouped data (issue 15, mlsem.model.mreduced, mlsem.estimate.mnewton):
the pseudo-units plus the within part equal the full data (log-likelihood, gradient, the
exact Phi Hessian block) to rounding; the grouping kernel against the NumPy oracle; the
block-arrowhead path with loadings sqrt(n) against the oracle; the gradient against finite
differences; Newton on the grouped data against L-BFGS-B on the full data."""
import warnings

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.data.multivariate import load_multi, prepare_multi
from mlsem.estimate.mnewton import optimize_multi
from mlsem.estimate.optimize import information, optimize
from mlsem.model import _oracle
from mlsem.model.mreduced import reduce_multi
from mlsem.model.multilevel import _core
from mlsem.model.multivariate import MultiModel, subset_inverses
from mlsem.spec.multivariate import check_structures, multivariate_table, parse_formulas

pytestmark = pytest.mark.skipif(_core is None, reason="compiled kernel not built")


def reviewer_data(seed, counties=14, nout=3, miss=0.2, levels=2):
    """Up to 4 schools of up to 7 pupils per county; every outcome missing at random; z
    (a covariate of y2 only) missing for some pupils; some pupils with no usable outcome."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(counties):
        uk = rng.normal(size=nout)
        for j in range(rng.integers(1, 5)):
            vj = rng.normal(size=nout) * 0.7
            for i in range(rng.integers(1, 8)):
                x, z = rng.normal(), rng.normal()
                ys = [1.0 + 0.5 * x + uk[o] + vj[o] + rng.normal() for o in range(nout)]
                ys = [None if rng.uniform() < miss else v for v in ys]
                z = None if rng.uniform() < 0.1 else z
                rows.append((k, j + 1, i + 1, x, z, *ys))
    names = ["k", "j", "i", "x", "z"] + [f"y{o + 1}" for o in range(nout)]
    df = pl.DataFrame(rows, schema=names, orient="row")
    g = "(1 | k/j)" if levels == 2 else "(1 | k)"
    fs = [f"y1 ~ x + {g}", f"y2 ~ x + z + {g}"] + [f"y{o + 1} ~ 1 + {g}" for o in range(2, nout)]
    return df, fs


def build(df, formulas, outcomes=None, index="i"):
    Fs, levels = parse_formulas(formulas)
    frame, encs = load_multi(df, Fs, levels, index=index)
    prep = prepare_multi(frame, Fs, encs, levels, index=index)
    table = multivariate_table(prep, [F.outcome for F in Fs],
                               check_structures(outcomes, [lv[-1] for lv in levels]))
    return prep, table


def random_psi(table, rng):
    psi = np.zeros(table.nparams)
    for i, p in enumerate(table.params):
        if p.kind in ("var", "resid"):
            psi[i] = rng.uniform(0.5, 2.0)
        elif p.kind in ("cov", "rcov"):
            psi[i] = rng.uniform(-0.3, 0.3)
        else:
            psi[i] = rng.normal(0, 0.3)
    return psi


CASES = [(seed, nout, levels, outcomes) for seed, nout, levels, outcomes in [
    (0, 2, 2, None), (1, 3, 2, None), (2, 3, 1, None), (3, 2, 2, {"j": "independent"}),
    (4, 3, 2, {"residual": "independent"}), (5, 2, 1, None)]]


@pytest.mark.parametrize("seed,nout,levels,outcomes", CASES)
def test_grouped_equals_full(seed, nout, levels, outcomes):
    """Log-likelihood, gradient and the exact Phi Hessian block of the grouped data equal
    the full data's to ~1e-12 relative (missing cells of every outcome, a covariate missing
    for one outcome, dropped units, row weights, one or two grouping levels)."""
    df, fs = reviewer_data(seed, nout=nout, levels=levels)
    prep, tab = build(df, fs, outcomes, index="i" if levels == 2 else None)
    assert prep.meta["dropped_units"] > 0 and prep.missing_outcome > 0
    rng = np.random.default_rng(seed)
    prep.wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    full = MultiModel(prep, tab, backend="cython", nthreads=1 + seed % 2)
    red, why = reduce_multi(full, max_share=1.0)
    assert why is None and red.prep.y.shape[0] < prep.nobs
    for _ in range(3):
        psi = random_psi(tab, rng)
        l1, g1 = full.evaluate(psi)
        l2, g2 = red.evaluate(psi)
        assert l2 == pytest.approx(l1, rel=1e-12)
        np.testing.assert_allclose(g2, g1, rtol=1e-9, atol=1e-9 * np.abs(g1).max())
        _, _, H1 = full.phi_hessian(psi)
        _, _, H2 = red.phi_hessian(psi)
        np.testing.assert_allclose(H2, H1, rtol=1e-9, atol=1e-9 * np.abs(H1).max())


def test_grouped_gradient_equals_finite_differences():
    df, fs = reviewer_data(11, nout=3)
    prep, tab = build(df, fs)
    red, _ = reduce_multi(MultiModel(prep, tab, backend="cython"), max_share=1.0)
    psi = random_psi(tab, np.random.default_rng(3))
    _, g = red.evaluate(psi)
    for i in range(len(psi)):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        fd = (red.evaluate(up, need_grad=False)[0] - red.evaluate(dn, need_grad=False)[0]) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-5), tab.names[i]


@pytest.mark.parametrize("seed", range(4))
def test_grouping_kernel_equals_oracle(seed):
    """_core.mgroup_sums: the groups (row, size, outcome set, sums of [y, X]) and the
    weighted within-group cross products per outcome set against _oracle.group_within_multi."""
    df, fs = reviewer_data(20 + seed, nout=2 + seed % 2, levels=1 + seed % 2)
    prep, tab = build(df, fs, index="i" if seed % 2 else None)
    rng = np.random.default_rng(seed)
    wrow = rng.uniform(0.5, 2.0, size=prep.nrows)
    m = MultiModel(prep, tab, backend="cython")
    nout = m.nout
    snode = np.ascontiguousarray(prep.slot_lat[:, -1] // nout, dtype=np.int32)
    nu, ng, _ = _core.mgroup_count(prep.row_ptr, m._slot, m._spup, m._sout, snode, nout)
    k = 1 + m._Xc.shape[1]
    mu = np.zeros((nout, k))         # no centring: the oracle's plain sums
    out = dict(gfirst=np.empty(ng, dtype=np.int64), gn=np.empty(ng, dtype=np.int64),
               gmask=np.empty(ng, dtype=np.int32), grow=np.empty(ng, dtype=np.int64),
               gsum=np.empty((ng, nout * k)))
    C = np.zeros((1 << nout, nout * k, nout * k))
    cnt = np.zeros(1 << nout)
    _core.mgroup_sums(prep.row_ptr, m._slot, m._spup, m._sout, snode, nout, prep.y, m._Xc, mu,
                      wrow, *out.values(), C, cnt)
    want, groups = _oracle.group_within_multi(prep.row_ptr, m._slot, m._spup, m._sout, snode,
                                              nout, prep.y, m._Xc, wrow)
    pairs = np.stack([np.searchsorted(prep.row_ptr, np.arange(prep.nobs), side="right"),
                      m._spup[m._slot]], axis=1)
    assert ng == len(groups) and nu == len(np.unique(pairs, axis=0)) == prep.meta["units"]
    got = sorted(zip(out["grow"], out["gmask"], out["gn"], map(tuple, out["gsum"])))
    ref = sorted((r, mask, n, tuple(s)) for r, _, mask, n, s in groups)
    for a, b in zip(got, ref):
        assert a[:3] == b[:3]
        np.testing.assert_allclose(a[3], b[3], rtol=1e-12, atol=1e-12)
    for mask, (Cw, n) in want.items():
        np.testing.assert_allclose(C[mask], Cw, rtol=1e-10, atol=1e-10)
        assert cnt[mask] == pytest.approx(n, rel=1e-14)


@pytest.mark.parametrize("barrow", [True, False])
def test_arrowhead_with_loadings_equals_oracle(barrow):
    """mfactor_loglik on grouped data (loadings sqrt(n), one per unit), block-arrowhead
    and general paths, against the dense oracle: log-likelihood, dl/dPhi within the nodes,
    dl/dR and w."""
    df, fs = reviewer_data(7, nout=3)
    prep, tab = build(df, fs)
    red, _ = reduce_multi(MultiModel(prep, tab, backend="cython"), max_share=1.0)
    rp = red.prep
    assert np.any(rp.load != 1.0)
    rng = np.random.default_rng(1)
    _, Phi, R = red.matrices(random_psi(tab, rng))
    F = red.factor(Phi)
    rinv, rlogdet = subset_inverses(R)
    M, nout, nt = red.M, red.nout, red._nt
    resid = rng.normal(size=rp.y.shape[0])
    w = np.zeros_like(resid)
    ll, gphi = np.zeros(nt), np.zeros((nt, M * M))
    gR, st = np.zeros((nt, nout * nout)), np.zeros(nt, dtype=np.int32)
    old = _core.set_block_arrowhead(barrow)
    try:
        _core.mfactor_loglik(rp.pat_ptr, rp.row_ptr, red._slot, resid.copy(), red._load,
                             red._slot_lat, F, red.blk_start, red.blk_end, red._spup, red._sout,
                             nout, rinv, rlogdet, rp.wrow, w, ll, gphi, gR, st, red._maxn,
                             red._maxm, red._maxc, nt, 1)
    finally:
        _core.set_block_arrowhead(old)
    assert not st.any()
    ll2, gphi2, gR2, w2 = _oracle.loglik_blocks(rp.row_ptr, rp.slot, resid, rp.load, rp.slot_lat,
                                                Phi, R, red._sout, red._spup, rp.wrow)
    assert ll.sum() == pytest.approx(ll2, rel=1e-11)
    node = prep.latent_node
    inside = node[:, None] == node[None, :]
    np.testing.assert_allclose(gphi.sum(0).reshape(M, M)[inside], gphi2[inside], rtol=1e-8,
                               atol=1e-10)
    np.testing.assert_allclose(gR.sum(0).reshape(nout, nout), gR2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w, w2, rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def sim():
    """The benchmark's bivariate design, 200 counties (about 11,500 pupils), 10% of y2
    missing."""
    df = mlsem.simulate(200, (1, 10), (1, 20), intercept=1.0, slope=0.8, sd_county=1.0,
                        sd_school=0.7, sd_resid=1.0, x="normal", seed=5)
    rng = np.random.default_rng(6)
    k = df["k"].to_numpy()
    y2 = -0.5 + 0.3 * df["x"].to_numpy() + 0.5 * df["y"].to_numpy() \
        + rng.normal(0, 0.6, k.max() + 1)[k] + rng.normal(0, 0.8, len(k))
    y2[rng.uniform(size=len(k)) < 0.1] = np.nan
    return df.rename({"y": "y1"}).with_columns(pl.Series("y2", y2, nan_to_null=True))


def test_newton_on_grouped_equals_lbfgsb_on_full(sim):
    """The fit's path (grouped data, Newton, the information from its last Hessian) against
    L-BFGS-B on the full data with the information by differences of the gradient."""
    fs = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]
    prep, tab = build(sim, fs, index=None)
    model = MultiModel(prep, tab, backend="cython")
    opt = optimize_multi(model)
    assert (opt.path, opt.method, opt.converged) == ("grouped", "newton", True)
    assert opt.evaluations <= 30
    ref = MultiModel(prep, tab, backend="cython")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2 = optimize(ref, start=ref.start_values())
    assert opt.loglik == pytest.approx(opt2.loglik, rel=1e-11)
    unit = ref.pscale
    np.testing.assert_allclose(opt.final / unit, opt2.final / unit, atol=2e-5)
    se1 = np.sqrt(np.diag(np.linalg.inv(information(model, opt.final, opt))))
    se2 = np.sqrt(np.diag(np.linalg.inv(information(ref, opt2.final))))
    np.testing.assert_allclose(se1, se2, rtol=1e-4)
    r = mlsem.fit(sim, fs)
    assert r.loglik == pytest.approx(opt.loglik, rel=1e-12) and r.opt.path == "grouped"


def test_newton_with_subsampled_iteration_hessian_equals_whole(sim, monkeypatch):
    """mfast2: the Newton iterations take the coefficient and residual columns of the
    Hessian from a subsample of the grouped rows (large data); the estimate, the
    log-likelihood and the information (the final Hessian, from the whole grouped data)
    equal the path without the subsample."""
    from mlsem.estimate import mnewton
    from mlsem.model import mreduced
    # (the path with difference columns: mri2's exact Hessian switched off)
    monkeypatch.setattr(mnewton, "build_exact", lambda red: (None, "switched off (test)"))
    fs = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]
    prep, tab = build(sim, fs, index=None)
    opt0 = optimize_multi(MultiModel(prep, tab, backend="cython"))
    assert not any(e[0] == "subsample evaluations" for e in opt0.log)
    monkeypatch.setattr(mreduced, "SUB_MIN_ROWS", 10)
    monkeypatch.setattr(mreduced, "SUB_ROWS", 40)
    model = MultiModel(prep, tab, backend="cython")
    red, _ = reduce_multi(model)
    sub = mreduced.subsample(red)
    assert sub is not None and sub.prep.nrows < red.prep.nrows / 2
    assert sub.prep.wrow.sum() == pytest.approx(red.prep.wrow.sum(), rel=1e-12)
    opt = optimize_multi(model)
    assert (opt.path, opt.method, opt.converged) == ("grouped", "newton", True)
    assert any(e[0] == "subsample evaluations" and e[1] > 0 for e in opt.log)
    assert opt.loglik == pytest.approx(opt0.loglik, rel=1e-12)
    unit = model.pscale
    np.testing.assert_allclose(opt.final / unit, opt0.final / unit, atol=1e-6)
    se1 = np.sqrt(np.diag(np.linalg.inv(information(model, opt.final, opt))))
    se0 = np.sqrt(np.diag(np.linalg.inv(information(model, opt0.final, opt0))))
    np.testing.assert_allclose(se1, se0, rtol=1e-6)
