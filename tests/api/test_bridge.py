"""The bridge: a nested model as wide data + lavaan syntax fits to the same
likelihood and estimates as mlsem.fit on the long data; hand-written
relaxations in syntax match lavaan on the wide form."""
import json
import os
import time

import numpy as np
import polars as pl
import pytest

import mlsem
from conftest import REF


def _case(name):
    with open(os.path.join(REF, f"{name}.json")) as f:
        ref = json.load(f)
    return ref, pl.read_parquet(os.path.join(REF, f"{name}.parquet"))


# every lme4 reference case with at most 400 slots (egsingle has 456 slots)
ROUND_TRIP = ["seed_balanced", "unbalanced", "hetero_corr", "pastes", "medium"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(name):
    ref, d = _case(name)
    formula = ref["formula"]
    spec = mlsem.multilevel(formula, d)
    assert spec.prep.nslots <= 400
    res_long = mlsem.fit(d, formula)
    res_wide = mlsem.sem(spec.to_syntax(), spec.to_wide(d))
    assert res_wide.converged and res_long.converged
    assert res_wide.kernel == "factor"       # Theta diagonal -> the factor kernel
    assert abs(res_wide.loglik - res_long.loglik) < 1e-6
    for n, v in res_long.coef.items():
        assert res_wide.coef[spec.sem_name(n)] == pytest.approx(v, rel=1e-6, abs=1e-8), n
    # and both match lme4
    assert abs(res_wide.loglik - ref["lme4"]["loglik"]) < 1e-4


def test_egsingle_is_over_the_slot_limit():
    ref, d = _case("egsingle")
    assert mlsem.multilevel(ref["formula"], d).prep.nslots > 400


def test_wide_columns_and_syntax_shape():
    ref, d = _case("unbalanced")
    spec = mlsem.multilevel(ref["formula"], d)
    w = spec.to_wide(d)
    assert w.height == 300
    assert w.columns[0] == "k"
    assert w.columns[1:3] == ["y1_1", "y1_2"]
    assert "x11_1" in w.columns and "z1_1" in w.columns    # covariate x1 in slot (1, 1)
    assert len(w.columns) == 1 + 3 * 24
    # a missing slot's covariates are null, never zero-filled
    ycols = [c for c in w.columns if c.startswith("y")]
    for yc in ycols:
        s = yc[1:]
        assert (w[yc].is_null() == w[f"z{s}"].is_null()).all()
    syn = spec.to_syntax()
    assert "L_k =~ 1*y1_1" in syn
    assert "y1_1 ~ b_Intercept*1 + b_x1*x11_1 + b_z*z1_1" in syn
    assert "y1_1 ~~ var_Residual*y1_1" in syn
    assert "L_k ~~ 0*L_j_1" in syn      # lavaan would free covariances of exogenous latents


def test_seed_layout():
    ref, d = _case("seed_balanced")
    spec = mlsem.multilevel("y ~ x + (1 | k/j)", d)
    w = spec.to_wide()
    assert w.columns == ["k", "y1_1", "y1_2", "y2_1", "y2_2", "x1_1", "x1_2", "x2_1", "x2_2"]
    assert w.height == 100 and w.null_count().sum_horizontal().item() == 0


def test_speed_unbalanced_wide():
    """The unbalanced case as a wide SEM (24 slots, 300 rows): OpenMx takes about
    1.6 s on this machine (benchmarks/sem_unbalanced.py); mlsem must take well
    under a second (generous bound here: the machine is shared)."""
    ref, d = _case("unbalanced")
    spec = mlsem.multilevel(ref["formula"], d)
    syn, w = spec.to_syntax(), spec.to_wide(d)
    mlsem.sem(syn, w)
    t = time.perf_counter()
    mlsem.sem(syn, w)
    assert time.perf_counter() - t < 1.0


def _relaxed(spec, variant):
    syn = spec.to_syntax()
    syn = syn.replace("L_j_1 ~~ var_j*L_j_1", "L_j_1 ~~ sv1*L_j_1").replace(
        "L_j_2 ~~ var_j*L_j_2", "L_j_2 ~~ sv2*L_j_2")
    if variant in ("unstructured_noU", "hetero_corr12"):
        syn = syn.replace("L_j_1 ~~ 0*L_j_2", "L_j_1 ~~ c12*L_j_2")
    if variant == "unstructured_noU":
        syn = "\n".join(ln for ln in syn.splitlines() if "L_k" not in ln)
    return syn


LAVAAN_NAMES = {"b_x": "b_x", "c": "b_Intercept", "se": "var_Residual", "su": "var_k",
                "sv1": "sv1", "sv2": "sv2", "c12": "c12"}


@pytest.mark.parametrize("variant", ["hetero", "unstructured_noU"])
def test_relaxation_in_syntax_matches_lavaan(variant):
    ref, d = _case("hetero_corr")
    lav = ref["lavaan"][variant]
    spec = mlsem.multilevel(ref["formula"], d)
    res = mlsem.sem(_relaxed(spec, variant), spec.to_wide())
    assert res.converged and res.identified
    assert abs(res.loglik - lav["loglik"]) < 1e-4
    for k, v in lav["estimates"].items():
        assert res.coef[LAVAAN_NAMES[k]] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for k, v in lav.get("std_errors", {}).items():
        assert res.std_err[res.names.index(LAVAAN_NAMES[k])] == pytest.approx(v, rel=1e-3), k


def test_not_identified_relaxation_is_flagged():
    """hetero + a free covariance of the two school slots with the county effect
    kept: cov(V1, V2) and var(U) are confounded (lavaan warns)."""
    ref, d = _case("hetero_corr")
    spec = mlsem.multilevel(ref["formula"], d)
    res = mlsem.sem(_relaxed(spec, "hetero_corr12"), spec.to_wide())
    assert not res.identified
    assert {"var_k", "c12"} <= set(res.confounded)
    assert "b_x" not in res.confounded
    assert abs(res.loglik - ref["lavaan"]["hetero_corr12"]["loglik"]) < 1e-4
    assert "NOT identified" in res.summary()


def test_random_slopes_have_no_plain_syntax():
    ref, d = _case("unbalanced")
    with pytest.raises(mlsem.MlsemError, match="definition variables"):
        mlsem.multilevel("y ~ x1 + (1 + x1 | k) + (1 | k:j)", d).to_syntax()


def test_covariate_missing_where_outcome_observed_drops_the_cell():
    """A missing covariate of an observed outcome drops that cell (mlsem.fit drops
    the observation), with a note; it is never zero-filled."""
    ref, d = _case("seed_balanced")
    d2 = d.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("x")).alias("x"))
    long = mlsem.fit(d2, "y ~ x + (1 | k/j)")
    spec = mlsem.multilevel("y ~ x + (1 | k/j)", d)          # slots of the complete data
    w = spec.to_wide(d)
    row = d2.row(5, named=True)
    # blank the same covariate cell in the wide frame
    lab = spec.prep.slot_labels
    s = lab.filter((pl.col("j") == row["j"]) & (pl.col("obs") == row["i"]))["slot"].item()
    col = spec.x_cols["x"][s]
    w = w.with_columns(pl.when(pl.col("k") == row["k"]).then(None).otherwise(pl.col(col)).alias(col))
    res = mlsem.sem(spec.to_syntax(), w)
    assert abs(res.loglik - long.loglik) < 1e-6
    assert any("covariate" in n for n in res.notes)


with open(os.path.join(REF, "extra", "sem_relaxed.json")) as _f:
    SEM_RELAXED = json.load(_f)


@pytest.mark.parametrize("name", sorted(SEM_RELAXED["models"]))
def test_seed_sem_and_hand_written_relaxations_match_lavaan(name):
    """The seed's sem in lavaan syntax, and relaxations written by hand (a residual
    covariance among the public school's pupils, with a defined parameter; a
    residual variance per school), against lavaan 0.6-14
    (tests/reference/extra/make_sem_relaxed.R)."""
    m = SEM_RELAXED["models"][name]
    wide = pl.read_csv(os.path.join(REF, "extra", "seed_example_wide.csv"))
    res = mlsem.sem(m["model"], wide)
    assert res.converged
    assert abs(res.loglik - m["loglik"]) < 1e-4
    defined = {d["lhs"]: d for d in res.defined}
    for k, v in m["estimates"].items():
        est = defined[k]["est"] if k in defined else res.coef[k]
        assert est == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for k, v in m["std_errors"].items():
        se = defined[k]["se"] if k in defined else res.std_err[res.names.index(k)]
        assert se == pytest.approx(v, rel=1e-3), k
    if name == "seed":
        long = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)")
        assert abs(res.loglik - long.loglik) < 1e-6


def test_relaxed_parameter_table_round_trips():
    """A relaxation is a rewrite of the parameter table's labels (here: var(j)
    per school slot, lavaan's `hetero`); the wide syntax written from the
    relaxed table fits to the same likelihood as the long fit of that table."""
    import copy

    from mlsem.api.bridge import MultilevelSpec
    from mlsem.estimate.optimize import optimize
    from mlsem.model.multilevel import Model
    from mlsem.spec.table import Param

    ref, d = _case("hetero_corr")
    spec = mlsem.multilevel(ref["formula"], d)
    t = copy.deepcopy(spec.multilevel_table)
    g2 = spec.prep.latent_names.index("j[2]")
    t.params.append(Param("var(j[2])", "var", 0.0, "j"))
    t.phi_param = t.phi_param.copy()
    t.phi_param[(t.phi_row == g2) & (t.phi_col == g2)] = len(t.params) - 1
    long = optimize(Model(spec.prep, t))
    relaxed = MultilevelSpec(spec.formula, spec.prep, t, spec.levels, spec.F)
    syn = relaxed.to_syntax()
    assert "L_j_2 ~~ var_j_2*L_j_2" in syn
    res = mlsem.sem(syn, relaxed.to_wide())
    assert abs(res.loglik - long.loglik) < 1e-6
    lav = ref["lavaan"]["hetero"]
    assert abs(res.loglik - lav["loglik"]) < 1e-4
    assert res.coef["var_j_2"] == pytest.approx(lav["estimates"]["sv2"], rel=1e-4)
    for i, n in enumerate(t.names):
        assert res.coef[relaxed.sem_name(n)] == pytest.approx(long.final[i], rel=1e-6, abs=1e-8), n
