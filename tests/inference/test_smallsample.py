"""Small-sample df of the fixed effects against lmerTest 3.1 / pbkrtest 0.5
(tests/reference/small_sample.json, copied from the shared references, and
tests/reference/extra/small_sample_extra.json, made by make_small_sample.sh)."""
import json

import numpy as np
import pytest

import mlsem
from mlsem.errors import MlsemError

from conftest import REF

SS = json.loads((REF / "small_sample.json").read_text())
EXTRA = json.loads((REF / "extra" / "small_sample_extra.json").read_text())
CASES = {"seed_balanced": "y ~ x + (1 | k/j)", "unbalanced": "y ~ x1 + z + (1 | k/j)",
         "pastes": "strength ~ 1 + (1 | batch/cask)",
         "sleepstudy": "Reaction ~ Days + (Days | Subject)"}


def _r(name):
    return "(Intercept)" if name == "Intercept" else name


def _check(res, ref):
    tab = res.params.filter(res.params["df"].is_not_nan())
    assert tab.height == len(ref["df"])
    for row in tab.iter_rows(named=True):
        n = _r(row["name"])
        assert row["df"] == pytest.approx(ref["df"][n], rel=1e-3), n
        assert row["std_err"] == pytest.approx(ref["std_err"][n], rel=1e-3), n
        assert row["estimate"] == pytest.approx(ref["estimate"][n], rel=1e-4, abs=1e-6), n
        p = ref["p_value"][n]
        assert abs(row["p_value"] - p) <= max(1e-3 * p, 1e-8), n


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("df,key", [("satterthwaite", "satterthwaite"),
                                    ("kenward-roger", "kenward_roger")])
def test_reml_df_match_lmertest_pbkrtest(case, df, key):
    res = mlsem.fit(REF / f"{case}.parquet", CASES[case], method="reml", df=df)
    assert res.converged
    _check(res, SS[case][key])
    assert res.df_method == {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger"}[df]


@pytest.mark.parametrize("case", list(CASES))
def test_ml_satterthwaite_matches_lmertest(case):
    res = mlsem.fit(REF / f"{case}.parquet", CASES[case], df="satterthwaite")
    _check(res, EXTRA["ml_satterthwaite"][case])


def test_t_intervals_use_df():
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml", df="satterthwaite")
    from scipy import stats
    row = res.params.row(0, named=True)
    tq = stats.t.ppf(0.975, row["df"])
    assert row["ci_high"] - row["estimate"] == pytest.approx(tq * row["std_err"], rel=1e-12)
    assert tq > 2.2          # 9 df: far from 1.96
    assert "Satterthwaite" in res.summary()


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_wald_f_tests_match(method):
    key = f"ftests_unbalanced_{method}"
    kinds = [("satterthwaite", "satterthwaite")] + (
        [("kenward-roger", "kenward_roger")] if method == "reml" else [])
    for df, k2 in kinds:
        res = mlsem.fit(REF / "unbalanced.parquet", CASES["unbalanced"], method=method, df=df)
        for name, t in EXTRA[key].items():
            w = res.wald(t["restrictions"])
            ref = t[k2]
            assert w["df_num"] == ref["df_num"]
            assert w["df_den"] == pytest.approx(ref["df_den"], rel=1e-3), (df, name)
            assert w["F"] == pytest.approx(ref["F"], rel=1e-4), (df, name)
            assert abs(w["p_value"] - ref["p_value"]) <= max(1e-3 * ref["p_value"], 1e-8)
            if "F_scaling" in ref:
                assert w["F_scaling"] == pytest.approx(ref["F_scaling"], rel=1e-4)


def test_options_refused():
    with pytest.raises(MlsemError, match="kenward-roger.*method='reml'"):
        mlsem.fit(REF / "pastes.parquet", CASES["pastes"], df="kenward-roger")
    with pytest.raises(MlsemError, match="df="):
        mlsem.fit(REF / "pastes.parquet", CASES["pastes"], df="containment")
    with pytest.raises(MlsemError, match="vce='mixed'"):
        mlsem.fit(REF / "pastes.parquet", CASES["pastes"], df="satterthwaite", vce="oim")
    res = mlsem.fit(REF / "unbalanced.parquet", CASES["unbalanced"], method="reml",
                    df="satterthwaite")
    with pytest.raises(MlsemError, match="fixed effects only"):
        res.wald("var(k) = 1")


def test_p_blocks_are_derivatives_of_the_fixed_effects_covariance():
    """dPhi/dpsi_i = Phi P_i Phi (analytic) against central differences of (X'V^-1X)^-1."""
    from mlsem.inference.smallsample import _Blocks
    res = mlsem.fit(REF / "sleepstudy.parquet", CASES["sleepstudy"])
    m, psi = res.model, res.estimate
    b = _Blocks(m, psi)
    for c, i in enumerate(b.var):
        h = 1e-5 * max(abs(psi[i]), 1.0)
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        num = (_Blocks(m, up).V - _Blocks(m, dn).V) / (2 * h)
        ana = b.V @ b.P[c] @ b.V
        assert np.abs(ana - num).max() <= 1e-6 * np.abs(ana).max()


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_satterthwaite_with_a_variance_at_zero(method):
    """lme4's singular fit: var(j) = 0 drops out of the df, as lmerTest's theta = 0."""
    data = mlsem.simulate(30, 2, 3, sd_school=0.0, seed=1)
    res = mlsem.fit(data, "y ~ x + (1 | k/j)", method=method, df="satterthwaite")
    assert res.coef["var(j)"] == 0.0
    _check(res, EXTRA["boundary"][f"{method}_satterthwaite"])
    assert any("var(j) estimated at 0" in n for n in res.notes)


def _kr_pieces_dense(self):
    """The dense oracle of _Blocks.kr_pieces (self: a _Blocks): Ktrace_ij =
    sum_r tr(V^-1G_iV^-1G_j), Q_ij = sum_r X'V^-1G_iV^-1G_jV^-1X, one dense
    V^-1 per missing pattern."""
    m, t, prep = self.model, self.model.table, self.model.prep
    q, M = m.q, m.M
    nv = len(self.var)
    pos = np.full(t.nparams, -1, dtype=np.int64)
    pos[self.var] = np.arange(nv)
    D = np.zeros((nv, M, M))                     # dPhi/dpsi_i
    if len(t.phi_param):
        np.add.at(D, (pos[t.phi_param], t.phi_row, t.phi_col), 1.0)
    tp = np.full(m.P, -1, dtype=np.int64)
    tp[t.theta_row] = pos[t.theta_param]
    K = np.zeros((nv, nv))
    Q = np.zeros((nv, nv, q, q))
    Phi, Theta = self.Phi_re, self.Theta
    nl = prep.slot_lat.shape[1]
    for pt in range(prep.npatterns):
        r0, r1 = int(prep.pat_ptr[pt]), int(prep.pat_ptr[pt + 1])
        o0, o1 = int(prep.row_ptr[r0]), int(prep.row_ptr[r0 + 1])
        s = prep.slot[o0:o1]
        n = o1 - o0
        lam = np.zeros((n, M))
        for k in range(nl):
            g = prep.slot_lat[s, k]
            ok = g >= 0
            lam[np.flatnonzero(ok), g[ok]] += prep.load[o0:o1, k][ok]
        used = np.flatnonzero(np.any(lam != 0, axis=0))
        lam = lam[:, used]
        Vp = lam @ Phi[np.ix_(used, used)] @ lam.T + np.diag(Theta[s])
        Vi = np.linalg.inv(Vp)
        Vi = 0.5 * (Vi + Vi.T)
        G = np.empty((nv, n, n))
        for i in range(nv):
            G[i] = lam @ D[i][np.ix_(used, used)] @ lam.T
            G[i][np.diag_indices(n)] += (tp[s] == i)
        H = G @ Vi                                 # G_i V^-1
        nr = r1 - r0
        Hf = H.reshape(nv, -1)
        K += nr * (Hf @ np.transpose(H, (0, 2, 1)).reshape(nv, -1).T)
        # rows of the pattern: V^-1 X_r stacked, (nr, n, q)
        o_end = int(prep.row_ptr[r1])
        WXp = self.WX[o0:o_end].reshape(nr, n, q)
        O = np.matmul(G[None, :, :, :], WXp[:, None, :, :])         # G_i V^-1 X_r
        VO = np.matmul(Vi, O)                                        # V^-1 G_j V^-1 X_r
        O2 = np.transpose(O, (1, 0, 2, 3)).reshape(nv, nr * n, q)
        VO2 = np.transpose(VO, (1, 0, 2, 3)).reshape(nv, nr * n, q)
        Q += np.einsum("ixp,jxq->ijpq", O2, VO2, optimize=True)
    return K, Q


@pytest.mark.parametrize("case", ["sleepstudy", "unbalanced"])
def test_kr_low_rank_pieces_equal_the_dense_oracle(case):
    """Kenward-Roger's traces and Q_ij from the low-rank per-pattern formulas equal
    the dense G_i V^-1 products (random slopes; nested intercepts)."""
    from mlsem.inference.smallsample import _Blocks
    res = mlsem.fit(REF / f"{case}.parquet", CASES[case])
    b = _Blocks(res.model, res.estimate)
    K1, Q1 = b.kr_pieces()
    K2, Q2 = _kr_pieces_dense(b)
    assert np.abs(K1 - K2).max() <= 1e-10 * np.abs(K2).max()
    assert np.abs(Q1 - Q2).max() <= 1e-10 * np.abs(Q2).max()


# ---- review fixes (smallfix): units of y, singular random slopes --------------
SF = json.loads((REF / "extra" / "smallfix.json").read_text())     # make_smallfix.sh (lmerTest 3.1.3)


def _check_tab(res, tab):
    assert res.converged
    for row in res.params.filter(res.params["df"].is_not_nan()).iter_rows(named=True):
        est, se, df = tab[_r(row["name"])]
        assert row["estimate"] == pytest.approx(est, rel=1e-4, abs=1e-6 * se), row["name"]
        assert row["std_err"] == pytest.approx(se, rel=1e-3), row["name"]
        assert row["df"] == pytest.approx(df, rel=1e-3), row["name"]


@pytest.mark.parametrize("scale", [0.01, 1e-4])
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_satterthwaite_df_do_not_depend_on_units_of_y(scale, method):
    """lmerTest's df are unit-free; before: 2235 vs 2169 (y/100, steps with an
    absolute floor) and var(j), var(Residual) declared 0 (y*1e-4, an absolute
    zero test)."""
    import polars as pl
    d = pl.read_parquet(REF / "unbalanced.parquet").with_columns(pl.col("y") * scale)
    res = mlsem.fit(d, CASES["unbalanced"], method=method, df="satterthwaite")
    _check_tab(res, SF[f"unb_{scale:g}_{method}"]["tab"])
    assert res.small.dropped == []
    assert not any("left out" in n for n in res.notes)


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_satterthwaite_singular_random_slope(method):
    """A correlation of +-1 (lme4's singular fit, theta_3 = 0): the df in the
    Cholesky parameters with the one at 0 left out, as lmerTest.  Before: ML
    df 8.82 / 6.02 (lmerTest 10.64 / 57.07), REML refused."""
    import polars as pl
    d = pl.read_csv(REF / "smallfix_sing.csv")
    ref = SF[f"sing_{method}"]
    assert ref["singular"] and ref["theta"][2] == 0.0
    res = mlsem.fit(d, "y ~ day + (day | s)", method=method, df="satterthwaite")
    _check_tab(res, ref["tab"])
    assert any("singular random-effects covariance" in n for n in res.notes)
    # the Wald F test (one direction per restriction) agrees with the t tests
    w = res.wald(["day = 0"])
    assert w["df_den"] == pytest.approx(ref["tab"]["day"][2], rel=1e-3)


def test_df_on_a_fit_that_did_not_converge_carry_a_note():
    import warnings
    from mlsem.inference.smallsample import apply_df
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml")
    res.converged = False                 # as a fit stopped early reports itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_df(res, "satterthwaite", res.reml_info, res.reml_info_params)
    assert any("did not converge" in n for n in res.notes)


def test_reml_information_must_be_over_the_variance_parameters():
    from mlsem.inference.smallsample import apply_df
    res = mlsem.fit(REF / "pastes.parquet", CASES["pastes"], method="reml")
    with pytest.raises(MlsemError, match="not over the variance parameters"):
        apply_df(res, "satterthwaite", res.reml_info, res.reml_info_params[:-1])


def test_kr_singular_information_threshold_is_relative_and_announced(monkeypatch):
    """The switch to the pseudo-inverse of the expected information is on the
    ratio of its eigenvalues (unit-free) and says so in a note."""
    import polars as pl
    import mlsem.inference.smallsample as S
    d = pl.read_parquet(REF / "pastes.parquet")
    base = mlsem.fit(d, CASES["pastes"], method="reml", df="kenward-roger")
    assert not any("pseudo-inverse" in n for n in base.notes)
    IE = 2.0 * np.linalg.inv(base.small.W)
    u = np.sqrt(np.diag(IE))                     # the decision is on IE scaled to unit diagonal
    ev = np.abs(np.linalg.eigvalsh(IE / np.outer(u, u)))
    ratio = ev.min() / ev.max()
    for scale in (1.0, 1e-4):                    # the same decision in other units of y
        ds = d.with_columns(pl.col("strength") * scale)
        monkeypatch.setattr(S, "KR_RCOND", 0.5 * ratio)
        r = mlsem.fit(ds, CASES["pastes"], method="reml", df="kenward-roger")
        assert not any("pseudo-inverse" in n for n in r.notes)
        monkeypatch.setattr(S, "KR_RCOND", 2.0 * ratio)
        r = mlsem.fit(ds, CASES["pastes"], method="reml", df="kenward-roger")
        assert any("Kenward-Roger: the expected information" in n and "pseudo-inverse" in n
                   for n in r.notes)
