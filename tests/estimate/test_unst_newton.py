"""Issue 14 (unst): Newton with the exact Hessian of mlsem.model.unst in the fit.

Covariance blocks of random intercepts (unstructured, equal; with or without the
county effect) fit by Newton from the moment start must reach the log-likelihood of
the L-BFGS-B path (the path before mlsem.model.unst, forced here) or a higher one,
with the same estimates and standard errors where the optimum is inside; a fit whose
block is singular at the optimum falls back to L-BFGS-B and says so.  A fuzz over
random unbalanced designs, scales 1e-3..1e3 and near-zero covariances checks the
log-likelihood is never lower."""
import numpy as np
import polars as pl
import pytest

import mlsem
import mlsem.estimate.grouped as G

UNST = {"variance": "slot", "covariance": "unstructured"}
COV = np.array([[1.0, 0.5, 0.3, 0.2], [0.5, 0.8, 0.4, 0.1], [0.3, 0.4, 1.2, 0.5], [0.2, 0.1, 0.5, 0.9]])


def _lbfgsb(monkeypatch, d, f, **kw):
    with monkeypatch.context() as m:
        m.setattr(G, "why_not_unst", lambda model: "forced off")
        return mlsem.fit(d, f, **kw)


def _data(counties=400, seed=3, **kw):
    return mlsem.simulate(counties, (1, 4), (2, 8), intercept=1.0, slope=0.5, sd_county=0.0,
                          school_cov=COV, sd_resid=1.0, x="normal", seed=seed, **kw)


@pytest.mark.parametrize("f,spec,extra", [
    ("y ~ x + (1 | k:j)", UNST, {}),
    ("y ~ x + (1 | k:j)", {"variance": "slot", "covariance": "equal"}, {}),
    ("y ~ x + (1 | k:j)", UNST, {"residuals": {"variance": "j"}}),
    ("y ~ x + (1 | k/j)", {"variance": "slot", "covariance": [(1, 2), (3, 4)]}, {}),
])
def test_newton_equals_lbfgsb(monkeypatch, f, spec, extra):
    d = _data()
    new = mlsem.fit(d, f, effects={"j": spec}, **extra)
    old = _lbfgsb(monkeypatch, d, f, effects={"j": spec}, **extra)
    assert new.opt.method == "newton" and new.opt.exact_hessian_reason is None, new.opt.exact_hessian_reason
    assert "mlsem.model.unst" in new.opt.message
    assert old.opt.exact_hessian_reason == "forced off" or "covariances" in old.opt.exact_hessian_reason
    assert new.converged and old.converged
    assert new.loglik >= old.loglik - 1e-10 * abs(old.loglik)
    assert new.loglik == pytest.approx(old.loglik, rel=1e-9)
    scale = np.maximum(np.abs(old.estimate), 1e-2 * np.max(np.abs(old.estimate)))
    assert np.max(np.abs(new.estimate - old.estimate) / scale) < 1e-4
    # the last Newton Hessian is the information: the standard errors agree
    assert np.allclose(np.sqrt(np.diag(new.cov)), np.sqrt(np.diag(old.cov)), rtol=1e-3)
    assert new.opt.evaluations < old.opt.evaluations


def test_singular_block_falls_back_and_says_so(monkeypatch):
    """Schools 3 and 4 share one effect (a singular covariance at the optimum)."""
    cov = COV.copy()
    cov[3] = cov[2]
    cov[:, 3] = cov[:, 2]
    d = mlsem.simulate(300, (1, 4), (2, 6), intercept=1.0, slope=0.5, sd_county=0.0,
                       school_cov=cov + 1e-12 * np.eye(4), x="normal", seed=2)
    new = mlsem.fit(d, "y ~ x + (1 | k:j)", effects={"j": UNST})
    old = _lbfgsb(monkeypatch, d, "y ~ x + (1 | k:j)", effects={"j": UNST})
    assert new.converged
    assert new.loglik >= old.loglik - 1e-9 * abs(old.loglik)
    if new.opt.method != "newton":
        assert "Newton (exact Hessian) stopped" in new.opt.exact_hessian_reason


def _fuzz_case(rng):
    J = int(rng.integers(2, 6))
    A = rng.normal(size=(J, J))
    cov = (A @ A.T / J + 0.05 * np.eye(J)) * float(rng.choice([1.0, 0.3]))
    if rng.random() < 0.25:
        cov = cov * 1e-4 + 1e-9 * np.eye(J)          # near-zero variances
    scale = 10.0 ** rng.uniform(-3, 3)
    d = mlsem.simulate(int(rng.integers(30, 150)), (1, J), (1, int(rng.integers(2, 9))), intercept=1.0,
                       slope=0.5, sd_county=float(rng.choice([0.0, 0.5])), school_cov=cov, x="normal",
                       seed=int(rng.integers(1_000_000)))
    d = d.with_columns(pl.col("y") * scale)
    f = str(rng.choice(["y ~ x + (1 | k:j)", "y ~ x + (1 | k/j)"]))
    kind = str(rng.choice(["unstructured", "equal"]))
    return d, f, {"effects": {"j": {"variance": "slot", "covariance": kind}}}


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_never_lower_than_lbfgsb(monkeypatch, seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(6):
        d, f, kw = _fuzz_case(rng)
        with pytest.warns() if False else _nowarn():
            new = mlsem.fit(d, f, **kw)
            old = _lbfgsb(monkeypatch, d, f, **kw)
        assert new.converged or not old.converged, (f, kw)
        assert new.loglik >= old.loglik - 1e-9 * abs(old.loglik), (f, kw, new.loglik, old.loglik)


class _nowarn:
    def __enter__(self):
        import warnings
        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        return self._c.__exit__(*a)
