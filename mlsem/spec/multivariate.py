"""Spec layer, several outcomes (issue 15): formulas -> one parameter table.

``["y1 ~ x + z + (1 | k/j)", "y2 ~ x + (1 | k/j)"]``: each outcome its own fixed part
(design columns named ``y1:x``, ``y2:Intercept``), the same nested grouping in every
formula, one random intercept per outcome per level.  By default the effects of the
outcomes at each level and the residuals of one unit (a pupil) have an unstructured
covariance across outcomes (``var(k:y1)``, ``cov(k:y1,k:y2)``, ``var(Residual:y2)``,
``cov(Residual:y1,Residual:y2)``); ``outcomes={"k": "independent", "residual":
"independent"}`` sets the cross-outcome covariances of that level (or of the
residuals) to 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MlsemError
from .formula import nest_levels, parse_formula
from .table import CholBlock, ParamTable, _Builder

STRUCTURES = ("unstructured", "independent")


@dataclass
class MultiTable(ParamTable):
    """ParamTable whose Theta entries index the nout x nout residual covariance R."""
    nout: int = 1
    outcomes: list = field(default_factory=list)
    beta_cols: list = field(default_factory=list)     # design columns of each outcome
    param_outcomes: dict = field(default_factory=dict)   # (co)variance param -> (o, o')

    @property
    def theta_diagonal(self) -> bool:
        return False


def parse_formulas(formulas) -> tuple:
    """(parsed formulas, levels): every formula with random intercepts only and the
    same nested grouping; outcomes distinct."""
    if isinstance(formulas, str) or len(formulas) < 2:
        raise MlsemError("several outcomes need a list of two or more formulas, one per outcome")
    Fs = [parse_formula(f) if isinstance(f, str) else f for f in formulas]
    outs = [F.outcome for F in Fs]
    dup = [o for o in outs if outs.count(o) > 1]
    if dup:
        raise MlsemError(f"formulas: the outcome {dup[0]!r} has two formulas; give one per outcome")
    if len(Fs) > 8:
        raise MlsemError(f"{len(Fs)} outcomes: at most 8 are supported")
    levels = nest_levels(Fs[0])
    groups0 = sorted(rt.group for rt in Fs[0].random)
    for F in Fs:
        groups = sorted(rt.group for rt in F.random)
        if groups != groups0 or nest_levels(F) != levels:
            raise MlsemError(
                f"formulas: {F.text!r} has the grouping {', '.join(':'.join(g) for g in groups)}, "
                f"{Fs[0].text!r} {', '.join(':'.join(g) for g in groups0)}: several outcomes need "
                "the same grouping structure in every formula")
        for rt in F.random:
            if list(rt.effects) != ["Intercept"]:
                raise MlsemError(
                    f"formulas: the random term {rt.text!r} of {F.text!r} has random slopes: with "
                    "several outcomes only random intercepts ((1 | k/j)) are supported")
    for F in Fs:
        for o in outs:
            if o != F.outcome and (o in F.columns or o in F.variables):
                raise MlsemError(
                    f"formulas: the outcome {o!r} is a covariate in {F.text!r}: with several "
                    "outcomes the outcomes are modelled jointly (their covariances across "
                    f"outcomes), so {o!r} cannot also explain another outcome; remove it from "
                    "that formula, or fit the outcomes one at a time")
    if any(o in {c for lv in levels for c in lv} for o in outs):
        raise MlsemError("formulas: an outcome is also a grouping column")
    return Fs, levels


def check_structures(outcomes, level_names) -> dict:
    """{level name or "residual": "unstructured" | "independent"}, every level filled."""
    keys = list(level_names) + ["residual"]
    out = {k: "unstructured" for k in keys}
    if outcomes is None:
        return out
    if not isinstance(outcomes, dict):
        raise MlsemError(f"outcomes={outcomes!r} must be a dict such as "
                         "{'k': 'independent', 'residual': 'independent'}")
    for k, v in outcomes.items():
        if k not in out:
            raise MlsemError(f"outcomes: {k!r} is not a level of the model nor 'residual' "
                             f"(one of {', '.join(map(repr, keys))})")
        if v not in STRUCTURES:
            raise MlsemError(f"outcomes[{k!r}] = {v!r} is not one of {', '.join(map(repr, STRUCTURES))}")
        out[k] = v
    return out


def multivariate_table(prep, outcomes: list, structures: dict) -> MultiTable:
    """Coefficients per outcome's design column; per level with effects one latent per
    (node, outcome) (``prep.latent_node`` groups a node's latents, outcome order), their
    covariance across outcomes unstructured (a Cholesky block shared by every node of
    the level) or independent (one variance per outcome); the residual covariance R
    likewise."""
    nout = len(outcomes)
    b = _Builder()
    beta = np.array([b.param(n, "fixed") for n in prep.xnames], dtype=np.int64)
    beta_cols = [[c for c, n in enumerate(prep.xnames) if n.startswith(f"{o}:")] for o in outcomes]
    phi_r, phi_c, phi_p = [], [], []
    chol_blocks = []
    pout = {}
    by_level: dict = {}
    for g, (d, _) in enumerate(prep.latent_term):
        by_level.setdefault(d, []).append(g)
    for d, lats in by_level.items():
        lv = prep.levels[d].name
        unstructured = structures[lv] == "unstructured"
        pidx = np.full((nout, nout), -1, dtype=np.int64)
        for i in range(nout):
            for j in range(i + 1):
                if i == j:
                    pidx[i, i] = b.param(f"var({lv}:{outcomes[i]})", "var", 0.0, lv)
                elif unstructured:
                    pidx[i, j] = pidx[j, i] = b.param(
                        f"cov({lv}:{outcomes[j]},{lv}:{outcomes[i]})", "cov", -np.inf, lv)
                pout[int(pidx[i, j])] = (j, i)
        pout.pop(-1, None)
        nodes: dict = {}
        for g in lats:
            nodes.setdefault(int(prep.latent_node[g]), []).append(g)
        glist = [sorted(v) for v in nodes.values()]
        for grp in glist:
            if len(grp) != nout:
                raise MlsemError("internal: a node without one latent per outcome")
            for i in range(nout):
                for j in range(nout):
                    if pidx[i, j] >= 0:
                        phi_r.append(grp[i]), phi_c.append(grp[j]), phi_p.append(pidx[i, j])
        if unstructured:
            chol_blocks.append(CholBlock(glist, pidx))
    R = np.full((nout, nout), -1, dtype=np.int64)
    unstructured = structures["residual"] == "unstructured"
    for i in range(nout):
        for j in range(i + 1):
            if i == j:
                R[i, i] = b.param(f"var(Residual:{outcomes[i]})", "resid", 0.0, "Residual")
            elif unstructured:
                R[i, j] = R[j, i] = b.param(f"cov(Residual:{outcomes[j]},Residual:{outcomes[i]})",
                                            "rcov", -np.inf, "Residual")
            if R[i, j] >= 0:
                pout[int(R[i, j])] = (j, i)
    if unstructured:
        chol_blocks.append(CholBlock([], R))
    tr, tc = np.nonzero(R >= 0)
    return MultiTable(
        params=b.params, beta_param=beta,
        phi_row=np.array(phi_r, dtype=np.int64), phi_col=np.array(phi_c, dtype=np.int64),
        phi_param=np.array(phi_p, dtype=np.int64),
        theta_row=tr.astype(np.int64), theta_col=tc.astype(np.int64),
        theta_param=R[tr, tc].astype(np.int64),
        nlatent=prep.nlatent, nslots=prep.nslots, chol_blocks=chol_blocks,
        latent_names=prep.latent_names, nout=nout, outcomes=list(outcomes),
        beta_cols=beta_cols, param_outcomes=pout)
