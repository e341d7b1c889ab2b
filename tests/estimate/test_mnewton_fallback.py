"""Several outcomes: when Newton and L-BFGS-B on the grouped data do not converge, the
full data are fitted from the default start.  A fuzz case (two outcomes in units 1e-3
and 1e3, 48 counties; tests/reference/extra/fallback_bivariate.parquet) ended
unconverged at log-likelihood -684.93 on the grouped path while the full-data fit from
the default start (the path before grouping) converges at -454.376."""
import os

import pytest

import mlsem

PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference", "extra",
                    "fallback_bivariate.parquet")


def test_falls_back_to_the_full_data_from_the_default_start():
    r = mlsem.fit(PATH, ["y1 ~ x + (1 | k)", "y2 ~ 1 + (1 | k)"])
    assert r.converged
    assert r.loglik == pytest.approx(-454.3759750692, abs=1e-6)
    assert r.opt.path == "full"
