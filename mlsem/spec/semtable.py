"""The parameter table of a general SEM: lavaan statements (mlsem.spec.lavaan)
plus lavaan's defaults -> one Entry per LISREL matrix entry; equal labels share
one full parameter and linear equality constraints (a == 2*b) eliminate full
parameters, so that full = T psi + t0 with psi the free vector (the model is
mlsem.model.sem).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MlsemError
from .lavaan import compile_expression, expression_names, parse
from .table import ParamList


MATRICES = ("lambda", "beta", "psi", "theta", "nu", "alpha", "gy", "geta")


@dataclass
class SemParam:
    name: str
    kind: str          # "loading" | "regression" | "intercept" | "variance" | "covariance"
    lower: float = -np.inf
    level: str = ""


@dataclass
class Entry:
    lhs: str
    op: str
    rhs: str
    matrix: str
    i: int
    j: int
    value: float = 0.0        # the fixed value (or the start value of a free entry)
    full: int = -1            # full parameter index, -1 fixed
    label: str = ""
    user: bool = True
    start_given: bool = False  # start(...)* on a free entry


@dataclass
class Defined:
    name: str
    expr: str
    func: object
    line: int


@dataclass
class SemTable(ParamList):
    """The parameter table of a general SEM (the single source of truth)."""
    entries: list
    full_names: list
    full_kinds: list
    full_start: np.ndarray
    T: np.ndarray              # (nfull, nfree): full = T psi + t0
    t0: np.ndarray
    free_full: np.ndarray      # full index of each free parameter (its name)
    observed: list             # endogenous observed variables (the slots), order of P
    covariates: list           # fixed exogenous covariates x (conditioned on)
    latents: list              # user latents, then phantom latents
    nuser_latent: int
    defined: list
    labels: dict               # label -> full index
    params: list = field(default_factory=list)

    @property
    def P(self) -> int:
        return len(self.observed)

    @property
    def M(self) -> int:
        return len(self.latents)

    @property
    def q(self) -> int:
        return len(self.covariates)

    def full_values(self, psi) -> np.ndarray:
        return self.T @ psi + self.t0

    def theta_diagonal(self) -> bool:
        """Theta diagonal with every diagonal entry free or fixed positive."""
        diag = set()
        for e in self.entries:
            if e.matrix != "theta":
                continue
            if e.i != e.j:
                if e.full >= 0 or e.value != 0.0:
                    return False
            elif e.full >= 0 or e.value > 0:
                diag.add(e.i)
        return len(diag) == self.P


def _shape(mat, P, M, q):
    return {"lambda": (P, M), "beta": (M, M), "psi": (M, M), "theta": (P, P),
            "nu": (P,), "alpha": (M,), "gy": (P, q), "geta": (M, q)}[mat]


def build_table(statements, columns) -> SemTable:
    """lavaan's sem() defaults (missing = "ml", fixed.x = TRUE) on the statements."""
    cols = set(columns)
    latents = []
    for s in statements:
        if s.op == "=~" and s.lhs not in latents:
            if s.lhs in cols:
                raise MlsemError(f"model syntax line {s.line}: latent variable {s.lhs!r} has the name of a data column")
            latents.append(s.lhs)
    first_seen = {}
    for s in statements:
        if s.op in ("=~", "~", "~~"):
            first_seen.setdefault(s.lhs, (s.line, s.col))
            for t in s.terms:
                if t.var != "1":
                    first_seen.setdefault(t.var, (t.line, t.col))
    for v, (ln, cl) in first_seen.items():
        if v not in latents and v not in cols:
            have = ", ".join(sorted(cols)[:20])
            raise MlsemError(f"model syntax line {ln}, column {cl}: unknown variable {v!r}: "
                             f"neither a latent variable (defined by =~) nor a data column (columns: {have})")
    indicators, reg_lhs, reg_rhs, cov_vars, int_lhs, lat_ind = set(), set(), set(), set(), set(), set()
    for s in statements:
        if s.op == "=~":
            for t in s.terms:
                (lat_ind if t.var in latents else indicators).add(t.var)
        elif s.op == "~":
            for t in s.terms:
                if t.var == "1":
                    int_lhs.add(s.lhs)
                else:
                    reg_lhs.add(s.lhs)
                    reg_rhs.add(t.var)
        elif s.op == "~~":
            cov_vars.add(s.lhs)
            cov_vars.update(t.var for t in s.terms)
    for f in latents:
        if not any(s.op == "=~" and s.lhs == f and s.terms for s in statements):
            raise MlsemError(f"latent variable {f!r} has no indicators")
    observed_all = [v for v in first_seen if v not in latents]
    covariates = [v for v in observed_all if v in reg_rhs and v not in indicators and v not in reg_lhs
                  and v not in cov_vars and v not in int_lhs]
    observed = [v for v in observed_all if v not in covariates]
    if not observed:
        raise MlsemError("the model has no endogenous observed variable")
    # pure dependent variables (lavaan's ov.y / lv.y) for auto.cov.y
    ov_y = [v for v in observed if v in reg_lhs and v not in reg_rhs and v not in indicators]
    lv_y = [f for f in latents if f in reg_lhs and f not in reg_rhs]
    phantom = {v for v in observed if v in reg_rhs}
    if ov_y and lv_y:
        phantom.update(ov_y)
    changed = True
    while changed:
        changed = False
        for s in statements:
            if s.op != "~~":
                continue
            for a, b in [(s.lhs, t.var) for t in s.terms] + [(t.var, s.lhs) for t in s.terms]:
                if a in observed and a not in phantom and (b in latents or b in phantom):
                    phantom.add(a)
                    changed = True
    user_lat = list(latents)
    phantoms = [v for v in observed if v in phantom]
    lat_all = user_lat + [f"{v}*" for v in phantoms]
    slot = {v: k for k, v in enumerate(observed)}
    node = {f: k for k, f in enumerate(user_lat)}
    for k, v in enumerate(phantoms):
        node[v] = len(user_lat) + k
    xi = {v: k for k, v in enumerate(covariates)}

    entries: list = []
    where: dict = {}

    def add(lhs, op, rhs, matrix, i, j, term=None, default_free=True, default_value=0.0, user=True, line=0):
        key = (matrix, min(i, j), max(i, j)) if matrix in ("psi", "theta") else (matrix, i, j)
        if key in where:
            if not user:
                return
            e0 = entries[where[key]]
            if e0.user:
                raise MlsemError(f"model syntax line {line}: {lhs} {op} {rhs} is specified twice")
            entries.pop(where[key])
            where.clear()
            where.update({((e.matrix, min(e.i, e.j), max(e.i, e.j)) if e.matrix in ("psi", "theta")
                           else (e.matrix, e.i, e.j)): n for n, e in enumerate(entries)})
        e = Entry(lhs, op, rhs, matrix, i, j, user=user)
        free, value = default_free, default_value
        if term is not None:
            if term.fixed is not None:
                free, value = False, term.fixed
            elif term.free or term.label is not None:
                free = True
            if term.label is not None:
                e.label = term.label
            if term.start is not None and free:
                value = term.start
                e.start_given = True
        e.value = value
        e.full = 0 if free else -1
        where[key] = len(entries)
        entries.append(e)

    # phantom structure
    for v in phantoms:
        add(v, "=~", v, "lambda", slot[v], node[v], default_free=False, default_value=1.0, user=False)
    for s in statements:
        if s.op == "=~":
            for k, t in enumerate(s.terms):
                fixed_first = k == 0 and not t.free and t.fixed is None
                if fixed_first:
                    t2 = type(t)(t.var, t.line, t.col, fixed=1.0, label=t.label, start=t.start)
                else:
                    t2 = t
                if t.var in observed and t.var not in phantom:
                    add(s.lhs, "=~", t.var, "lambda", slot[t.var], node[s.lhs], t2, line=t.line)
                else:
                    add(s.lhs, "=~", t.var, "beta", node[t.var], node[s.lhs], t2, line=t.line)
        elif s.op == "~":
            a = s.lhs
            a_lat = a in node
            for t in s.terms:
                if t.var == "1":
                    if a_lat:
                        add(a, "~1", "", "alpha", node[a], 0, t, line=t.line)
                    else:
                        add(a, "~1", "", "nu", slot[a], 0, t, line=t.line)
                elif t.var in xi:
                    if a_lat:
                        add(a, "~", t.var, "geta", node[a], xi[t.var], t, line=t.line)
                    else:
                        add(a, "~", t.var, "gy", slot[a], xi[t.var], t, line=t.line)
                else:
                    b = t.var
                    if b not in node:  # pragma: no cover - predictors are phantoms
                        raise MlsemError(f"internal: predictor {b!r} has no latent node")
                    if a_lat:
                        add(a, "~", b, "beta", node[a], node[b], t, line=t.line)
                    else:
                        add(a, "~", b, "lambda", slot[a], node[b], t, line=t.line)
        elif s.op == "~~":
            a = s.lhs
            for t in s.terms:
                b = t.var
                if a in node and b in node:
                    add(a, "~~", b, "psi", node[a], node[b], t, line=t.line)
                elif a in slot and b in slot:
                    add(a, "~~", b, "theta", slot[a], slot[b], t, line=t.line)
                else:  # pragma: no cover - closure above makes both nodes
                    raise MlsemError(f"internal: cannot place {a} ~~ {b}")
    for f in user_lat:
        if not any(e.op == "=~" and e.lhs == f and (e.full >= 0 or e.value != 0.0) for e in entries):
            raise MlsemError(f"latent variable {f!r} has no indicators: every loading is fixed at 0")
    # defaults: variances, intercepts, covariances of exogenous latents and of pure dependents
    for v in observed:
        if v in phantom:
            add(v, "~~", v, "psi", node[v], node[v], user=False)
            add(v, "~1", "", "alpha", node[v], 0, user=False)
        else:
            add(v, "~~", v, "theta", slot[v], slot[v], user=False)
            add(v, "~1", "", "nu", slot[v], 0, user=False)
    for f in user_lat:
        add(f, "~~", f, "psi", node[f], node[f], user=False)
        add(f, "~1", "", "alpha", node[f], 0, default_free=False, user=False)
    exo_lat = [f for f in user_lat if f not in reg_lhs and f not in lat_ind]
    for a in range(len(exo_lat)):
        for b in range(a + 1, len(exo_lat)):
            add(exo_lat[a], "~~", exo_lat[b], "psi", node[exo_lat[a]], node[exo_lat[b]], user=False)
    dep = lv_y + ov_y
    for a in range(len(dep)):
        for b in range(a + 1, len(dep)):
            u, v = dep[a], dep[b]
            if u in node and v in node:
                add(u, "~~", v, "psi", node[u], node[v], user=False)
            else:
                add(u, "~~", v, "theta", slot[u], slot[v], user=False)
    # full parameters: equal labels share one
    full_names, full_kinds, full_start, labels = [], [], [], {}
    start_given = []
    for e in entries:
        if e.full < 0:
            continue
        name = e.label or (f"{e.lhs}~1" if e.op == "~1" else f"{e.lhs}{e.op}{e.rhs}")
        if e.label and e.label in labels:
            e.full = labels[e.label]
            if e.start_given and not start_given[e.full]:
                full_start[e.full] = e.value
                start_given[e.full] = True
            continue
        e.full = len(full_names)
        if e.label:
            labels[e.label] = e.full
        full_names.append(name)
        full_kinds.append(_kind(e))
        full_start.append(e.value if e.start_given else np.nan)
        start_given.append(e.start_given)
    nfull = len(full_names)
    T = np.eye(nfull)
    t0 = np.zeros(nfull)
    defined = []
    lab_all = dict(labels)
    for s in statements:
        if s.op == "==":
            T, t0 = _impose(s, T, t0, lab_all)
        elif s.op == ":=":
            if s.lhs in lab_all or any(d.name == s.lhs for d in defined):
                raise MlsemError(f"model syntax line {s.line}: {s.lhs!r} is already a parameter label")
            known = set(lab_all) | {d.name for d in defined}
            for nm in expression_names(s.expr):
                if nm not in known:
                    raise MlsemError(f"model syntax line {s.line}: defined parameter {s.lhs!r} uses "
                                     f"{nm!r}, which is not a parameter label")
            defined.append(Defined(s.lhs, s.expr, compile_expression(s.expr), s.line))
    keep = np.flatnonzero(np.any(T != 0, axis=0))
    # columns of T are free parameters; name each by the full parameter it was born as
    T = T[:, keep]
    free_full = keep
    # variances start bounded at 0 (the optimiser stays where Sigma is positive
    # definite); a fit that ends on that bound is refitted without it, so that a
    # Heywood case gets lavaan's (negative) estimate.
    params = [SemParam(full_names[k], full_kinds[k],
                       0.0 if full_kinds[k] == "variance" and np.all(T[:, c] >= 0) else -np.inf)
              for c, k in enumerate(free_full)]
    tab = SemTable(entries=entries, full_names=full_names, full_kinds=full_kinds,
                   full_start=np.asarray(full_start, dtype=float), T=T, t0=t0,
                   free_full=free_full, observed=observed, covariates=covariates,
                   latents=lat_all, nuser_latent=len(user_lat), defined=defined, labels=lab_all,
                   params=params)
    return tab


def _kind(e: Entry) -> str:
    if e.op == "=~":
        return "loading"
    if e.op == "~":
        return "regression"
    if e.op == "~1":
        return "intercept"
    return "variance" if e.lhs == e.rhs else "covariance"


def _impose(s, T, t0, labels):
    """Eliminate one free parameter with the linear constraint lhs == rhs."""
    used = expression_names(s.lhs_expr) + expression_names(s.expr)
    for nm in used:
        if nm not in labels:
            raise MlsemError(f"model syntax line {s.line}: constraint {s.lhs_expr} == {s.expr} uses "
                             f"{nm!r}, which is not a parameter label")
    fl = compile_expression(s.lhs_expr)
    fr = compile_expression(s.expr)
    names = sorted(set(used))

    def h(vals):
        d = dict(zip(names, vals))
        return fl(d) - fr(d)
    base = np.zeros(len(names))
    c0 = h(base)
    coef = np.array([h(np.eye(len(names))[k]) - c0 for k in range(len(names))])
    x = np.linspace(0.3, 1.7, len(names))
    if abs(h(x) - (c0 + coef @ x)) > 1e-9 * (1 + abs(h(x))):
        raise MlsemError(f"model syntax line {s.line}: only linear equality constraints are supported "
                         f"({s.lhs_expr} == {s.expr} is not linear)")
    c = np.zeros(T.shape[0])
    for nm, v in zip(names, coef):
        c[labels[nm]] += v
    d = c @ T
    e0 = c @ t0 + c0
    nz = np.flatnonzero(np.abs(d) > 1e-12)
    if len(nz) == 0:
        if abs(e0) > 1e-12:
            raise MlsemError(f"model syntax line {s.line}: constraint {s.lhs_expr} == {s.expr} "
                             "contradicts the other constraints")
        raise MlsemError(f"model syntax line {s.line}: constraint {s.lhs_expr} == {s.expr} "
                         "is implied by the others (redundant)")
    # prefer eliminating the parameter named on the left
    lhs_names = expression_names(s.lhs_expr)
    k = nz[-1]
    if len(lhs_names) == 1:
        col = np.flatnonzero(T[labels[lhs_names[0]]])
        cand = [j for j in col if j in nz]
        if cand:
            k = cand[0]
    # theta_k = -(sum_{j != k} d_j theta_j + e0) / d_k
    S = np.eye(T.shape[1])
    S[k, :] = -d / d[k]
    S[k, k] = 0.0
    s0 = np.zeros(T.shape[1])
    s0[k] = -e0 / d[k]
    t0 = t0 + T @ s0
    T = T @ S
    T[:, k] = 0.0
    return T, t0


def sem_table(source: str, columns) -> SemTable:
    return build_table(parse(source), columns)


def count_moments(table: SemTable) -> int:
    P, q = table.P, table.q
    return P * (P + 1) // 2 + P * (1 + q)
