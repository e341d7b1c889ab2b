"""Robust and cluster-robust standard errors with several outcomes (issue 15, item 4):
per-top-unit scores (mlsem.model.mscores) and the sandwich of mlsem.inference.vce."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import MlsemError
from mlsem.model.mscores import _UnitEvaluator, multi_row_scores

F = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]
INDEPENDENT = {"k": "independent", "j": "independent", "residual": "independent"}


@pytest.fixture(scope="module")
def data():
    return mlsem.example_data("multivariate")


@pytest.fixture(scope="module")
def full(data):
    return mlsem.fit(data, F)


def test_unit_scores_sum_to_the_gradient_and_are_each_units_gradient(full):
    m, psi = full.model, full.estimate
    S = multi_row_scores(m, psi)
    ll, g = m.evaluate(psi)
    assert np.max(np.abs(S.sum(axis=0) - g)) < 1e-8
    ev = _UnitEvaluator(m, psi)
    assert sum(ev(r, False)[0] for r in range(m.prep.nrows)) == pytest.approx(ll, rel=1e-12)
    # a unit's score: central differences of that unit's log-likelihood
    unit = np.maximum(np.abs(psi), 0.1 * m.pscale)
    for r in (0, 7, m.prep.nrows - 1):
        fd = np.zeros(len(psi))
        for i in range(len(psi)):
            h = 1e-5 * unit[i]
            p, q = psi.copy(), psi.copy()
            p[i] += h
            q[i] -= h
            fd[i] = (_UnitEvaluator(m, p)(r, False)[0] - _UnitEvaluator(m, q)(r, False)[0]) / (2 * h)
        np.testing.assert_allclose(S[r], fd, rtol=1e-5, atol=1e-6 * np.max(np.abs(fd)))


def test_numpy_backend_gives_the_same_scores(data, full):
    slow = mlsem.fit(data, F, backend="numpy")
    S1 = multi_row_scores(full.model, full.estimate)
    S2 = multi_row_scores(slow.model, full.estimate)
    np.testing.assert_allclose(S1, S2, rtol=1e-8, atol=1e-10)


def test_independent_outcomes_have_the_univariate_robust_errors(data):
    """With no covariance across outcomes the information is block-diagonal, so each
    outcome's block of the sandwich is its univariate fit's robust covariance."""
    b = mlsem.fit(data, F, vce="robust", outcomes=INDEPENDENT)
    assert b.vce == "robust"
    se = dict(zip(b.names, b.std_err))
    for o, f in zip(("y1", "y2"), F):
        u = mlsem.fit(data, f, vce="robust")
        for n, s in zip(u.names, u.std_err):
            if n == "var(Residual)":
                name = f"var(Residual:{o})"
            elif n.startswith("var("):
                name = f"var({n[4:-1]}:{o})"
            else:
                name = f"{o}:{n}"
            assert se[name] == pytest.approx(s, rel=1e-5), name


def test_cluster_robust(data, full):
    rob = mlsem.fit(data, F, vce="robust")
    cl = mlsem.fit(data, F, vce=("cluster", "k"))
    G = data["k"].n_unique()
    np.testing.assert_allclose(np.asarray(cl.std_err) / np.asarray(rob.std_err),
                               np.sqrt(G / (G - 1)), rtol=1e-10)
    assert cl.vce == "cluster(k)" and any("300 clusters in k" in n for n in cl.notes)
    # coarser clusters (groups of counties) are accepted, a column varying within a
    # county is refused with its name
    coarse = mlsem.fit(data.with_columns((pl.col("k") // 10).alias("region")), F,
                       vce=("cluster", "region"))
    assert np.all(np.isfinite(coarse.std_err))
    with pytest.raises(MlsemError, match=r"cluster column 'j' varies within top-level unit"):
        mlsem.fit(data, F, vce=("cluster", "j"))


def test_sampling_weights_with_independent_outcomes_are_the_univariate_fits(data):
    """Weights of the top-level units: a pseudo-likelihood (on the grouped data, which carry
    the row weights); with independent outcomes it is the sum of the univariate weighted
    fits', estimates and robust errors included."""
    rng = np.random.default_rng(1)
    w = pl.DataFrame({"k": data["k"].unique().sort(), "w": rng.uniform(0.5, 3.0, data["k"].n_unique())})
    d = data.join(w, on="k")
    b = mlsem.fit(d, F, weights="w", outcomes=INDEPENDENT)
    assert b.vce == "robust" and b.converged and b.opt.path == "grouped"
    assert any("sampling weights 'w'" in n for n in b.notes)
    assert not b.lr_ols
    est = dict(zip(b.names, zip(b.estimate, b.std_err)))
    ll = 0.0
    for o, f in zip(("y1", "y2"), F):
        u = mlsem.fit(d, f, weights="w")
        ll += u.loglik
        for n, e, s in zip(u.names, u.estimate, u.std_err):
            name = (f"var(Residual:{o})" if n == "var(Residual)" else
                    f"var({n[4:-1]}:{o})" if n.startswith("var(") else f"{o}:{n}")
            assert est[name][0] == pytest.approx(e, rel=1e-6, abs=1e-8), name
            assert est[name][1] == pytest.approx(s, rel=1e-5), name
    assert b.loglik == pytest.approx(ll, rel=1e-10)
    with pytest.raises(MlsemError, match=r"weights column 'x' varies within top-level unit"):
        mlsem.fit(d, F, weights="x")
