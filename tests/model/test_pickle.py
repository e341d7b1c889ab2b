"""A prepared Model is what a Dask worker keeps in memory; retiring a worker
moves it to another one by pickling.  It must survive the round trip (its
threadpoolctl controller holds ctypes handles that cannot be pickled) and
evaluate to the same numbers afterwards."""
import pickle

import numpy as np

import mlsem
from mlsem.data.prepare import prepare
from mlsem.model.multilevel import Model
from mlsem.spec.formula import nest_levels, parse_formula
from mlsem.spec.table import multilevel_table


def test_model_pickles_and_evaluates_the_same():
    df = mlsem.simulate(40, (1, 4), (1, 6), seed=3)
    F = parse_formula("y ~ x + (1 | k/j)")
    levels = nest_levels(F)
    effects = {len(rt.group) - 1: list(rt.effects) for rt in F.random}
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index="i")
    m = Model(prep, multilevel_table(prep, F, levels))
    m2 = pickle.loads(pickle.dumps(m))
    assert (m2._blas_ctl is None) == (m._blas_ctl is None)
    psi = np.array([0.5 if p.kind in ("var", "resid") else 0.1 for p in m.table.params])
    ll1, g1 = m.evaluate(psi)
    ll2, g2 = m2.evaluate(psi)
    assert ll1 == ll2
    np.testing.assert_array_equal(g1, g2)
