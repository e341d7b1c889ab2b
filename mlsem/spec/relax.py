"""Spec layer: relaxations of the mixed model's constraints.

The multilevel front end (:func:`mlsem.spec.table.multilevel_table`) writes the
mixed model as a parameter table whose equal labels are its constraints.  A
relaxation rewrites that table -- new labels, new free entries -- and never
adds a code path: the same FIML engine fits every variant.

    effects={"j": {"variance": "slot" | {"north": [1, 2], ...},
                   "covariance": "none" | "unstructured" | "equal"
                                 | [(1, 2), ...] | {"north": [1, 2], ...}}}
    residuals={"variance": "j", "correlation": "ar1" | "exchangeable"
                                               | "unstructured" | "independent"}
    coefficients={"x": "j"}

Slots are labelled by the id values within their parent (mlsem.data.prepare), so
"slot 2 of j" means j == 2 in every county.  Names carry the slot label or the
group name in brackets: ``var(j[2])``, ``cov(j[1],j[2])``, ``var(j[north])``,
``var(Residual[2])``, ``x[2]``, ``corr(Residual)``.

Observation order.  AR(1) and unstructured residual correlations need an order
of the observations within the innermost group: they require ``index=`` (the
column whose values order and space them; AR(1) uses the index values, so a
gap of two counts as lag 2, as nlme's corAR1/corARMA does).  Without an index
the row order is arbitrary, and those structures are refused.  Exchangeable
correlation does not depend on the order and needs no index.

Covariance structures other than "unstructured" (which is Cholesky
parameterised, as lme4 does) keep their natural parameters: the block's
factor is computed by an eigen-decomposition and a block that is not positive
semi-definite makes the optimiser back off.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from ..errors import MlsemError
from .table import CholBlock, Param

CORRELATIONS = ("independent", "ar1", "exchangeable", "unstructured")
COVARIANCES = ("none", "unstructured", "equal")


# ---- helpers ------------------------------------------------------------------
def _level_position(prep_levels, level, option):
    names = [lv if isinstance(lv, str) else lv.name for lv in prep_levels]
    if level not in names:
        raise MlsemError(f"{option}: unknown level {level!r} (levels: {', '.join(map(repr, names))})")
    d = names.index(level)
    if d == 0:
        raise MlsemError(
            f"{option}: {level!r} is the top level (one row of the wide form): it has one slot, "
            f"nothing to relax; name a level below it ({', '.join(map(repr, names[1:]))})")
    return d


def _match_label(value, labels, level, option):
    for lab in labels:
        if lab == value or str(lab) == str(value):
            return lab
    raise MlsemError(
        f"{option}: level {level!r} has no slot label {value!r} (labels: "
        f"{', '.join(map(str, labels))})")


def _groups(spec, labels, level, option):
    """{group name: [labels]} from a user dict, checking labels and overlaps."""
    if not isinstance(spec, dict) or not spec:
        raise MlsemError(f"{option}: expected a non-empty dict {{group name: [slot labels]}}, got {spec!r}")
    out, seen = {}, {}
    for name, members in spec.items():
        if not isinstance(members, (list, tuple)) or not members:
            raise MlsemError(f"{option}: group {name!r} must be a non-empty list of slot labels")
        labs = []
        for m in members:
            lab = _match_label(m, labels, level, option)
            if lab in seen:
                raise MlsemError(
                    f"{option}: groups overlap: slot label {lab!r} is in both {seen[lab]!r} and {name!r}")
            seen[lab] = name
            labs.append(lab)
        out[str(name)] = labs
    return out


def _lab(v):
    return str(v)


# ---- coefficients: a design hook for mlsem.data.prepare.prepare ------------------------
def coefficient_design(coefficients, formula, levels, labels=None):
    """A ``design`` callable for :func:`mlsem.data.prepare.prepare`, or None.

    ``coefficients={"x": "j"}`` replaces the column x by x * (label_j == g), one
    per slot label g of level j, named ``x[g]``.  ``labels``: {level position:
    sorted labels} to use instead of the prepared frame's own (mlsem.backends.dask:
    every partition gets the columns of the global labels)."""
    if not coefficients:
        return None
    if not isinstance(coefficients, dict):
        raise MlsemError(f"coefficients: expected a dict {{covariate: level}}, got {coefficients!r}")
    level_cols = [lv[-1] for lv in levels]
    terms = (["Intercept"] if formula.intercept else []) + list(formula.fixed)
    by = {}
    for cov, level in coefficients.items():
        if cov not in terms:
            raise MlsemError(
                f"coefficients: {cov!r} is not a fixed term of the formula (terms: {', '.join(map(repr, terms))})")
        by[cov] = _level_position(level_cols, level, "coefficients")

    def design(df: pl.DataFrame):
        exprs, names = [], []
        for t in terms:
            base = pl.lit(1.0) if t == "Intercept" else pl.col(t).cast(pl.Float64)
            if t not in by:
                exprs.append(base.alias(t))
                names.append(t)
                continue
            lab = f"__lab{by[t]}"
            labs = labels[by[t]] if labels is not None else df[lab].unique().sort().to_list()
            for g in labs:
                nm = f"{t}[{_lab(g)}]"
                exprs.append(pl.when(pl.col(lab) == g).then(base).otherwise(0.0).alias(nm))
                names.append(nm)
        return exprs, names
    return design


# ---- the table rewrite -----------------------------------------------------------
@dataclass
class _Work:
    params: list
    by_name: dict

    def param(self, name, kind, lower=-np.inf, level=""):
        if name not in self.by_name:
            self.by_name[name] = len(self.params)
            self.params.append(Param(name, kind, lower, level))
        return self.by_name[name]


def relax_table(table, prep, effects=None, residuals=None, index=None):
    """The parameter table of the mixed model with the requested equalities freed."""
    if not effects and not residuals:
        return table
    level_names = [lv.name for lv in prep.levels]
    W = _Work([replace(p) for p in table.params], {p.name: i for i, p in enumerate(table.params)})
    phi_r, phi_c, phi_p = list(table.phi_row), list(table.phi_col), list(table.phi_param)
    blocks = list(table.chol_blocks)
    theta_param = table.theta_param.copy()
    theta_func = None
    sl = prep.slot_labels
    if effects:
        if not isinstance(effects, dict):
            raise MlsemError(f"effects: expected a dict {{level: {{...}}}}, got {effects!r}")
        for level, spec in effects.items():
            phi_r, phi_c, phi_p = _relax_effects(W, prep, level, spec, phi_r, phi_c, phi_p, blocks)
    if residuals:
        if not isinstance(residuals, dict):
            raise MlsemError(f"residuals: expected a dict, got {residuals!r}")
        unknown = set(residuals) - {"variance", "correlation"}
        if unknown:
            raise MlsemError(f"residuals: unknown option {sorted(unknown)[0]!r} (options: 'variance', 'correlation')")
        var = residuals.get("variance")
        if var is not None:
            obs_ok = index is not None and var == index
            if obs_ok:
                labs = sl["obs"].to_list()
            else:
                d = _level_position(level_names, var, "residuals: variance")
                labs = sl[level_names[d]].to_list()
            for s, g in enumerate(labs):
                theta_param[s] = W.param(f"var(Residual[{_lab(g)}])", "resid", 0.0, "Residual")
        corr = residuals.get("correlation", "independent")
        if corr not in CORRELATIONS:
            raise MlsemError(f"residuals: correlation={corr!r} is not one of {', '.join(map(repr, CORRELATIONS))}")
        if corr != "independent":
            theta_func = _residual_correlation(W, prep, corr, index, theta_param)
    params = W.params
    # renumber: drop parameters no entry refers to any more
    used = set(map(int, table.beta_param)) | set(map(int, phi_p)) | set(map(int, theta_param))
    for blk in blocks:
        used |= {int(v) for v in np.ravel(blk.pidx) if v >= 0}
    if theta_func is not None:
        used |= set(theta_func.corr_params)
    # report order: coefficients, then variance components level by level, residual
    # variances, residual correlations (new parameters beside the ones they replace)
    kind_rank = {"fixed": 0, "var": 1, "cov": 1, "resid": 2, "rcov": 2, "corr": 3}
    lv_rank = {n: i for i, n in enumerate(level_names)}

    def key(i):
        p = params[i]
        return (kind_rank.get(p.kind, 4), lv_rank.get(p.level, len(level_names)), i)
    keep = sorted((i for i in range(len(params)) if i in used), key=key)
    new = -np.ones(len(params) + 1, dtype=np.int64)
    new[keep] = np.arange(len(keep))

    def rn(a):
        a = np.asarray(a, dtype=np.int64)
        return new[a]
    for blk in blocks:
        blk.pidx = np.where(blk.pidx >= 0, new[np.where(blk.pidx >= 0, blk.pidx, -1)], -1)
    if theta_func is not None:
        theta_func.renumber(new)
    out = replace(table, params=[params[i] for i in keep], beta_param=rn(table.beta_param),
                  phi_row=np.asarray(phi_r, dtype=np.int64), phi_col=np.asarray(phi_c, dtype=np.int64),
                  phi_param=rn(phi_p), theta_param=rn(theta_param), chol_blocks=blocks,
                  theta_func=theta_func)
    return out


def _relax_effects(W, prep, level, spec, phi_r, phi_c, phi_p, blocks):
    level_names = [lv.name for lv in prep.levels]
    d = _level_position(level_names, level, "effects")
    opt = f"effects[{level!r}]"
    if not isinstance(spec, dict):
        raise MlsemError(f"{opt}: expected a dict with 'variance' and/or 'covariance', got {spec!r}")
    unknown = set(spec) - {"variance", "covariance"}
    if unknown:
        raise MlsemError(f"{opt}: unknown option {sorted(unknown)[0]!r} (options: 'variance', 'covariance')")
    lats = [g for g, (dd, e) in enumerate(prep.latent_term) if dd == d]
    if not lats:
        raise MlsemError(f"{opt}: the formula has no random effect at level {level!r}")
    if any(prep.latent_term[g][1] != "Intercept" for g in lats):
        raise MlsemError(f"{opt}: relaxing a level with random slopes is not supported")
    # label and parent of each latent of the level, from the slots that load on it
    sl = prep.slot_labels
    lab_cols = level_names[1: d + 1]
    label, parent = {}, {}
    for s, row in enumerate(sl.select(lab_cols).iter_rows()):
        for g in prep.slot_lat[s]:
            if g >= 0 and g in lats:
                label[int(g)] = row[-1]
                parent[int(g)] = tuple(row[:-1])
    labels = prep.level_labels[d - 1]
    var = spec.get("variance", "common")
    cov = spec.get("covariance", "none")
    if isinstance(cov, str) and cov not in COVARIANCES:
        raise MlsemError(f"{opt}: covariance={cov!r} is not one of {', '.join(map(repr, COVARIANCES))}, "
                         "a list of slot-label pairs or a dict of groups")
    if cov == "unstructured" and var == "common":
        var = "slot"
    # variances
    if var == "slot":
        vname = {lab: f"var({level}[{_lab(lab)}])" for lab in labels}
    elif var == "common":
        vname = {lab: f"var({level})" for lab in labels}
    elif isinstance(var, dict):
        grp = _groups(var, labels, level, f"{opt}: variance")
        vname = {lab: f"var({level})" for lab in labels}
        for name, members in grp.items():
            for lab in members:
                vname[lab] = f"var({level}[{name}])"
    else:
        raise MlsemError(f"{opt}: variance={var!r} must be 'slot' or a dict {{group name: [slot labels]}}")
    new_p = list(phi_p)
    for e, (r, c) in enumerate(zip(phi_r, phi_c)):
        if r == c and r in label:
            new_p[e] = W.param(vname[label[r]], "var", 0.0, level)
    phi_p = new_p
    if cov == "none":
        return phi_r, phi_c, phi_p
    # covariances among the latents of one parent
    if cov == "unstructured":
        if var != "slot":
            raise MlsemError(f"{opt}: an unstructured covariance needs variance='slot' (one variance per slot label)")
        pairs = None
    elif cov == "equal":
        pairs = "equal"
    elif isinstance(cov, (list, tuple)):
        pairs = set()
        for pr in cov:
            if not isinstance(pr, (list, tuple)) or len(pr) != 2:
                raise MlsemError(f"{opt}: covariance pairs must be (label, label), got {pr!r}")
            a = _match_label(pr[0], labels, level, f"{opt}: covariance")
            b = _match_label(pr[1], labels, level, f"{opt}: covariance")
            if a == b:
                raise MlsemError(f"{opt}: covariance pair {pr!r} names one slot twice")
            pairs.add(frozenset((a, b)))
    elif isinstance(cov, dict):
        grp = _groups(cov, labels, level, f"{opt}: covariance")
        pairs = set()
        for members in grp.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    pairs.add(frozenset((a, b)))
    else:
        raise MlsemError(f"{opt}: covariance={cov!r} is not understood")
    by_parent = {}
    for g in sorted(lats):
        by_parent.setdefault(parent[g], []).append(g)
    order = {lab: i for i, lab in enumerate(labels)}
    chol_sets = {}
    for par, members in by_parent.items():
        members = sorted(members, key=lambda g: order[label[g]])
        lo, hi = min(members), max(members) + 1
        if hi - lo != len(members):
            raise MlsemError("internal: the latents of one parent are not contiguous")
        b = len(members)
        pidx = -np.ones((b, b), dtype=np.int64)
        for i, gi in enumerate(members):
            pidx[i, i] = W.by_name[vname[label[gi]]]
            for j, gj in enumerate(members[:i]):
                la, lb = label[gj], label[gi]
                if pairs is None or pairs == "equal" or frozenset((la, lb)) in pairs:
                    name = f"cov({level})" if pairs == "equal" else f"cov({level}[{_lab(la)}],{level}[{_lab(lb)}])"
                    p = W.param(name, "cov", -np.inf, level)
                    pidx[i, j] = pidx[j, i] = p
                    phi_r += [gi, gj]
                    phi_c += [gj, gi]
                    phi_p += [p, p]
        if pairs is None:
            key = tuple(label[g] for g in members)
            chol_sets.setdefault(key, (pidx, []))[1].append(members)
        else:
            blocks.append(CholBlock([members], pidx, natural=True))
    if chol_sets:
        seen = set()
        for key, (pidx, groups) in chol_sets.items():
            ps = set(np.ravel(pidx).tolist())
            if ps & seen:
                raise MlsemError(
                    f"{opt}: an unstructured covariance over parents with different sets of slot "
                    "labels is not supported (use listed pairs or groups)")
            seen |= ps
            blocks.append(CholBlock(groups, pidx))
    return phi_r, phi_c, phi_p


# ---- residual correlation: Theta = S R S within each innermost group ---------------
class ResidualCorrelation:
    """Structured residual covariance (``ParamTable.theta_func``).

    Theta_ss = v_s (the slot's variance parameter); for two slots s != t in the
    same innermost group Theta_st = sqrt(v_s v_t) R_st with R_st = rho^|i_s - i_t|
    (ar1), rho (exchangeable) or rho_{i_s,i_t} (unstructured)."""

    def __init__(self, kind, theta_param, pi, pj, lag, cparam, corr_params):
        self.kind = kind
        self.theta_param = theta_param   # (P,) variance parameter per slot
        self.pi, self.pj = pi, pj        # ordered pairs s != t within a group
        self.lag = lag                   # |i_s - i_t| (ar1)
        self.cparam = cparam             # correlation parameter per pair
        self.corr_params = corr_params

    def renumber(self, new):
        self.theta_param = new[self.theta_param]
        self.cparam = new[self.cparam]
        self.corr_params = [int(new[p]) for p in self.corr_params]

    def _r(self, psi):
        rho = psi[self.cparam]
        if self.kind == "ar1":
            return rho ** self.lag, self.lag * rho ** np.maximum(self.lag - 1, 0)
        return rho, np.ones_like(rho)

    def theta(self, psi, Theta):
        v = psi[self.theta_param]
        s = np.sqrt(np.clip(v, 0.0, None))
        R, _ = self._r(psi)
        Theta[self.pi, self.pj] = s[self.pi] * s[self.pj] * R
        return Theta

    def grad(self, psi, G):
        npar = len(psi)
        v = psi[self.theta_param]
        s = np.sqrt(np.clip(v, 1e-300, None))
        R, dR = self._r(psi)
        P = len(v)
        diag = np.arange(P)
        g = np.bincount(self.theta_param, weights=G[diag, diag], minlength=npar)
        gpair = G[self.pi, self.pj]
        # d Theta_st / d v_s = R_st s_t / (2 s_s)
        g += np.bincount(self.theta_param[self.pi], weights=gpair * R * s[self.pj] / (2 * s[self.pi]),
                         minlength=npar)
        g += np.bincount(self.theta_param[self.pj], weights=gpair * R * s[self.pi] / (2 * s[self.pj]),
                         minlength=npar)
        g += np.bincount(self.cparam, weights=gpair * s[self.pi] * s[self.pj] * dR, minlength=npar)
        return g


def _residual_correlation(W, prep, kind, index, theta_param):
    if kind in ("ar1", "unstructured") and index is None:
        raise MlsemError(
            f"residuals: correlation={kind!r} needs an observation order within the innermost group: "
            "give index=<column> (the row order of the data is not an order)")
    level_names = [lv.name for lv in prep.levels]
    sl = prep.slot_labels
    inner = level_names[1:]
    obs = sl["obs"].to_numpy()
    if kind == "ar1":
        if not np.all(np.isfinite(obs.astype(float))) or np.any(obs.astype(float) != np.round(obs.astype(float))):
            raise MlsemError(f"residuals: correlation='ar1' needs integer values in the index column {index!r}")
    keys = [tuple(r) for r in sl.select(inner).iter_rows()] if inner else [()] * sl.height
    by = {}
    for s, k in enumerate(keys):
        by.setdefault(k, []).append(s)
    pi, pj = [], []
    for members in by.values():
        for a in members:
            for b in members:
                if a != b:
                    pi.append(a)
                    pj.append(b)
    pi = np.asarray(pi, dtype=np.int64)
    pj = np.asarray(pj, dtype=np.int64)
    if len(pi) == 0:
        raise MlsemError(f"residuals: correlation={kind!r}: no innermost group has two observations")
    lag = np.abs(obs[pi].astype(float) - obs[pj].astype(float))
    if kind in ("ar1", "exchangeable"):
        p = W.param("corr(Residual)", "corr", -np.inf, "Residual")
        cparam = np.full(len(pi), p, dtype=np.int64)
        corr_params = [p]
    else:
        cparam = np.empty(len(pi), dtype=np.int64)
        corr_params = []
        for e, (a, b) in enumerate(zip(obs[pi], obs[pj])):
            lo, hi = sorted((a, b))
            p = W.param(f"corr(Residual[{_lab(lo)}],Residual[{_lab(hi)}])", "corr", -np.inf, "Residual")
            cparam[e] = p
            if p not in corr_params:
                corr_params.append(p)
    return ResidualCorrelation(kind, theta_param, pi, pj, lag, cparam, corr_params)


# ---- starting values ------------------------------------------------------------------
def needs_warm_start(table) -> bool:
    """Structures whose parameters are not PSD by construction (natural covariance
    blocks, residual correlations): the optimiser can meet a non-PD wall from the
    generic start values, so it starts from the mixed model's optimum instead
    (every relaxation contains the mixed model: the relaxed fit then can only
    improve on it)."""
    return table.theta_func is not None or any(getattr(b, "natural", False) for b in table.chol_blocks)


def warm_start(table, base_table, base_psi) -> np.ndarray:
    """Start values for ``table`` from a fit of ``base_table``, by name: a split
    parameter (``var(j[2])``, ``x[2]``, ``var(Residual[2])``) starts at the value of
    the one it splits (``var(j)``, ``x``, ``var(Residual)``); new covariances and
    correlations at 0."""
    base = dict(zip(base_table.names, base_psi))
    psi = np.zeros(table.nparams)
    for i, p in enumerate(table.params):
        if p.name in base:
            psi[i] = base[p.name]
        elif p.kind in ("cov", "corr", "rcov"):
            psi[i] = 0.0
        else:
            stripped = re.sub(r"\[[^\]]*\]", "", p.name)
            psi[i] = base.get(stripped, 0.0)
    return psi
