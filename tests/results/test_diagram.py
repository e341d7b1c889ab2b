"""Path diagrams: generated from the parameter table, so a hand-made relaxed
table (correlated school effects) draws its extra arcs without special code."""
import re
import shutil

import numpy as np
import pytest

import mlsem
from mlsem.results.diagram import DiagramModel, from_formula, from_result, to_dot, write
from mlsem.errors import MlsemError
from mlsem.spec.table import CholBlock, Param, ParamTable
from conftest import REF

SEED_LOADINGS = [(0, 0, "1"), (0, 1, "1"), (1, 0, "1"), (1, 1, "1"),
                 (2, 0, "1"), (2, 2, "1"), (3, 0, "1"), (3, 2, "1")]


def relaxed_table():
    """The seed's model with the school effects of slots 1 and 2 given their
    own variances and a covariance (latents: 0 = k, 1 = j[1], 2 = j[2])."""
    params = [Param("Intercept", "fixed"), Param("x", "fixed"), Param("var(k)", "var", 0.0, "k"),
              Param("var(j[1])", "var", 0.0, "j"), Param("cov(j[1],j[2])", "cov", -np.inf, "j"),
              Param("var(j[2])", "var", 0.0, "j"), Param("var(Residual)", "resid", 0.0, "Residual")]
    return ParamTable(params=params, beta_param=np.array([0, 1]),
                      phi_row=np.array([0, 1, 1, 2, 2]), phi_col=np.array([0, 1, 2, 1, 2]),
                      phi_param=np.array([2, 3, 4, 4, 5]),
                      theta_row=np.arange(4), theta_col=np.arange(4), theta_param=np.full(4, 6),
                      nlatent=3, nslots=4, chol_blocks=[CholBlock([[1, 2]], np.array([[3, 4], [4, 5]]))],
                      latent_names=["k", "j[1]", "j[2]"])


def edges(dot):
    return re.findall(r"^\s*(\w+)(?::\w+)? -> (\w+)(?::\w+)? \[(.*)\];$", dot, flags=re.M)


def test_seed_model():
    dot = to_dot(from_formula("y ~ x + (1 | k/j)", (2, 2)))
    for lab in ["y[1,1]", "y[1,2]", "y[2,1]", "y[2,2]", "x[1,1]", "x[2,2]"]:
        assert f'label="{lab}' in dot
    assert dot.count("shape=ellipse") == 3 and dot.count("shape=box") == 8
    e = edges(dot)
    loads = [(a, b) for a, b, attr in e if 'label="1"' in attr]
    assert sorted(loads) == sorted([("L0", f"Y{s}") for s in range(4)]
                                   + [("L1", "Y0"), ("L1", "Y1"), ("L2", "Y2"), ("L2", "Y3")])
    # one coefficient label on every x -> y path, variances as double-headed self arcs
    assert sum('label="x"' in attr and "dir=back" in attr for _, _, attr in e) == 4
    arcs = [(a, b, attr) for a, b, attr in e if "dir=both" in attr]
    assert sorted((a, re.search(r'label="([^"]*)"', attr).group(1)) for a, b, attr in arcs if a == b) == sorted(
        [("L0", "var(k)"), ("L1", "var(j)"), ("L2", "var(j)")] + [(f"Y{s}", "var(Residual)") for s in range(4)])
    assert not [1 for a, b, _ in arcs if a != b]


def test_relaxed_table_draws_the_covariance():
    dm = DiagramModel(relaxed_table(), "y", ["1,1", "1,2", "2,1", "2,2"], SEED_LOADINGS, ["Intercept", "x"])
    dot = to_dot(dm)
    arcs = [(a, b, attr) for a, b, attr in edges(dot) if "dir=both" in attr and a != b]
    assert len(arcs) == 1
    a, b, attr = arcs[0]
    assert {a, b} == {"L1", "L2"} and "cov(j[1],j[2])" in attr and "style=dashed" in attr
    assert 'label="var(j[1])"' in dot and 'label="var(j[2])"' in dot


def test_estimates_on_paths():
    res = mlsem.fit(REF / "seed_balanced.parquet", "y ~ x + (1 | k/j)")
    dot = to_dot(from_result(res))
    v = res.coef["var(j)"]
    assert f"var(j)\\n= {v:.3g}" in dot
    assert f"x\\n= {res.coef['x']:.3g}" in dot
    assert f"Intercept\\n= {res.coef['Intercept']:.3g}".replace("\\n", " ") in dot


def test_many_slots_collapse():
    dm = from_formula("y ~ x + (1 | k/j)", (50, 8))          # 400 slots
    dot = to_dot(dm, max_slots=8)
    nbox = len(re.findall(r"^\s*Y\d+ \[", dot, flags=re.M))
    assert nbox <= 8
    assert "(384 more slots)" in dot and "(48 latents)" in dot
    assert "(8 slots)" in dot
    assert len(dot) < 8000


def test_render_png_and_svg(tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed")
    dm = from_formula("y ~ x + (1 | k/j)", (2, 2))
    write(to_dot(dm), tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write(to_dot(dm), tmp_path / "m.svg")
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()


def test_no_graphviz_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    dm = from_formula("y ~ x + (1 | k/j)", (2, 2))
    with pytest.raises(MlsemError, match="apt-get install graphviz"):
        write(to_dot(dm), tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
    write(to_dot(dm), tmp_path / "m.dot")        # DOT needs no Graphviz
    assert (tmp_path / "m.dot").read_text().startswith("digraph")


def test_bad_design_and_format():
    with pytest.raises(MlsemError, match="--design"):
        from_formula("y ~ x + (1 | k/j)", (2, 2, 2))
    with pytest.raises(MlsemError, match="format"):
        write("digraph {}", "m.jpg")


def test_parameters_without_entries_are_listed():
    """A parameter that no phi/theta/beta entry carries (a structured residual
    correlation computed by a function) is listed in a note, not lost."""
    dm = from_formula("y ~ x + (1 | k/j)", (2, 2))
    dm.table.params.append(Param("corr(Residual)", "rcov"))
    dm.estimates = {"corr(Residual)": 0.0604}
    dot = to_dot(dm)
    assert "shape=note" in dot and "not drawn as paths: corr(Residual) = 0.0604" in dot
