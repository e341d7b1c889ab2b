"""Spec layer: the parameter table, the single description of a model.

One row per matrix entry:

    matrix  "beta"  (the mean's coefficient on design column ``row``),
            "phi"   (covariance of latents ``row``, ``col``; both triangles),
            "theta" (residual covariance of slots ``row``, ``col``; both triangles)
    param   index of the free parameter (equal labels share one), or -1 fixed
    value   the fixed value where ``param`` is -1

and one row per free parameter (its name, kind, lower bound).  The multilevel
front end (:func:`multilevel_table`) writes the mixed model's constraints as
labels; relaxations rewrite labels, never code.  Blocks of latents whose
covariance is unstructured are listed in ``chol_blocks``: the optimiser moves
their Cholesky factor (as lme4 does), so they stay positive semi-definite.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..errors import MlsemError


@dataclass
class Param:
    name: str
    kind: str            # "fixed" | "var" | "cov" | "resid" | "rcov"
    lower: float = -np.inf
    level: str = ""      # grouping level for variance components


@dataclass
class CholBlock:
    """Latent groups sharing one unstructured covariance matrix.

    ``groups``: list of latent-index lists (each of length b, same order);
    ``pidx``: b x b matrix of parameter indices of the covariance entries
    (-1: fixed at 0).  ``natural``: the block's parameters are optimised as they
    are (not through a Cholesky factor), for structured blocks such as equal or
    listed covariances; a block that is not positive semi-definite then makes
    the optimiser back off."""
    groups: list
    pidx: np.ndarray
    natural: bool = False


class ParamList:
    """What every parameter table has: its free parameters (``params``)."""

    @property
    def names(self) -> list:
        return [p.name for p in self.params]

    @property
    def nparams(self) -> int:
        return len(self.params)


@dataclass
class ParamTable(ParamList):
    params: list
    beta_param: np.ndarray        # (q,) param index per design column
    phi_row: np.ndarray           # entries of Phi that are free
    phi_col: np.ndarray
    phi_param: np.ndarray
    theta_row: np.ndarray         # entries of Theta that are free (both triangles)
    theta_col: np.ndarray
    theta_param: np.ndarray
    nlatent: int
    nslots: int
    chol_blocks: list = field(default_factory=list)
    latent_names: list = field(default_factory=list)
    theta_func: object = None     # optional structured residual covariance (see model)

    @property
    def theta_diagonal(self) -> bool:
        return self.theta_func is None and bool(np.all(self.theta_row == self.theta_col))

    def index(self, name: str) -> int:
        for i, p in enumerate(self.params):
            if p.name == name:
                return i
        raise MlsemError(f"no parameter named {name!r} (parameters: {', '.join(self.names)})")

    def kind_mask(self, *kinds) -> np.ndarray:
        return np.array([p.kind in kinds for p in self.params], dtype=bool)

    def to_frame(self) -> pl.DataFrame:
        """The table as a user sees it: one row per matrix entry."""
        rows = []
        for c, p in enumerate(self.beta_param):
            rows.append(("beta", c, 0, int(p), self.params[p].name))
        for r, c, p in zip(self.phi_row, self.phi_col, self.phi_param):
            if r >= c:
                rows.append(("phi", int(r), int(c), int(p), self.params[p].name))
        for r, c, p in zip(self.theta_row, self.theta_col, self.theta_param):
            if r >= c:
                rows.append(("theta", int(r), int(c), int(p), self.params[p].name))
        return pl.DataFrame(rows, schema=["matrix", "row", "col", "param", "name"], orient="row")


class _Builder:
    def __init__(self):
        self.params: list = []
        self.by_name: dict = {}

    def param(self, name, kind, lower=-np.inf, level=""):
        if name not in self.by_name:
            self.by_name[name] = len(self.params)
            self.params.append(Param(name, kind, lower, level))
        return self.by_name[name]


def multilevel_table(prep, formula, levels) -> ParamTable:
    """The mixed model's constraints as a parameter table.

    One coefficient per design column shared by every slot; per level, one
    variance for the random intercepts of all its nodes (and, for random
    slopes, one covariance block shared by all nodes); one residual variance
    for every slot."""
    b = _Builder()
    beta = np.array([b.param(n, "fixed") for n in prep.xnames], dtype=np.int64)
    phi_r, phi_c, phi_p = [], [], []
    chol_blocks = []
    lat_terms = prep.latent_term
    node = prep.latent_node
    by_level: dict = {}
    for g, (d, e) in enumerate(lat_terms):
        by_level.setdefault(d, []).append(g)
    for d, lats in by_level.items():
        lvname = prep.levels[d].name
        effs = []
        for g in lats:
            if lat_terms[g][1] not in effs:
                effs.append(lat_terms[g][1])
        rt = next(t for t in formula.random if len(t.group) == d + 1)
        single = effs == ["Intercept"]

        def vname(e):
            return f"var({lvname})" if single else f"var({lvname}:{e})"

        if single or not rt.correlated:
            for g in lats:
                p = b.param(vname(lat_terms[g][1]), "var", 0.0, lvname)
                phi_r.append(g), phi_c.append(g), phi_p.append(p)
        else:
            nb = len(effs)
            pidx = np.zeros((nb, nb), dtype=np.int64)
            for i, ei in enumerate(effs):
                for j, ej in enumerate(effs[: i + 1]):
                    if i == j:
                        pidx[i, i] = b.param(vname(ei), "var", 0.0, lvname)
                    else:
                        pidx[i, j] = pidx[j, i] = b.param(f"cov({lvname}:{ej},{lvname}:{ei})", "cov", -np.inf, lvname)
            groups = {}
            for g in lats:
                groups.setdefault(int(node[g]), []).append(g)
            glist = [sorted(v, key=lambda g: effs.index(lat_terms[g][1])) for v in groups.values()]
            for grp in glist:
                for i in range(nb):
                    for j in range(nb):
                        phi_r.append(grp[i]), phi_c.append(grp[j]), phi_p.append(pidx[i, j])
            chol_blocks.append(CholBlock(glist, pidx))
    pres = b.param("var(Residual)", "resid", 0.0, "Residual")
    P = prep.nslots
    th = np.arange(P)
    return ParamTable(
        params=b.params, beta_param=beta,
        phi_row=np.array(phi_r, dtype=np.int64), phi_col=np.array(phi_c, dtype=np.int64),
        phi_param=np.array(phi_p, dtype=np.int64),
        theta_row=th, theta_col=th.copy(), theta_param=np.full(P, pres, dtype=np.int64),
        nlatent=prep.nlatent, nslots=P, chol_blocks=chol_blocks,
        latent_names=prep.latent_names)
