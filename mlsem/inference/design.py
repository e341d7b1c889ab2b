"""Design-based (Taylor-linearised) variance of pseudo-likelihood estimates
(issue 17).

V = H^-1 M H^-1, H the Hessian of the weighted pseudo-log-likelihood and

    M = sum_h (1 - f_h) n_h / (n_h - 1) sum_i (z_hi - zbar_h)(z_hi - zbar_h)'

over strata h with n_h sampled PSUs whose score totals are z_hi = sum over
the PSU's top-level units k of w_k s_k (s_k = dl_k/dpsi with the weights of
the levels below; mlsem.model.pseudo), f_h the sampling fraction (n_h / N_h
for a population count N_h).  This is R's survey::svyrecvar for a one-stage
design (with-replacement at the second stage).  Strata with a single PSU
(``singleton``): "fail" (error), "certainty" (contribute 0), "scaled" (M
times #strata / #strata with more than one PSU), "centered" (the PSU
centred at the grand mean of all PSU totals, factor 1).  Design degrees of
freedom: #PSU - #strata.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import MlsemError


@dataclass
class DesignInfo:
    stratum: np.ndarray      # (npsu,) stratum code of each PSU
    psu_ids: list            # PSU id values
    stratum_ids: list        # stratum id values
    n_h: np.ndarray          # PSUs per stratum
    fpc_factor: np.ndarray   # (1 - f_h) per stratum
    singleton: str
    nstrata: int
    npsu: int
    top_psu: dict            # top-level id -> PSU code

    @property
    def df(self) -> int:
        return self.npsu - self.nstrata


def design_info(tab: pl.DataFrame, top: str, design) -> DesignInfo:
    """From mlsem.data.weights.top_design's table (one row per top unit)."""
    psu = tab.select("__psu", "__stratum", "__fpc").unique(subset=["__psu"], keep="first").sort("__psu")
    strata = psu["__stratum"].unique().sort()
    s_code = {v: i for i, v in enumerate(strata.to_list())}
    stratum = np.array([s_code[v] for v in psu["__stratum"].to_list()], dtype=np.int64)
    H = len(strata)
    n_h = np.bincount(stratum, minlength=H)
    fpc = psu["__fpc"].to_numpy()
    factor = np.ones(H)
    if not np.all(np.isnan(fpc)):
        name = design.fpc if isinstance(design.fpc, str) else "fpc"
        for h in range(H):
            vals = np.unique(fpc[stratum == h])
            sname = strata[h]
            if len(vals) > 1:
                raise MlsemError(f"SurveyDesign: fpc {name!r} varies within stratum {sname!r} "
                                 f"({', '.join(f'{v:g}' for v in vals[:4])}): it must be constant "
                                 "within a stratum")
            f = float(vals[0])
            if not np.isfinite(f) or f <= 0:
                raise MlsemError(f"SurveyDesign: fpc {name!r} is {f:g} in stratum {sname!r}: a "
                                 "population count or a sampling fraction must be positive")
            if f <= 1.0:
                frac = f
            else:
                if f < n_h[h]:
                    raise MlsemError(f"SurveyDesign: fpc {name!r} = {f:g} in stratum {sname!r} is "
                                     f"below the {int(n_h[h])} PSUs sampled there: the population "
                                     "count of PSUs cannot be smaller than the sample")
                frac = n_h[h] / f
            factor[h] = 1.0 - frac
    single = np.flatnonzero(n_h == 1)
    if single.size and design.singleton == "fail":
        names = ", ".join(repr(strata[int(h)]) for h in single[:5])
        what = f"stratum {design.strata} = " if design.strata else "the design's only stratum "
        raise MlsemError(f"SurveyDesign: {what}{names} has a single PSU ({single.size} such "
                         "stratum/strata): its variance cannot be estimated; choose "
                         "singleton='certainty', 'scaled' or 'centered', or merge strata")
    psu_code = {v: i for i, v in enumerate(psu["__psu"].to_list())}
    top_psu = {t: psu_code[v] for t, v in zip(tab[top].to_list(), tab["__psu"].to_list())}
    return DesignInfo(stratum=stratum, psu_ids=psu["__psu"].to_list(), stratum_ids=strata.to_list(),
                      n_h=n_h, fpc_factor=factor, singleton=design.singleton, nstrata=H,
                      npsu=len(stratum), top_psu=top_psu)


def psu_totals(info: DesignInfo, top_ids, weighted_scores: np.ndarray) -> np.ndarray:
    """(npsu, p) totals of the top units' weighted scores (0 for a PSU with no
    unit in the fit, e.g. outside a subpopulation)."""
    code = np.array([info.top_psu[t] for t in top_ids], dtype=np.int64)
    Z = np.zeros((info.npsu, weighted_scores.shape[1]))
    np.add.at(Z, code, weighted_scores)
    return Z


def meat(info: DesignInfo, Z: np.ndarray) -> np.ndarray:
    """M from the PSU totals (module docstring)."""
    p = Z.shape[1]
    M = np.zeros((p, p))
    grand = Z.mean(axis=0)
    for h in range(info.nstrata):
        zh = Z[info.stratum == h]
        n = zh.shape[0]
        if n == 1:
            if info.singleton == "centered":
                d = zh[0] - grand
                M += info.fpc_factor[h] * np.outer(d, d)
            continue
        d = zh - zh.mean(axis=0)
        M += info.fpc_factor[h] * n / (n - 1.0) * (d.T @ d)
    if info.singleton == "scaled":
        multi = int(np.sum(info.n_h > 1))
        if multi == 0:
            raise MlsemError("SurveyDesign: singleton='scaled' needs a stratum with more than one PSU")
        M *= info.nstrata / multi
    return M


def linearized(info_matrix: np.ndarray, M: np.ndarray) -> np.ndarray:
    """H^-1 M H^-1 from the observed information -H (symmetrised)."""
    try:
        Ai = np.linalg.inv(info_matrix)
    except np.linalg.LinAlgError:
        Ai = np.linalg.pinv(info_matrix)
    V = Ai @ M @ Ai
    return 0.5 * (V + V.T)


def scores_frame(res, by: str = "psu") -> pl.DataFrame:
    """Score contributions of a survey fit as a Polars frame: one row per PSU
    (``by="psu"``: the stratum and PSU ids, then the PSU totals of w_k s_k, one
    column per parameter; PSUs without observations in a subpopulation have
    0) or per top-level unit (``by="unit"``: its id, stratum, PSU, top weight,
    then w_k s_k).  The columns sum to the gradient (0 at the estimates)."""
    sv = getattr(res, "survey", None)
    if sv is None:
        raise MlsemError("scores(): available for fits with survey= (mlsem.SurveyDesign)")
    names = list(res.names)
    if by == "psu":
        info = sv.info
        cols = {"stratum": [info.stratum_ids[h] for h in info.stratum], "psu": info.psu_ids}
        Z = sv.psu_totals
    elif by == "unit":
        tab = sv.design_table
        m = pl.DataFrame({sv.top: sv.top_ids}).join(tab, on=sv.top, how="left")
        cols = {sv.top: sv.top_ids, "stratum": m["__stratum"].to_list(),
                "psu": m["__psu"].to_list(), "weight": sv.top_weights}
        Z = sv.scores * sv.top_weights[:, None]
    else:
        raise MlsemError(f"scores(by={by!r}): by is 'psu' or 'unit'")
    out = pl.DataFrame(cols)
    return out.with_columns([pl.Series(n, Z[:, i]) for i, n in enumerate(names)])


def hessian_frame(res) -> pl.DataFrame:
    """The Hessian of the (pseudo-)log-likelihood at the estimates, labelled
    (a ``name`` column, then one column per parameter): -res.info."""
    if res.info is None:
        raise MlsemError("hessian(): this fit has no observed information")
    H = -np.asarray(res.info)
    return pl.DataFrame({"name": list(res.names), **{n: H[:, i] for i, n in enumerate(res.names)}})


def design_f(chi2: float, q: int, d) -> dict | None:
    """The design-adjusted Wald F of a survey fit (Stata's svy test): F =
    (d - q + 1) / (d q) chi2 on (q, d - q + 1) df, d the design df (#PSU -
    #strata).  None when d < q (no denominator df)."""
    from scipy import stats
    if d is None or d < q or q < 1:
        return None
    F = (d - q + 1) / (d * q) * chi2
    return {"F": float(F), "df_num": int(q), "df_den": int(d - q + 1),
            "p_value": float(stats.f.sf(F, q, d - q + 1)) if np.isfinite(F) else float("nan"),
            "design_df": int(d)}
