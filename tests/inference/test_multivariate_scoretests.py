"""Score tests of the covariances across outcomes fixed at 0 (issue 15, item 4):
mlsem.inference.mscoretests.  Under the null (outcomes simulated independent) the score
statistic and the LR statistic of the same restriction agree to O(n^-1/2), and the
expected parameter change is the unrestricted estimate to first order."""
import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.errors import MlsemError

F = ["y1 ~ x + (1 | k/j)", "y2 ~ x + (1 | k/j)"]


@pytest.fixture(scope="module")
def null_data():
    df = mlsem.simulate(400, (1, 5), (1, 10), intercept=1.0, slope=0.5, sd_county=1.0,
                        sd_school=0.7, sd_resid=1.0, x="normal", seed=3)
    rng = np.random.default_rng(4)
    k, j = df["k"].to_numpy(), df["j"].to_numpy()
    school = np.unique(np.c_[k, j], axis=0, return_inverse=True)[1].ravel()
    y2 = (-0.5 + 0.3 * df["x"].to_numpy() + rng.normal(0, 0.6, k.max() + 1)[k]
          + rng.normal(0, 0.5, school.max() + 1)[school] + rng.normal(0, 0.8, len(k)))
    return df.rename({"y": "y1"}).with_columns(pl.Series("y2", y2))


@pytest.mark.parametrize("level,name", [("k", "cov(k:y1,k:y2)"), ("j", "cov(j:y1,j:y2)"),
                                        ("residual", "cov(Residual:y1,Residual:y2)")])
def test_score_statistic_near_the_lr_statistic_under_the_null(null_data, level, name):
    full = mlsem.fit(null_data, F)
    r = mlsem.fit(null_data, F, outcomes={level: "independent"})
    st = r.score_tests()
    assert st.height == 1 and st["param"][0] == name and st["df"][0] == 1
    lr = mlsem.lrtest(r, full)
    assert st["chi2"][0] == pytest.approx(lr.chi2, rel=0.05, abs=0.02)
    est = dict(zip(full.names, full.estimate))[name]
    assert st["epc"][0] == pytest.approx(est, rel=0.05)


def test_joint_rows_and_refusals():
    d = mlsem.example_data("multivariate")
    ind = mlsem.fit(d, F, outcomes={"k": "independent", "j": "independent", "residual": "independent"})
    st = ind.score_tests()
    assert st["type"].to_list() == ["fixed", "fixed", "fixed", "joint"]
    assert st["df"][-1] == 3 and st["chi2"][-1] > max(st["chi2"][:3])
    assert mlsem.fit(d, F).score_tests().height == 0     # nothing fixed at 0: nothing to test
    with pytest.raises(MlsemError, match="information"):
        ind.score_tests(information="expected")
