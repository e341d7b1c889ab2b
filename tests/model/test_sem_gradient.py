"""The general-SEM chain rule: analytic gradients against central differences,
the Cython kernel against the NumPy oracle, and the factor path (with probe
latents) against the dense path."""
import os

import numpy as np
import polars as pl
import pytest

from mlsem.api.bridge import multilevel
from mlsem.spec.lavaan import parse
from mlsem.data.wide import prepare_wide
from mlsem.model.sem import SemModel
from mlsem.spec.semtable import build_table
from conftest import REF

HS = pl.read_parquet(os.path.join(REF, "hs_cfa_missing.parquet"))
IV = pl.read_parquet(os.path.join(REF, "iv_endogenous.parquet"))

CFA = "visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\nspeed =~ x7 + x8 + x9"
MODELS = {
    "cfa": (CFA, HS),
    "cfa_corr_resid": (CFA + "\nx1 ~~ x4\nx2 ~~ x3", HS),
    "structural": ("visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\ntextual ~ visual + x7\n"
                   "visual ~ x8", HS),
    "labels": ("visual =~ x1 + a*x2 + b*x3\ntextual =~ x4 + x5 + c*x6\na == 2*b + c\n"
               "x4 ~~ e*x4\nx5 ~~ e*x5", HS),
    "latent_mean": ("visual =~ x1 + x2 + x3\nvisual ~ 1\nx1 ~ 0*1", HS),
    "higher_order": ("visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\nspeed =~ x7 + x8 + x9\n"
                     "g =~ visual + textual + speed", HS),
    "iv": ("y ~ x\nx ~ z\ny ~~ x", IV),
}


def _model(name, backend="cython"):
    src, d = MODELS[name]
    tab = build_table(parse(src), d.columns)
    cols = tab.observed + tab.covariates
    Y = np.column_stack([d[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in tab.observed])
    X = (np.column_stack([d[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in tab.covariates])
         if tab.q else np.zeros((d.height, 0)))
    assert set(cols) <= set(d.columns)
    return SemModel(tab, prepare_wide(tab, Y, X), backend=backend)


def _point(m, seed=0):
    rng = np.random.default_rng(seed)
    psi = m.start_values()
    return psi * (1 + 0.1 * rng.standard_normal(len(psi))) + 0.02 * rng.standard_normal(len(psi))


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_matches_central_differences(name):
    m = _model(name)
    psi = _point(m)
    ll, g = m.evaluate(psi)
    assert ll is not None and np.isfinite(ll)
    num = np.zeros_like(psi)
    for i in range(len(psi)):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        num[i] = (m.evaluate(up, False)[0] - m.evaluate(dn, False)[0]) / (2 * h)
    assert np.allclose(g, num, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(num).max()) * 1e-2), (g, num)


@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_matches_numpy_oracle(name):
    m = _model(name)
    o = _model(name, backend="numpy")
    psi = _point(m, 1)
    ll, g = m.evaluate(psi)
    ll0, g0 = o.evaluate(psi)
    assert ll == pytest.approx(ll0, rel=1e-12, abs=1e-9)
    assert np.allclose(g, g0, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("name", ["cfa", "structural", "labels", "latent_mean", "higher_order"])
def test_factor_path_with_probes_equals_dense_path(name):
    m = _model(name)
    assert m.factor_path
    psi = _point(m, 2)
    ll, g = m.evaluate(psi)
    assert m.kernel_calls["factor"] == 1
    m.factor_path = False
    ll2, g2 = m.evaluate(psi)
    assert m.kernel_calls["dense"] == 1
    assert ll == pytest.approx(ll2, rel=1e-12)
    assert np.allclose(g, g2, rtol=1e-9, atol=1e-8)


def test_path_choice():
    assert _model("cfa").factor_path
    assert not _model("cfa_corr_resid").factor_path      # Theta not diagonal
    assert not _model("iv").factor_path                  # phantom latents: Theta has zeros


def test_heywood_point_falls_back_to_dense():
    """A negative latent variance with Sigma still positive definite is a valid
    point of the objective (lavaan does not bound variances): the dense path
    evaluates it."""
    m = _model("cfa")
    psi = m.start_values()
    k = m.table.names.index("speed~~speed")
    psi[k] = -0.01
    ll, g = m.evaluate(psi)
    assert ll is not None and m.kernel_calls["dense"] == 1


def test_round_trip_model_gradient():
    d = pl.read_parquet(os.path.join(REF, "unbalanced.parquet"))
    spec = multilevel("y ~ x1 + z + (1 | k/j)", d)
    w = spec.to_wide()
    tab = build_table(parse(spec.to_syntax()), w.columns)
    Y = np.column_stack([w[c].to_numpy() for c in tab.observed]).astype(float)
    X = np.column_stack([w[c].to_numpy() for c in tab.covariates]).astype(float)
    m = SemModel(tab, prepare_wide(tab, Y, X))
    o = SemModel(tab, prepare_wide(tab, Y, X), backend="numpy")
    psi = _point(m, 3)
    ll, g = m.evaluate(psi)
    ll0, g0 = o.evaluate(psi)
    assert ll == pytest.approx(ll0, rel=1e-12)
    assert np.allclose(g, g0, rtol=1e-9, atol=1e-8)
    for i in range(len(psi)):
        h = 1e-6 * max(1.0, abs(psi[i]))
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        num = (m.evaluate(up, False)[0] - m.evaluate(dn, False)[0]) / (2 * h)
        assert g[i] == pytest.approx(num, rel=1e-5, abs=1e-4)
