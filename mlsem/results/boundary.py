"""Boundary (singular) fits: random-effect covariance blocks that are singular at the
estimate (a variance at 0, or correlations at +-1), what lme4 calls a singular fit.

There the observed information is singular too, without the model being unidentified
in the usual sense (a slope on an uncentred year, correlated -1 with the intercept, is
the common case): the summary says which block is singular and why its parameters have
no standard errors, instead of calling them confounded."""
from __future__ import annotations

import re

import numpy as np

_VAR = re.compile(r"^var\((?P<a>[^,()]+)\)$")
_COV = re.compile(r"^cov\((?P<a>[^,()]+),(?P<b>[^,()]+)\)$")
# smallest eigenvalue of a block's correlation matrix (or a variance relative to the
# largest of the outcome's variances) at or below this is a singular block
SINGULAR_EIG = 1e-6


def _level(term: str) -> str:
    return term.split(":", 1)[0] if ":" in term else term


def singular_blocks(names, kinds, estimate) -> list:
    """[(level, parameter names of the block, description)] for each random-effect
    covariance block that is singular at ``estimate`` (levels in order of appearance;
    the residual variances are not random effects and are left out)."""
    est = dict(zip(names, estimate))
    terms, pos = {}, {}
    for n, k in zip(names, kinds):
        m = _VAR.match(n) if k == "var" else None
        if m and not m["a"].startswith("Residual"):
            a = m["a"]
            terms.setdefault(_level(a), []).append(a)
            pos[a] = n
    out = []
    for level, ts in terms.items():
        C = np.array([[est[pos[a]] if a == b else est.get(f"cov({a},{b})", est.get(f"cov({b},{a})", 0.0))
                       for b in ts] for a in ts], dtype=float)
        if not np.all(np.isfinite(C)):
            continue
        params = [pos[a] for a in ts] + [f"cov({a},{b})" for i, a in enumerate(ts) for b in ts[i + 1:]
                                         if f"cov({a},{b})" in est]
        zero = [a for a in ts if C[ts.index(a), ts.index(a)] <= 0.0]
        if zero:
            out.append((level, params, ", ".join(f"var({a}) = 0" for a in zero)))
            continue
        if len(ts) < 2:
            continue
        d = np.sqrt(np.diag(C))
        R = C / np.outer(d, d)
        lam, Q = np.linalg.eigh(0.5 * (R + R.T))
        if lam[0] > SINGULAR_EIG:
            continue
        # the pair most involved in the null direction, as the correlation to show
        v = np.abs(Q[:, 0])
        i, j = np.argsort(v)[::-1][:2]
        i, j = min(i, j), max(i, j)
        out.append((level, params, f"corr({ts[i]},{ts[j]}) = {R[i, j]:.4f}"))
    return out


def boundary_note(blocks) -> str:
    """One line for the summary's notes."""
    parts = [f"the random effects' covariance at {lv} is singular ({why})" for lv, _, why in blocks]
    return ("boundary (singular) fit: " + "; ".join(parts)
            + " (lme4 reports such a fit as singular; a simpler random-effects structure, or a "
              "centred or rescaled covariate, usually avoids it)")
