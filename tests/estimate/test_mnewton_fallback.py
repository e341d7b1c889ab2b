"""Several outcomes: when Newton and L-BFGS-B on the grouped data do not converge, the
full data are fitted from the default start.  A fuzz case (two outcomes in units 1e-3
and 1e3, 48 counties; tests/reference/extra/fallback_bivariate.parquet) ended
unconverged at log-likelihood -684.93 on the grouped path while the full-data fit from
the default start (the path before grouping) converges at -454.376.  Whether the grouped
L-BFGS-B run fails on it depends on the last bits of the start (mfast2: the per-outcome
least squares by one BLAS product instead of bincounts made it converge there, at the
same -454.376), so the fallback itself is tested with the grouped run made to fail."""
import os

import pytest

import mlsem
from mlsem.estimate import mnewton
from mlsem.model.mreduced import MultiReduced

PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference", "extra",
                    "fallback_bivariate.parquet")
FS = ["y1 ~ x + (1 | k)", "y2 ~ 1 + (1 | k)"]


def test_fuzz_case_converges_at_the_optimum():
    r = mlsem.fit(PATH, FS)
    assert r.converged
    assert r.loglik == pytest.approx(-454.3759750692, abs=1e-6)


def test_falls_back_to_the_full_data_from_the_default_start(monkeypatch):
    real = mnewton.optimize

    def grouped_fails(model, **kw):
        opt = real(model, **kw)
        if isinstance(model, MultiReduced):
            opt.converged = False
            opt.loglik = -684.93
        return opt

    monkeypatch.setattr(mnewton, "optimize", grouped_fails)
    monkeypatch.setattr(mnewton, "newton_multi", lambda *a: "made to stop (test)")
    monkeypatch.setattr(mnewton, "newton_exact", lambda *a: "made to stop (test)")
    r = mlsem.fit(PATH, FS)
    assert r.converged
    assert r.loglik == pytest.approx(-454.3759750692, abs=1e-6)
    assert r.opt.path == "full"
    assert r.opt.grouped_reason == "the run on the grouped data did not converge"
