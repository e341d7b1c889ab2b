"""Model layer for general SEMs: lavaan statements -> parameter table ->
LISREL matrices, the kernel call, and the chain rule.

The model (DESIGN.md section 4), conditional on the fixed exogenous covariates x:

    eta = alpha + B eta + Gamma_eta x + zeta,   Cov(zeta) = Psi
    y   = nu + Lambda eta + Gamma_y x + eps,    Cov(eps)  = Theta
    Lt  = Lambda (I - B)^-1
    Sigma = Lt Psi Lt' + Theta,   mu_r = nu + Gamma_y x_r + Lt (alpha + Gamma_eta x_r)

An observed variable that predicts another variable gets a single-indicator
("phantom") latent with loading 1 and residual variance 0, as lavaan does; so
does an observed variable whose residual covaries with a latent one.

Parameter table: one :class:`Entry` per matrix entry a statement (or a lavaan
default) sets.  Free entries point at a "full" parameter (equal labels share
one); linear equality constraints (``a == 2*b``) eliminate full parameters, so
that full = T psi + t0 with psi the free vector the optimiser moves.

Kernel reuse: the wide data is the CSR layout with one row per data row and one
observation per observed cell (slot = variable).  With Theta diagonal and
positive (every CFA, every multilevel model without correlated residuals) the
factor path runs with load[obs, :] = Lt[slot, :] and F a factor of Psi; where
loadings or B are free, one zero-variance "probe" latent per slot (loading 1)
makes the kernel return (dl/dSigma) Lt in the probe/latent block of dl/dPhi.
Otherwise the dense path runs with Theta := Sigma and returns dl/dSigma.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _oracle
from ..errors import MlsemError
from ..spec.lavaan import compile_expression, expression_names, parse
from .multilevel import default_threads, resolve_backend
from ..spec.table import ParamList

try:
    from . import _core
except ImportError:  # pragma: no cover
    _core = None

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


# ---- data --------------------------------------------------------------------
@dataclass
class SemData:
    """The wide data in the kernel's CSR layout: one row per data row, one
    observation per observed cell (slot = endogenous observed variable)."""
    nrows: int
    nobs: int
    row_ptr: np.ndarray
    pat_ptr: np.ndarray
    slot: np.ndarray
    obs_row: np.ndarray
    y: np.ndarray
    X: np.ndarray          # (nrows, q) covariates, 0 where missing and unused
    wrow: np.ndarray
    max_row_obs: int
    dropped_cells: int
    dropped_rows: int
    data_row: np.ndarray   # original row number of each row


def used_covariates(table: SemTable) -> np.ndarray:
    """(P, q) boolean: covariate c enters the mean of variable s."""
    P, M, q = table.P, table.M, table.q
    lam = np.zeros((P, M), dtype=bool)
    beta = np.zeros((M, M), dtype=bool)
    gy = np.zeros((P, q), dtype=bool)
    ge = np.zeros((M, q), dtype=bool)
    for e in table.entries:
        nz = e.full >= 0 or e.value != 0.0
        if not nz:
            continue
        if e.matrix == "lambda":
            lam[e.i, e.j] = True
        elif e.matrix == "beta":
            beta[e.i, e.j] = True
        elif e.matrix == "gy":
            gy[e.i, e.j] = True
        elif e.matrix == "geta":
            ge[e.i, e.j] = True
    reach = np.eye(M, dtype=bool)
    for _ in range(M):
        reach = reach | ((reach.astype(int) @ beta.astype(int)) > 0)
    lt = (lam.astype(int) @ reach.astype(int)) > 0
    return gy | ((lt.astype(int) @ ge.astype(int)) > 0)


def prepare_wide(table: SemTable, Y: np.ndarray, X: np.ndarray) -> SemData:
    """Y (n x P) and X (n x q) with NaN for missing -> CSR layout sorted by pattern.

    A cell is observed when y is and every covariate its mean uses is; a row
    with no observed cell is dropped (lavaan drops it too)."""
    n, P = Y.shape
    obs = ~np.isnan(Y)
    U = used_covariates(table)
    dropped_cells = 0
    if table.q:
        xmiss = np.isnan(X)
        bad = (xmiss.astype(int) @ U.T.astype(int)) > 0      # (n, P): a used covariate is missing
        dropped_cells = int((obs & bad).sum())
        obs &= ~bad
    keep = np.flatnonzero(obs.any(axis=1))
    dropped_rows = n - len(keep)
    obs = obs[keep]
    packed = np.packbits(obs, axis=1)
    _, inv = np.unique(packed, axis=0, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    rows = keep[order]
    obs = obs[order]
    counts = obs.sum(axis=1)
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    pat = inv[order]
    change = np.flatnonzero(np.diff(pat)) + 1
    pat_ptr = np.concatenate([[0], change, [len(rows)]]).astype(np.int64)
    r_idx, s_idx = np.nonzero(obs)
    y = Y[rows][r_idx, s_idx].astype(np.float64)
    Xr = np.nan_to_num(X[rows], nan=0.0) if table.q else np.zeros((len(rows), 0))
    return SemData(nrows=len(rows), nobs=len(y), row_ptr=row_ptr, pat_ptr=pat_ptr,
                   slot=s_idx.astype(np.int32), obs_row=r_idx.astype(np.int64), y=y,
                   X=np.ascontiguousarray(Xr), wrow=np.ones(len(rows)),
                   max_row_obs=int(counts.max()) if len(counts) else 0,
                   dropped_cells=dropped_cells, dropped_rows=dropped_rows, data_row=rows)


# ---- the objective ---------------------------------------------------------------
class SemModel:
    """Same interface as :class:`mlsem.model.multilevel.Model` (what :mod:`mlsem.estimate.optimize` uses)."""

    def __init__(self, table: SemTable, data: SemData, backend: str = "auto",
                 nthreads: int | None = None, Y=None):
        self.table = table
        self.prep = data
        self.Y = Y
        self.backend = resolve_backend(backend)
        # small problems: OpenMP start-up and contention cost more than they save
        self.nthreads = nthreads or (default_threads() if data.nobs >= 50_000 else 1)
        P, M, q = table.P, table.M, table.q
        self.P, self.M, self.q = P, M, q
        self.ntau = table.nparams
        # tau = psi: every parameter is "plain" (mlsem.estimate.optimize's bound handling)
        self.free_plain = np.arange(table.nparams)
        self.nevals = 0
        # index arrays per matrix: fixed base and free entries (both triangles of psi/theta)
        self.base = {m: np.zeros(_shape(m, P, M, q)) for m in MATRICES}
        idx = {m: ([], [], []) for m in MATRICES}
        for e in table.entries:
            pairs = [(e.i, e.j)]
            if e.matrix in ("psi", "theta") and e.i != e.j:
                pairs.append((e.j, e.i))
            for i, j in pairs:
                if e.full < 0:
                    if e.matrix in ("nu", "alpha"):
                        self.base[e.matrix][i] = e.value
                    else:
                        self.base[e.matrix][i, j] = e.value
                else:
                    idx[e.matrix][0].append(i)
                    idx[e.matrix][1].append(j)
                    idx[e.matrix][2].append(e.full)
        self.idx = {m: tuple(np.asarray(a, dtype=np.int64) for a in v) for m, v in idx.items()}
        self.factor_path = table.theta_diagonal() and M > 0
        self.probe = self.factor_path and (len(self.idx["lambda"][0]) > 0 or len(self.idx["beta"][0]) > 0)
        d = data
        self._slot = np.ascontiguousarray(d.slot, dtype=np.int32)
        nt = self.nthreads if (_core is not None and _core.HAVE_OPENMP) else 1
        self._nt = nt
        self._w = np.zeros(d.nobs)
        self._ll = np.zeros(nt)
        self._status = np.zeros(nt, dtype=np.int32)
        self._checked = [False, False]      # factor, dense layout checked by the kernel
        # structure (what can be nonzero), fixed for the fit
        nz = {mname: np.zeros(_shape(mname, P, M, q), dtype=bool) for mname in ("lambda", "beta", "psi", "gy", "geta")}
        for e in table.entries:
            if e.matrix in nz and (e.full >= 0 or e.value != 0.0):
                nz[e.matrix][e.i, e.j] = True
                if e.matrix == "psi":
                    nz["psi"][e.j, e.i] = True
        reach = np.eye(M, dtype=bool)
        for _ in range(M):
            reach = reach | ((reach.astype(int) @ nz["beta"].astype(int)) > 0)
        lt_nz = (nz["lambda"].astype(int) @ reach.astype(int)) > 0            # (P, M)
        self._mean_lat = bool(len(self.idx["alpha"][0]) or np.any(self.base["alpha"] != 0)
                              or nz["geta"].any())
        self._has_geta = bool(nz["geta"].any())
        self._lam_free = bool(len(self.idx["lambda"][0]) or len(self.idx["beta"][0]))
        # Gamma_y as per-observation sparse design: mu_obs += Xobs @ gamma_entries
        from scipy import sparse
        gy_r, gy_c, gy_f, gy_v = [], [], [], []
        for e in table.entries:
            if e.matrix == "gy" and (e.full >= 0 or e.value != 0.0):
                gy_r.append(e.i), gy_c.append(e.j), gy_f.append(e.full), gy_v.append(e.value)
        self._gy_f = np.asarray(gy_f, dtype=np.int64)
        self._gy_v = np.asarray(gy_v, dtype=float)
        self._gy_free = self._gy_f >= 0
        ne = len(gy_r)
        if ne:
            by_slot = {}
            for k, r in enumerate(gy_r):
                by_slot.setdefault(r, []).append(k)
            rows, cols, vals = [], [], []
            for r, ks in by_slot.items():
                obs = np.flatnonzero(d.slot == r)
                for k in ks:
                    rows.append(obs)
                    cols.append(np.full(len(obs), k))
                    vals.append(d.X[d.obs_row[obs], gy_c[k]])
            self._Xobs = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                           shape=(d.nobs, ne))
        else:
            self._Xobs = None
        # Psi's connected blocks: the factor F of Psi is computed per block
        comp = -np.ones(M, dtype=np.int64)
        ncomp = 0
        for g in range(M):
            if comp[g] >= 0:
                continue
            stack = [g]
            comp[g] = ncomp
            while stack:
                u = stack.pop()
                for v in np.flatnonzero(nz["psi"][u]):
                    if comp[v] < 0:
                        comp[v] = ncomp
                        stack.append(v)
            ncomp += 1
        self._blocks = [np.flatnonzero(comp == k) for k in range(ncomp)]
        self._single = np.array([b[0] for b in self._blocks if len(b) == 1], dtype=np.int64)
        self._multi = [b for b in self._blocks if len(b) > 1]
        self._dense_slot_lat = np.zeros((P, 1), dtype=np.int32)
        self._dense_load = np.zeros((d.nobs, 1))
        self._Phi0 = np.zeros((1, 1))
        self._dense_gphi = np.zeros((nt, 1))
        self._dense_gth = None          # (nt, P*P), allocated on first use
        if self.factor_path:
            Mt = M + (P if self.probe else 0)
            nlat = max(1, int(lt_nz.sum(axis=1).max()))
            nl = nlat + (1 if self.probe else 0)
            sl = np.full((P, nl), -1, dtype=np.int32)
            for s_ in range(P):
                g = np.flatnonzero(lt_nz[s_])
                sl[s_, :len(g)] = g
            if self.probe:
                sl[:, nlat] = M + np.arange(P)
            self._nlat = nlat
            self._slot_lat = sl
            self._lat_of_obs = sl[d.slot, :nlat]                     # (nobs, nlat), -1 none
            self._lat_ok = self._lat_of_obs >= 0
            self._lat_idx = np.where(self._lat_ok, self._lat_of_obs, 0)
            self._load = np.ones((d.nobs, nl))
            self._F = np.zeros((Mt, Mt))
            bs = np.arange(Mt, dtype=np.int32)
            be = bs + 1
            for blk in self._blocks:
                bs[blk] = blk.min()
                be[blk] = blk.max() + 1
            self._blk_start, self._blk_end = bs, be.astype(np.int32)
            self._Mt = Mt
            self._gphi = np.zeros((nt, Mt * Mt))
            self._gth = np.zeros((nt, P))
            self._maxm = int(min(Mt, max(d.max_row_obs, 1) * nl))
        self.kernel_calls = {"factor": 0, "dense": 0}
        # a residual variance on its bound 0 makes Sigma singular (no finite
        # objective for the line search): bound those at a tiny positive value
        sv = np.array([d.y[d.slot == s_].var() if np.sum(d.slot == s_) > 1 else 1.0 for s_ in range(P)])
        sv[~(sv > 0)] = 1.0
        col_of_full = {int(f): c for c, f in enumerate(table.free_full)}
        for c, prm in enumerate(table.params):
            if prm.lower != 0.0:
                continue
            ents = [e for e in table.entries if e.full >= 0 and table.T[e.full, c] != 0]
            if ents and all(e.matrix == "theta" and e.i == e.j for e in ents):
                prm.lower = 1e-6 * float(min(sv[e.i] for e in ents))
        del col_of_full

    # ---- tau = psi (no reparameterisation) --------------------------------------
    def tau_to_psi(self, tau):
        return np.asarray(tau, dtype=float).copy()

    def psi_to_tau(self, psi):
        return np.asarray(psi, dtype=float).copy()

    def grad_tau(self, tau, g):
        return g

    def tau_bounds(self):
        return [(p.lower if np.isfinite(p.lower) else None, None) for p in self.table.params]

    def matrices(self, psi):
        full = self.table.full_values(psi)
        out = {}
        for m in MATRICES:
            A = self.base[m].copy()
            r, c, f = self.idx[m]
            if len(f):
                if A.ndim == 1:
                    A[r] = full[f]
                else:
                    A[r, c] = full[f]
            out[m] = A
        return out

    def implied(self, psi):
        """Sigma (P x P), the per-row means (nrows x P), and the pieces."""
        m = self.matrices(psi)
        try:
            E = np.linalg.inv(np.eye(self.M) - m["beta"])
        except np.linalg.LinAlgError:
            return None
        Lt = m["lambda"] @ E
        Sigma = Lt @ m["psi"] @ Lt.T + m["theta"]
        X = self.prep.X
        Meta = m["alpha"] + X @ m["geta"].T
        MU = m["nu"] + X @ m["gy"].T + Meta @ Lt.T
        return m, E, Lt, Sigma, Meta, MU

    def start_values(self) -> np.ndarray:
        """lavaan's "simple" start: loadings 1, regressions and covariances 0,
        intercepts the sample means, residual variances half the sample variance,
        latent variances from their first indicator."""
        t = self.table
        d = self.prep
        P = self.P
        mean = np.zeros(P)
        var = np.ones(P)
        for s in range(P):
            v = d.y[d.slot == s]
            if len(v):
                mean[s] = v.mean()
                var[s] = v.var() if len(v) > 1 and v.var() > 0 else 1.0
        full = np.zeros(len(t.full_names))
        marker = {}
        for e in t.entries:
            if e.matrix == "lambda" and e.full < 0 and e.value != 0 and e.j not in marker:
                marker[e.j] = e.i
        phantom_slot = {e.j: e.i for e in t.entries if e.matrix == "lambda" and not e.user}
        for e in t.entries:
            if e.full < 0:
                continue
            if e.matrix in ("lambda",) or (e.matrix == "beta" and e.op == "=~"):
                v = 1.0
            elif e.matrix == "nu":
                v = mean[e.i]
            elif e.matrix == "alpha":
                v = mean[phantom_slot[e.i]] if e.i in phantom_slot else 0.0
            elif e.matrix == "theta":
                v = 0.5 * var[e.i] if e.i == e.j else 0.0
            elif e.matrix == "psi":
                if e.i != e.j:
                    v = 0.0
                elif e.i in phantom_slot:
                    v = 0.5 * var[phantom_slot[e.i]]
                elif e.i in marker:
                    v = 0.5 * var[marker[e.i]]
                else:
                    v = 0.05
            else:
                v = 0.0
            full[e.full] = v
        given = np.isfinite(t.full_start)
        full[given] = t.full_start[given]
        # free parameters: least squares through the (possibly constrained) map
        psi, *_ = np.linalg.lstsq(t.T, full - t.t0, rcond=None)
        # observed intercepts and slopes on the covariates: OLS of the observed
        # cells on their mean design (labels and constraints respected)
        self._ols_mean_start(psi, given)
        return psi

    def _ols_mean_start(self, psi, given):
        t, d = self.table, self.prep
        r_nu, _, f_nu = self.idx["nu"]
        if self._Xobs is None and not len(f_nu):
            return
        from scipy import sparse
        nfull = len(t.full_names)
        parts = []
        if len(f_nu):
            col = np.full(self.P, -1)
            col[r_nu] = f_nu
            ok = col[d.slot] >= 0
            parts.append(sparse.csr_matrix((np.ones(ok.sum()), (np.flatnonzero(ok), col[d.slot][ok])),
                                           shape=(d.nobs, nfull)))
        off = np.zeros(d.nobs)
        base_nu = self.base["nu"][d.slot]
        off += base_nu
        if self._Xobs is not None:
            fe = self._gy_f
            S = sparse.csr_matrix((np.ones(len(fe)), (np.arange(len(fe)), np.where(fe >= 0, fe, 0))),
                                  shape=(len(fe), nfull))
            S = sparse.diags(self._gy_free.astype(float)) @ S
            parts.append(self._Xobs @ S)
            off += self._Xobs @ np.where(self._gy_free, 0.0, self._gy_v)
        D = sum(parts[1:], parts[0]).tocsc()
        mean_full = np.zeros(nfull, dtype=bool)
        mean_full[np.unique(np.concatenate([f_nu, self._gy_f[self._gy_free]]))] = True
        if given[mean_full].any() or self._mean_lat:
            return
        # free parameters that only move mean entries
        cols = np.flatnonzero(np.any(t.T[mean_full] != 0, axis=0) & ~np.any(t.T[~mean_full] != 0, axis=0))
        if not len(cols):
            return
        Dc = np.asarray((D @ t.T[:, cols]))
        rhs = d.y - off - D @ t.t0
        sol, *_ = np.linalg.lstsq(Dc, rhs, rcond=None)
        if not np.all(np.isfinite(sol)):
            return
        psi[cols] = sol
        if self._lam_free or given.any() or np.any(self.base["lambda"][self.base["lambda"] != 0] != 1.0):
            return
        # unit loadings (a multilevel model): split each slot's OLS residual
        # variance equally over its residual and the latents it loads on, as
        # mlsem.fit's start does
        res = rhs - Dc @ sol
        r2 = np.bincount(d.slot, weights=res ** 2, minlength=self.P) / np.maximum(
            np.bincount(d.slot, minlength=self.P), 1)
        lam = self.base["lambda"] != 0
        share = r2 / (1.0 + lam.sum(axis=1))
        full = t.full_values(psi)
        for e in t.entries:
            if e.full < 0 or e.i != e.j:
                continue
            if e.matrix == "theta":
                full[e.full] = share[e.i]
            elif e.matrix == "psi" and lam[:, e.i].any():
                full[e.full] = float(np.mean(share[lam[:, e.i]]))
        new, *_ = np.linalg.lstsq(t.T, full - t.t0, rcond=None)
        if np.all(np.isfinite(new)) and self.evaluate(new, need_grad=False)[0] is not None:
            psi[:] = new

    def _psi_factor(self, Psi):
        """F with F F' = Psi, computed per connected block of Psi (exact zeros
        elsewhere); None if Psi is not positive semi-definite."""
        M = self.M
        F = self._F
        F[:M, :M] = 0.0
        if len(self._single):
            dg = Psi[self._single, self._single]
            if np.any(dg < 0):
                return None
            F[self._single, self._single] = np.sqrt(dg)
        for blk in self._multi:
            S = Psi[np.ix_(blk, blk)]
            lam, Q = np.linalg.eigh(S)
            if lam.min() < -1e-10 * max(1.0, abs(lam).max()):
                return None
            F[np.ix_(blk, blk)] = Q * np.sqrt(np.clip(lam, 0.0, None))
        return F

    def evaluate(self, psi, need_grad: bool = True):
        """(log-likelihood, dl/dpsi); (None, None) where Sigma is not positive definite."""
        self.nevals += 1
        m = self.matrices(psi)
        d = self.prep
        M, P = self.M, self.P
        try:
            E = np.linalg.inv(np.eye(M) - m["beta"])
        except np.linalg.LinAlgError:
            return None, None
        Lt = m["lambda"] @ E
        full = self.table.full_values(psi)
        mu = m["nu"][d.slot]
        if self._Xobs is not None:
            gv = self._gy_v.copy()
            gv[self._gy_free] = full[self._gy_f[self._gy_free]]
            mu = mu + self._Xobs @ gv
        Meta = None
        if self._mean_lat:
            Meta = m["alpha"] + (d.X @ m["geta"].T if self._has_geta else 0.0)
            Meta = np.broadcast_to(Meta, (d.nrows, M))
            mu = mu + np.einsum("ij,ij->i", Meta[d.obs_row], Lt[d.slot])
        resid = d.y - mu
        # the factor path needs Psi positive semi-definite and Theta positive;
        # elsewhere (a Heywood case) Sigma may still be positive definite: the
        # dense path decides
        use_factor = (self.backend != "numpy" and self.factor_path and bool(np.all(np.diag(m["theta"]) > 0))
                      and self._psi_factor(m["psi"]) is not None)
        if self.backend == "numpy":
            Sigma = Lt @ m["psi"] @ Lt.T + m["theta"]
            ll, _gphi, G, w = _oracle.loglik(d.row_ptr, d.slot, resid, np.zeros((d.nobs, 1)),
                                             np.zeros((P, 1), dtype=np.int32), np.zeros((1, 1)),
                                             Sigma, d.wrow, need_grad)
            if ll is None:
                return None, None
            if not need_grad:
                return ll, None
        else:
            self._ll[:] = 0.0
            self._status[:] = 0
            if use_factor:
                self.kernel_calls["factor"] += 1
                if need_grad:
                    self._gphi[:] = 0.0
                    self._gth[:] = 0.0
                theta = np.ascontiguousarray(np.diag(m["theta"]))
                nlat = self._nlat
                self._load[:, :nlat] = np.where(self._lat_ok, Lt[d.slot[:, None], self._lat_idx], 0.0)
                _core.factor_loglik(d.pat_ptr, d.row_ptr, self._slot, resid, self._load,
                                    self._slot_lat, self._F, self._blk_start, self._blk_end, theta,
                                    d.wrow, self._w, self._ll, self._gphi, self._gth,
                                    self._status, int(d.max_row_obs), self._maxm, self._Mt,
                                    self._nt, int(need_grad), validate=not self._checked[0])
                self._checked[0] = True     # the layout is checked by the kernel once
            else:
                self.kernel_calls["dense"] += 1
                Sigma = Lt @ m["psi"] @ Lt.T + m["theta"]
                if self._dense_gth is None:
                    self._dense_gth = np.zeros((self._nt, P * P))
                if need_grad:
                    self._dense_gth[:] = 0.0
                _core.dense_loglik(d.pat_ptr, d.row_ptr, self._slot, resid, self._dense_load,
                                   self._dense_slot_lat, self._Phi0, np.ascontiguousarray(Sigma), d.wrow,
                                   self._w, self._ll, self._dense_gphi, self._dense_gth, self._status,
                                   int(d.max_row_obs), self._nt, int(need_grad),
                                   validate=not self._checked[1])
                self._checked[1] = True
            if self._status.any():
                return None, None
            ll = float(self._ll.sum())
            if not need_grad:
                return ll, None
            w = self._w
            if not use_factor:
                G = self._dense_gth.sum(axis=0).reshape(P, P)
        if use_factor:
            gphi = self._gphi.sum(axis=0).reshape(self._Mt, self._Mt)
            gpsi = gphi[:M, :M]
            GLt = gphi[M:, :M] if self.probe else None
            gth = self._gth.sum(axis=0)
            theta_diag_only = True
        else:
            GLt = G @ Lt
            gpsi = Lt.T @ GLt
            gth = G
            theta_diag_only = False
        # chain rule to the full parameters
        nfull = len(self.table.full_names)
        gfull = np.zeros(nfull)

        def put(mat, g):
            r, c, f = self.idx[mat]
            if len(f):
                vals = g[r] if g.ndim == 1 else g[r, c]
                gfull[:] += np.bincount(f, weights=vals, minlength=nfull)
        wsum = np.bincount(d.slot, weights=w, minlength=P)
        put("nu", wsum)
        put("psi", gpsi)
        if theta_diag_only:
            r, c, f = self.idx["theta"]
            if len(f):
                gfull[:] += np.bincount(f, weights=gth[r], minlength=nfull)
        else:
            put("theta", gth)
        if self._Xobs is not None and self._gy_free.any():
            gg = self._Xobs.T @ w
            gfull[:] += np.bincount(self._gy_f[self._gy_free], weights=gg[self._gy_free], minlength=nfull)
        if self._mean_lat:
            W = np.zeros((d.nrows, P))
            W[d.obs_row, d.slot] = w
            LW = W @ Lt                        # (rows, M): Lt' w_r per row
            put("alpha", LW.sum(axis=0))
            if self._has_geta:
                put("geta", LW.T @ d.X)
        if self._lam_free:
            dLt = np.zeros((P, M))
            if self._mean_lat:
                dLt += W.T @ Meta
            if GLt is not None:
                dLt += 2.0 * GLt @ m["psi"]
            put("lambda", dLt @ E.T)
            put("beta", Lt.T @ dLt @ E.T)
        return ll, self.table.T.T @ gfull


def sem_table(source: str, columns) -> SemTable:
    return build_table(parse(source), columns)


def count_moments(table: SemTable) -> int:
    P, q = table.P, table.q
    return P * (P + 1) // 2 + P * (1 + q)
