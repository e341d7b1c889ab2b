"""lavaan syntax: the parser, errors that point at the token, defaults,
modifiers, equality constraints and defined parameters."""
import json
import os

import numpy as np
import polars as pl
import pytest

import mlsem
from mlsem.spec.lavaan import parse
from mlsem.spec.semtable import build_table
from conftest import REF

HS = pl.read_parquet(os.path.join(REF, "hs_cfa.parquet"))
CFA = "visual =~ x1 + x2 + x3\ntextual =~ x4 + x5 + x6\nspeed =~ x7 + x8 + x9"


def test_statements_and_modifiers():
    st = parse("# a comment\nf =~ x1 + NA*x2 + a*x3 + 0.5*x4 + start(0.2)*x5; y ~ 1 + b*x  ! another\n"
               "y ~~ c*y\nd := a * b\na == 2*b")
    assert [s.op for s in st] == ["=~", "~", "~~", ":=", "=="]
    t = st[0].terms
    assert [x.var for x in t] == ["x1", "x2", "x3", "x4", "x5"]
    assert t[1].free and t[2].label == "a" and t[3].fixed == 0.5 and t[4].start == 0.2
    assert st[1].terms[0].var == "1" and st[1].terms[1].label == "b"
    assert st[3].expr == "a * b" and st[4].lhs_expr == "a" and st[4].expr == "2*b"


def test_statement_continues_after_plus():
    st = parse("f =~ x1 + x2 +\n   x3\ng =~ x4 + x5")
    assert len(st) == 2 and len(st[0].terms) == 3


@pytest.mark.parametrize("src, where, token", [
    ("f =~ x1 + x2\ng =~ x4 + + x5", "line 2, column 11", "'+'"),
    ("f =~ x1 + x2 x3", "line 1, column 14", "'x3'"),
    ("f x1 x2", "line 1, column 3", "'x1'"),
    ("f =~ x1 + x2 $ x3", "line 1, column 14", "'$'"),
    ("y ~ x1 < 2", "line 1, column 8", "'<'"),
    ("f =~ x1 + c(a, b)*x2", "line 1, column 11", "'c'"),
    ("f =~ ", "line 1", "end of statement"),
])
def test_parse_errors_point_at_line_and_token(src, where, token):
    with pytest.raises(mlsem.MlsemError) as e:
        parse(src)
    msg = str(e.value)
    assert where in msg and token in msg, msg


def test_unknown_variable_names_line_and_column():
    with pytest.raises(mlsem.MlsemError, match=r"line 2, column 16: unknown variable 'x99'"):
        mlsem.sem("f =~ x1 + x2 + x3\ng =~ x4 + x5 + x99", HS)


def test_latent_without_indicators():
    with pytest.raises(mlsem.MlsemError, match="latent variable 'g' has no indicators"):
        mlsem.sem("f =~ x1 + x2 + x3\ng =~ 0*x4", HS)


def test_too_many_parameters():
    with pytest.raises(mlsem.MlsemError, match="10 free parameters but the data have only 9 moments"):
        mlsem.sem("f =~ NA*x1 + x2 + x3", HS)


def test_duplicate_and_bad_constraints():
    with pytest.raises(mlsem.MlsemError, match="specified twice"):
        mlsem.sem("f =~ x1 + x2 + x3\nf =~ x2", HS)
    with pytest.raises(mlsem.MlsemError, match="'q', which is not a parameter label"):
        mlsem.sem("f =~ x1 + a*x2 + x3\nd := a*q", HS)
    with pytest.raises(mlsem.MlsemError, match="only linear equality"):
        mlsem.sem("f =~ x1 + a*x2 + b*x3\na == b*b", HS)
    with pytest.raises(mlsem.MlsemError, match="not positive definite"):
        mlsem.sem("f =~ x1 + x2 + x3\nx2 ~~ -0.5*x2", HS)


def _key(lhs, op, rhs):
    return (lhs, op, rhs) if op != "~~" else (min(lhs, rhs), op, max(lhs, rhs))


with open(os.path.join(REF, "extra", "sem_defaults.json")) as _f:
    LAVAANIFY = json.load(_f)


@pytest.mark.parametrize("name", sorted(LAVAANIFY["models"]))
def test_lavaan_defaults(name):
    """The parameter table equals lavaan's (lavaanify with sem()'s defaults, stored
    by tests/reference/extra/make_sem_defaults.R): the same free rows, the same
    fixed rows and values; the fixed.x rows of the covariates are not parameters."""
    m = LAVAANIFY["models"][name]
    rows = [r for r in m["rows"] if not r["exo"]]
    src = m["model"]
    stmts = parse(src)
    names = set()
    for st in stmts:
        if st.op in ("=~", "~", "~~"):
            names.add(st.lhs)
            names.update(t.var for t in st.terms if t.var != "1")
    latents = {st.lhs for st in stmts if st.op == "=~"}
    t = build_table(stmts, sorted(names - latents))
    mine_free = {_key(e.lhs, e.op, e.rhs) for e in t.entries if e.full >= 0}
    mine_fixed = {_key(e.lhs, e.op, e.rhs): e.value for e in t.entries
                  if e.full < 0 and not e.lhs.endswith("*") and not (e.lhs == e.rhs and e.op == "=~")}
    lav_free = {_key(r["lhs"], r["op"], r["rhs"]) for r in rows if r["free"]}
    lav_fixed = {_key(r["lhs"], r["op"], r["rhs"]): r["ustart"] for r in rows if not r["free"]}
    assert mine_free == lav_free
    assert set(mine_fixed) == set(lav_fixed)
    for k, v in lav_fixed.items():
        assert mine_fixed[k] == pytest.approx(v if v is not None else 0.0), k
    # equal labels are one parameter: lavaan's count of free parameters
    assert t.nparams == len({r["lhs"] + r["op"] + r["rhs"] for r in rows if r["free"]})


def test_exogenous_latents_covary_by_default():
    res = mlsem.sem(CFA, HS)
    assert {"visual~~textual", "visual~~speed", "textual~~speed"} <= set(res.names)
    res0 = mlsem.sem(CFA + "\nvisual ~~ 0*textual + 0*speed\ntextual ~~ 0*speed", HS)
    assert res0.nparams == res.nparams - 3 and res0.loglik < res.loglik


def test_labels_and_equality_constraints():
    eq_lab = mlsem.sem(CFA.replace("x2 + x3", "a*x2 + a*x3"), HS)
    eq_con = mlsem.sem(CFA.replace("x2 + x3", "a*x2 + b*x3") + "\na == b", HS)
    assert eq_lab.nparams == eq_con.nparams == 29
    assert eq_lab.loglik == pytest.approx(eq_con.loglik, abs=1e-8)
    assert eq_lab.coef["a"] == pytest.approx(eq_con.coef["b"], rel=1e-7)
    twice = mlsem.sem(CFA.replace("x2 + x3", "a*x2 + b*x3") + "\na == 2*b", HS)
    rows = {(r["lhs"], r["op"], r["rhs"]): r for r in twice.sem_rows}
    assert rows[("visual", "=~", "x2")]["est"] == pytest.approx(2 * rows[("visual", "=~", "x3")]["est"], rel=1e-12)
    # the constrained parameter's SE by the delta method: se(a) = 2 se(b)
    assert rows[("visual", "=~", "x2")]["se"] == pytest.approx(2 * rows[("visual", "=~", "x3")]["se"], rel=1e-9)


def test_fixed_free_and_start_modifiers():
    res = mlsem.sem("visual =~ NA*x1 + x2 + start(0.7)*x3\nvisual ~~ 1*visual", HS)
    rows = {(r["lhs"], r["op"], r["rhs"]): r for r in res.sem_rows}
    assert rows[("visual", "=~", "x1")]["free"]
    assert rows[("visual", "~~", "visual")]["est"] == 1.0 and not rows[("visual", "~~", "visual")]["free"]
    # the same model with the marker parameterisation: loadings scale by sd(visual)
    res2 = mlsem.sem("visual =~ x1 + x2 + x3", HS)
    assert res.loglik == pytest.approx(res2.loglik, abs=1e-6)
    sd = np.sqrt(res2.coef["visual~~visual"])
    assert rows[("visual", "=~", "x2")]["est"] == pytest.approx(res2.coef["visual=~x2"] * sd, rel=1e-5)


def test_defined_parameter_delta_method():
    res = mlsem.sem(CFA.replace("x2 + x3", "a*x2 + b*x3") + "\nratio := a / b\ns := a + b", HS)
    d = {x["lhs"]: x for x in res.defined}
    ia, ib = res.names.index("a"), res.names.index("b")
    a, b = res.estimate[ia], res.estimate[ib]
    V = res.cov[np.ix_([ia, ib], [ia, ib])]
    assert d["ratio"]["est"] == pytest.approx(a / b, rel=1e-12)
    g = np.array([1 / b, -a / b ** 2])
    assert d["ratio"]["se"] == pytest.approx(np.sqrt(g @ V @ g), rel=1e-6)
    assert d["s"]["se"] == pytest.approx(np.sqrt(V.sum()), rel=1e-6)
    assert "ratio" in res.params["name"].to_list()
    assert "Defined Parameters:" in res.summary()


def test_vce_other_than_oim_refused():
    with pytest.raises(mlsem.MlsemError, match="vce"):
        mlsem.sem(CFA, HS, vce="mixed")


def test_data_as_path_pandas_and_nan_cells():
    path = os.path.join(REF, "hs_cfa_missing.parquet")
    a = mlsem.sem(CFA, path)
    b = mlsem.sem(CFA, pl.read_parquet(path).to_pandas())    # nulls become NaN: missing cells
    assert a.loglik == pytest.approx(b.loglik, abs=1e-9)
    with pytest.raises(mlsem.MlsemError, match="column 'x2' has infinite values, rows 3"):
        mlsem.sem(CFA, HS.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(float("inf"))
                                       .otherwise(pl.col("x2")).alias("x2")))
