"""Several outcomes (issue 15), the reviewer's findings: one grouping level (against
nlme), an outcome used as a covariate refused, the Wald test without the intercepts,
BLUPs of an outcome a unit has no cell of (against nlme's ranef), lrtest with the
outcomes in another order, the summary's counts.  Reference values:
tests/reference/extra/multivariate_extra.R -> multivariate_extra.json."""
import json
import os

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.api.multivariate import covariance_matrix
from mlsem.errors import MlsemError

HERE = os.path.dirname(os.path.dirname(__file__))
FIXED = {"outcomey1": "y1:Intercept", "outcomey2": "y2:Intercept",
         "outcomey1:x": "y1:x", "outcomey2:x": "y2:x"}


def _ref(case):
    with open(os.path.join(HERE, "reference", "extra", "multivariate_extra.json")) as f:
        return json.load(f)[case]


@pytest.fixture(scope="module")
def two_level():
    return mlsem.fit(mlsem.example_data("multivariate"), ["y1 ~ x + (1 | k)", "y2 ~ x + (1 | k)"])


def test_one_grouping_level_against_nlme(two_level):
    """Pupils in counties: crashed (polars ShapeError) before; nlme lme ML on the stacked
    data (pdSymm at k, varIdent + corSymm within pupil)."""
    ref, r = _ref("two_level"), two_level
    assert r.converged
    assert r.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    assert r.nobs == ref["nobs_values"]
    est, se = dict(zip(r.names, r.estimate)), dict(zip(r.names, r.std_err))
    for rn, mn in FIXED.items():
        assert est[mn] == pytest.approx(ref["fixed"][rn], rel=1e-4, abs=1e-5), mn
        assert se[mn] == pytest.approx(ref["fixed_se"][rn], rel=1e-3), mn
    np.testing.assert_allclose(covariance_matrix(r, "k"), np.array(ref["cov_k"]), rtol=1e-3)
    np.testing.assert_allclose(covariance_matrix(r, "Residual"), np.array(ref["cov_residual"]),
                               rtol=1e-3)


def test_one_grouping_level_j():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # 4 schools ids: the covariance is near singular
        r = mlsem.fit(mlsem.example_data("multivariate"), ["y1 ~ x + (1 | j)", "y2 ~ x + (1 | j)"])
    assert np.isfinite(r.loglik) and r.nobs == 4971
    assert "var(j:y2)" in r.names and r.levels[0].ngroups == 4


@pytest.mark.parametrize("formulas,outcome,text", [
    (["y1 ~ x + (1|k/j)", "y2 ~ x + y1 + (1|k/j)"], "y1", "y2 ~ x + y1 + (1|k/j)"),
    (["y1 ~ x + y2 + (1|k/j)", "y2 ~ x + y1 + (1|k/j)"], "y2", "y1 ~ x + y2 + (1|k/j)"),
    (["y1 ~ x + (1|k/j)", "y2 ~ x + I(y1 ** 2) + (1|k/j)"], "y1", "y2 ~ x + I(y1 ** 2) + (1|k/j)"),
])
def test_outcome_as_covariate_refused(formulas, outcome, text):
    """Fitted silently before (NaN SEs; each in the other's formula: loglik +4974.6)."""
    with pytest.raises(MlsemError) as e:
        mlsem.fit(mlsem.example_data("multivariate"), formulas)
    msg = str(e.value)
    assert f"outcome {outcome!r} is a covariate" in msg and text in msg


@pytest.mark.parametrize("groups", ["k/j", "k"])
def test_wald_fixed_excludes_every_intercept(two_level, groups):
    """Univariate fits exclude the intercept; the several-outcome one included them (df 4)."""
    r = two_level if groups == "k" else mlsem.fit(
        mlsem.example_data("multivariate"), [f"y1 ~ x + (1 | {groups})", f"y2 ~ x + (1 | {groups})"])
    w = r.wald_fixed()
    idx = [r.names.index("y1:x"), r.names.index("y2:x")]
    b = np.asarray(r.estimate)[idx]
    V = np.asarray(r.cov)[np.ix_(idx, idx)]
    assert w["df"] == 2
    assert w["chi2"] == pytest.approx(float(b @ np.linalg.solve(V, b)), rel=1e-10)
    assert f"Wald chi2(2)      = {w['chi2']:>10.2f}" in r.summary()


def test_summary_counts_cells_and_units(two_level):
    s = two_level.summary()
    assert "Number of cells   =      4,971" in s
    assert "Number of units   =      2,619" in s
    # the per-group table counts cells too, and says so
    assert "Cells per Group" in s and "Observations per Group" not in s


def _blank_y2(d):
    return d.with_columns(
        pl.when(pl.col("k").is_in([1, 2]) | ((pl.col("k") == 3) & (pl.col("j") == 1)))
        .then(None).otherwise(pl.col("y2")).alias("y2"))


def test_random_effects_of_an_outcome_without_cells_against_nlme():
    """Counties 1, 2 and school (3, 1) have no y2 cell: their y2 effects E[u | data] (through
    the covariance across outcomes) were left out before; nlme's ranef gives them."""
    ref = _ref("unit_missing")
    r = mlsem.fit(_blank_y2(mlsem.example_data("multivariate")), ref["formula"])
    assert r.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    re = r.random_effects()
    rk = re.filter(pl.col("level") == "k")
    for o in ("y1", "y2"):
        got = [rk.filter((pl.col("k") == k) & (pl.col("effect") == o))["mean"].item()
               for k in ref["ranef_k"]["k"]]
        np.testing.assert_allclose(got, ref["ranef_k"][o], atol=1e-4)
    rj = re.filter(pl.col("level") == "j")
    for o in ("y1", "y2"):
        got = []
        for kj in ref["ranef_j"]["kj"]:
            k, j = map(int, kj.split("/"))
            got.append(rj.filter((pl.col("k") == k) & (pl.col("j") == j)
                                 & (pl.col("effect") == o))["mean"].item())
        np.testing.assert_allclose(got, ref["ranef_j"][o], atol=1e-4)
    # every node has both outcomes' effects, each once
    assert re.group_by(["level", "k", "j"]).len()["len"].unique().to_list() == [2]


def test_lrtest_outcomes_in_another_order():
    d = mlsem.example_data("multivariate")
    full = mlsem.fit(d, ["y1 ~ x + (1 | k)", "y2 ~ x + (1 | k)"])
    ind = mlsem.fit(d, ["y2 ~ x + (1 | k)", "y1 ~ x + (1 | k)"],
                    outcomes={"k": "independent", "residual": "independent"})
    t = mlsem.lrtest(ind, full)
    assert t.df == 2
    assert t.chi2 == pytest.approx(2 * (full.loglik - ind.loglik), rel=1e-9)
