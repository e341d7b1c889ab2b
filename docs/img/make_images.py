"""Regenerate the pictures of docs/diagram.md (run from the repository root:
``PYTHONPATH=. python docs/img/make_images.py``; needs Graphviz's ``dot``)."""
import pathlib

import numpy as np

import mlsem
from mlsem.results.diagram import DiagramModel, from_formula, from_result, to_dot, write
from mlsem.spec.table import CholBlock, Param, ParamTable

here = pathlib.Path(__file__).parent
ref = here.parent.parent / "tests" / "reference"

# 1. the seed's model, drawn from the formula (2 schools x 2 pupils)
write(to_dot(from_formula("y ~ x + (1 | k/j)", (2, 2))), here / "seed_model.png")

# 2. the same model fitted to the seed's data: estimates on the paths
res = mlsem.fit(ref / "seed_balanced.parquet", "y ~ x + (1 | k/j)")
write(to_dot(from_result(res)), here / "seed_fitted.png")

# 3. a relaxed model: school effects with their own variance per slot and a
#    covariance between slots 1 and 2, as a hand-made parameter table
params = [Param("Intercept", "fixed"), Param("x", "fixed"), Param("var(k)", "var", 0.0, "k"),
          Param("var(j[1])", "var", 0.0, "j"), Param("cov(j[1],j[2])", "cov", -np.inf, "j"),
          Param("var(j[2])", "var", 0.0, "j"), Param("var(Residual)", "resid", 0.0, "Residual")]
table = ParamTable(params=params, beta_param=np.array([0, 1]),
                   phi_row=np.array([0, 1, 1, 2, 2]), phi_col=np.array([0, 1, 2, 1, 2]),
                   phi_param=np.array([2, 3, 4, 4, 5]),
                   theta_row=np.arange(4), theta_col=np.arange(4), theta_param=np.full(4, 6),
                   nlatent=3, nslots=4, chol_blocks=[CholBlock([[1, 2]], np.array([[3, 4], [4, 5]]))],
                   latent_names=["k", "j[1]", "j[2]"])
loadings = [(0, 0, "1"), (0, 1, "1"), (1, 0, "1"), (1, 1, "1"),
            (2, 0, "1"), (2, 2, "1"), (3, 0, "1"), (3, 2, "1")]
dm = DiagramModel(table, "y", ["1,1", "1,2", "2,1", "2,2"], loadings, ["Intercept", "x"],
                  title="relaxed: school effects by slot, correlated")
write(to_dot(dm), here / "relaxed_model.png")

# 4. a large unbalanced model (up to 10 schools x 20 pupils: 200 slots), fitted
big = mlsem.simulate(2000, (1, 10), (1, 20), sd_school=0.7, seed=7)
res = mlsem.fit(big, "y ~ x + (1 | k/j)")
write(to_dot(from_result(res)), here / "large_fitted.png")
print("wrote", *sorted(p.name for p in here.glob("*.png")))
