"""Model layer, several outcomes (issue 15): the objective with Theta block-diagonal per unit.

Slots are (unit, outcome) pairs (``prep.meta["sout"]``, ``prep.meta["spup"]``); the
residuals of one unit (a pupil) have the nout x nout covariance R, so Theta_o is
block-diagonal with R[S, S] for the outcomes S a unit has observed.  The kernel
(``_core.mfactor_loglik``) applies D = Theta_o^-1 block by block inside the Woodbury
algebra of the factor path: O(observations) per evaluation, never a dense per-row
Sigma.  The NumPy oracle (``_oracle.loglik_blocks``) computes the same with dense
algebra.  The parameter table's Theta entries index R (``table.theta_row``,
``theta_col`` in [0, nout)); everything else is :class:`mlsem.model.multilevel.Model`'s.
"""
from __future__ import annotations

import contextlib
from itertools import combinations

import numpy as np

from . import _oracle
from .multilevel import Model, _core, chain_rule


def subset_inverses(R):
    """(rinv, rlogdet): for every bit mask of outcomes S (2^nout of them), R[S, S]^-1 in
    the order of S (zero-padded to nout x nout) and log|R[S, S]|; None if R is not
    positive definite."""
    nout = R.shape[0]
    try:
        C = np.linalg.cholesky(R)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(C)) or np.min(np.diag(C)) <= 0:
        return None
    rinv = np.zeros((1 << nout, nout, nout))
    rlogdet = np.zeros(1 << nout)
    for size in range(1, nout + 1):
        for S in combinations(range(nout), size):
            mask = sum(1 << o for o in S)
            sub = R[np.ix_(S, S)]
            Cs = np.linalg.cholesky(sub)
            Ci = np.linalg.inv(Cs)
            rinv[mask, :size, :size] = Ci.T @ Ci
            rlogdet[mask] = 2.0 * np.log(np.diag(Cs)).sum()
    return rinv, rlogdet


class MultiModel(Model):
    """:class:`Model` for several outcomes: Theta is R per unit (see the module)."""

    def __init__(self, prep, table, backend: str = "auto", nthreads: int | None = None):
        # the units (pscale) are the outcomes' own (_outcome_scales), not the stacked
        # least-squares fit's: Model's are not computed.  A block design that the data layer
        # writes on first use (data.multivariate.CellsPrepared) stays unwritten here: Model
        # takes its shape and a reference only
        defer = getattr(prep, "deferred", None)
        with (defer() if defer is not None else contextlib.nullcontext()):
            super().__init__(prep, table, backend=backend, nthreads=nthreads,
                             units=((None, 1.0), None))
        self.nout = int(table.nout)
        self.dense = False
        self._hess_layout(table)      # the kernel's exact d2l/dPhi2 (all the Phi parameters)
        self._gth = np.zeros((self._nt, self.nout * self.nout))
        self._sout = np.ascontiguousarray(prep.meta["sout"], dtype=np.int32)
        self._spup = np.ascontiguousarray(prep.meta["spup"], dtype=np.int32)
        # the design is block-diagonal by outcome: the kernel reads each cell's own columns
        # only (a compact X, half the memory traffic of the stacked one for two outcomes)
        cols = [np.asarray(c, dtype=np.int64) for c in table.beta_cols]
        order = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        self._xorder = order
        self._xoff = np.zeros(self.nout + 1, dtype=np.int32)
        self._xoff[1:] = np.cumsum([len(c) for c in cols])
        qmax = max([len(c) for c in cols] + [1])
        # a cell's row of the stacked X is 0 outside its outcome's columns: column a of
        # the compact X is the sum over the outcomes of their a-th columns
        Xc = prep.meta.get("Xc") if isinstance(prep.meta, dict) else None
        if Xc is None or Xc.shape != (prep.nobs, qmax) or any(
                not np.array_equal(c, np.arange(o, o + len(c))) for o, c in
                zip(np.cumsum([0] + [len(c) for c in cols]), cols)):
            # (data.multivariate.prepare_multi's compact design when the table's columns
            # are the design's, in order)
            Xc = np.zeros((prep.nobs, qmax))
            for o, c in enumerate(cols):
                for a, col in enumerate(c):
                    Xc[:, a] += prep.X[:, col]
        else:
            # the outcomes' least-squares cross products from the data layer (the same
            # sums over the same cells, from the units' columns)
            zc = prep.meta.get("zcross")
            if zc is not None and zc.shape == (self.nout, qmax + 2, qmax + 2):
                self._zcross = zc
        self._Xc = np.ascontiguousarray(Xc, dtype=np.float64)
        self.pscale = self._outcome_scales()
        self.ols = (None, float(np.mean([v for (_, _, v, _) in self._ols_fit])))
        self._gbeta = np.zeros((self._nt, max(self.q, 8)))

    # the block design (Model keeps a reference: written on first use, see above)
    @property
    def _X(self):
        return self.prep.X

    @_X.setter
    def _X(self, value):
        pass

    # the loadings likewise (all 1 in the data layer's layout of several outcomes)
    @property
    def _load(self):
        return self.__dict__.get("_load_own") if "_load_own" in self.__dict__ else \
            np.ascontiguousarray(self.prep.load, dtype=np.float64)

    @_load.setter
    def _load(self, value):
        if not getattr(self.prep, "unit_load", False):
            self.__dict__["_load_own"] = value

    @property
    def _ocell(self):
        """Each cell's outcome (built when first asked for)."""
        got = self.__dict__.get("_ocell_c")
        if got is None:
            got = self.__dict__["_ocell_c"] = self._sout[self.prep.slot]
        return got

    @_ocell.setter
    def _ocell(self, value):
        self.__dict__["_ocell_c"] = value

    @property
    def _orows(self):
        """Per outcome the positions of its cells (built when first asked for)."""
        got = self.__dict__.get("_orows_c")
        if got is None:
            got = self.__dict__["_orows_c"] = [np.flatnonzero(self._ocell == o)
                                               for o in range(self.nout)]
        return got

    @_orows.setter
    def _orows(self, value):
        self.__dict__["_orows_c"] = value

    @property
    def _ols_out(self):
        """Per outcome (rows of its cells, its design columns, OLS beta, mean squared
        residual)."""
        got = self.__dict__.get("_ols_out_set")
        if got is not None:
            return got
        return [(r, c, b, v) for r, (c, b, v, _) in zip(self._orows, self._ols_fit)]

    @_ols_out.setter
    def _ols_out(self, value):
        self.__dict__["_ols_out_set"] = value

    # ---- units --------------------------------------------------------------
    def outcome_ols(self):
        """Per outcome: (its design columns, OLS beta of them, mean squared residual, its
        number of cells), by the normal equations from the cross products of [1, X_o, y]
        (the data layer's ``meta["zcross"]``, else one pass over the cells,
        ``_core.outcome_cross``; least squares on the outcome's cells where X'X is
        singular).  Keeps ``_zsums`` (nout, 2 + qmax):
        per outcome its number of cells and the sums of its X columns and y (the grouping's
        centring, the units) and ``_zsq``, the sums of squares of its X columns."""
        prep = self.prep
        out = []
        nout, Xc, y = self.nout, self._Xc, np.ascontiguousarray(prep.y, dtype=np.float64)
        qs = np.array([len(c) for c in self.table.beta_cols], dtype=np.int32)
        k = Xc.shape[1] + 2
        Pall = np.zeros((nout, k, k))
        if getattr(self, "_zcross", None) is not None:
            Pall[:] = self._zcross
        elif _core is not None and hasattr(_core, "outcome_cross"):
            self._ocell = np.empty(prep.nobs, dtype=np.int32)
            _core.outcome_cross(self._slot, self._sout, y, Xc, qs, Pall, self._ocell)
            self._zcross_cells = Pall.copy()
        else:     # pragma: no cover - the kernel not built: gathers and BLAS
            self._ocell = self._sout[prep.slot]
            for o in range(nout):
                Z = self._cells_z(o, int(qs[o]))
                Pall[o, :qs[o] + 2, :qs[o] + 2] = Z.T @ Z
        self._zsums = np.zeros((nout, Xc.shape[1] + 2))
        self._zsq = np.zeros((nout, Xc.shape[1]))
        for o in range(nout):
            cols = np.asarray(self.table.beta_cols[o])
            qo = len(cols)
            P = Pall[o, :qo + 2, :qo + 2]
            ncell = int(round(P[0, 0]))
            n = max(ncell, 1)
            self._zsums[o, 0] = P[0, 0]
            self._zsums[o, 1:1 + qo] = P[0, 1:1 + qo]
            self._zsums[o, -1] = P[0, qo + 1]
            self._zsq[o, :qo] = np.diag(P)[1:1 + qo]
            b = None
            if qo:
                XX, Xy, yy = P[1:1 + qo, 1:1 + qo], P[1:1 + qo, qo + 1], P[qo + 1, qo + 1]
                try:
                    b = np.linalg.solve(XX, Xy)
                    rss = yy - 2 * b @ Xy + b @ XX @ b
                    if not (np.all(np.isfinite(b)) and rss > 1e-8 * yy):
                        b = None
                except np.linalg.LinAlgError:
                    b = None
                if b is None:    # singular or nearly collinear: least squares on the cells
                    Z = self._cells_z(o, qo)
                    X = Z[:, 1:1 + qo]
                    b = np.linalg.lstsq(X, Z[:, qo + 1], rcond=None)[0]
                    r = Z[:, qo + 1] - X @ b
                    rss = float(r @ r)
            else:
                b = np.zeros(0)
                yo = self._cells_z(o, 0)[:, 1]
                rss = float(np.sum((yo - yo.mean()) ** 2)) if len(yo) else 0.0
            out.append((cols, b, float(rss) / n, ncell))
        return out

    def _cells_z(self, o, qo):
        """[1, X_o, y] of outcome o's cells (gathered: the rare paths only)."""
        rows = self._orows[o]
        Z = np.empty((len(rows), qo + 2))
        Z[:, 0] = 1.0
        Z[:, 1:1 + qo] = np.take(self._Xc[:, :qo], rows, axis=0)
        Z[:, qo + 1] = self.prep.y[rows]
        return Z

    def _outcome_scales(self):
        """param_scales with one residual scale per outcome: a coefficient of outcome o
        s_o / sd(x), a (co)variance of outcomes o, o' s_o s_o'."""
        t = self.table
        d = np.ones(t.nparams)
        self._ols_fit = self.outcome_ols()
        s = np.array([np.sqrt(v) if v > 0 else 1.0 for (_, _, v, _) in self._ols_fit])
        for o, (cols, _, _, ncell) in enumerate(self._ols_fit):
            n = max(ncell, 1)
            for a, c in enumerate(cols):
                m = self._zsums[o, 1 + a] / n
                var = self._zsq[o, a] / n - m * m
                if var > 1e-6 * m * m:            # the one-pass variance is accurate
                    sx = float(np.sqrt(var))
                elif self._zsums[o, 1 + a] == n and self._zsq[o, a] == n:
                    sx = 1.0                      # a column of ones (sum(x - 1)^2 = 0)
                else:                             # else (or constant) the two-pass one
                    x = self._cells_z(o, len(cols))[:, 1 + a]
                    sx = float(np.std(x)) if len(x) else 0.0
                    if not sx > 0:
                        sx = float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0
                        sx = sx or 1.0
                d[t.beta_param[c]] = s[o] / sx
        for p, (a, b) in t.param_outcomes.items():
            d[p] = s[a] * s[b]
        return d

    def start_values(self):
        """OLS per outcome for the coefficients; each outcome's residual variance split
        equally over its variance components; every covariance across outcomes the
        correlation of the OLS residuals of the units with both outcomes times its two
        variances' geometric mean (the optimiser starts nearer: fewer iterations)."""
        t = self.table
        prep = self.prep
        psi = np.zeros(t.nparams)
        e = np.zeros(prep.nobs)
        for o, (rows, cols, b, v) in enumerate(self._ols_out):
            psi[t.beta_param[cols]] = b
            e[rows] = prep.y[rows] - self._Xc[rows, :len(cols)] @ b
        nlev = 1 + len({p.level for p in t.params if p.kind == "var"})
        # residual correlations between outcomes, on the units with both observed
        unit = self._spup[prep.slot].astype(np.int64) + (np.repeat(
            np.arange(prep.nrows, dtype=np.int64), np.diff(prep.row_ptr)) * (int(self._spup.max()) + 1))
        ocell = self._sout[prep.slot]
        corr = np.zeros((self.nout, self.nout))
        for a in range(self.nout):
            for b in range(a + 1, self.nout):
                ia, ib = np.flatnonzero(ocell == a), np.flatnonzero(ocell == b)
                common, pa, pb = np.intersect1d(unit[ia], unit[ib], return_indices=True)
                if len(common) > 2:
                    ea, eb = e[ia[pa]], e[ib[pb]]
                    den = np.sqrt((ea @ ea) * (eb @ eb))
                    corr[a, b] = corr[b, a] = float(ea @ eb) / den if den > 0 else 0.0
        for p, (a, b) in t.param_outcomes.items():
            va = (self._ols_out[a][3] or 1.0) / nlev
            vb = (self._ols_out[b][3] or 1.0) / nlev
            psi[p] = va if a == b else 0.9 * corr[a, b] * np.sqrt(va * vb)
        return psi

    def ols_loglik(self) -> float:
        """Sum over the outcomes of each one's least-squares log-likelihood (the
        separate linear regressions)."""
        tot = 0.0
        for cols, b, v, n in self._ols_fit:
            tot += -0.5 * n * (np.log(2 * np.pi) + np.log(v) + 1.0)
        return tot

    # ---- matrices -------------------------------------------------------------
    def matrices(self, psi):
        t = self.table
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        Phi = np.zeros((self.M, self.M))
        if len(t.phi_param):
            Phi[t.phi_row, t.phi_col] = psi[t.phi_param]
        R = np.zeros((self.nout, self.nout))
        R[t.theta_row, t.theta_col] = psi[t.theta_param]
        return beta, Phi, R

    def factor(self, Phi):
        # the residual block (no latents) is not part of Phi's factor
        groups = [b for b in self.table.chol_blocks if b.groups]
        saved = self.table.chol_blocks
        try:
            self.table.chol_blocks = groups
            return super().factor(Phi)
        finally:
            self.table.chol_blocks = saved

    def theta_dense(self, R):
        return _oracle.block_theta(R, self._sout, self._spup)

    # ---- the objective ----------------------------------------------------------
    def _evaluate(self, psi, need_grad, hess=False):
        self.nevals += 1
        fail = None if hess else (None, None)
        prep = self.prep
        beta, Phi, R = self.matrices(psi)
        sub = subset_inverses(R)
        if sub is None:
            return fail
        if self.backend == "numpy":
            resid = prep.y - prep.X @ beta if self.q else prep.y.copy()
            ll, gphi, gR, w = _oracle.loglik_blocks(prep.row_ptr, prep.slot, resid, prep.load,
                                                    prep.slot_lat, Phi, R, self._sout,
                                                    self._spup, prep.wrow, need_grad)
            if ll is None:
                return fail
            if not need_grad:
                return ll, None
            xtw = prep.X.T @ w if self.q else None
            if hess:
                H4 = _oracle.phi_hessian(prep.row_ptr, prep.slot, resid, prep.load, prep.slot_lat,
                                         Phi, self.theta_dense(R), prep.wrow)
                if H4 is None:
                    return fail
                hblock = self._contract_phi_hessian(H4)
        else:
            F = self.factor(Phi)
            if F is None:
                return fail
            rinv, rlogdet = sub
            self._ll[:] = 0.0
            self._status[:] = 0
            if need_grad:
                self._gphi[:] = 0.0
                self._gth[:] = 0.0
            nh = len(self.hess_params)
            hphi = np.zeros((self._nt, nh * nh)) if hess else None
            _core.mfactor_loglik(prep.pat_ptr, prep.row_ptr, self._slot, self._resid, self._load,
                                 self._slot_lat, F, self.blk_start, self.blk_end, self._spup,
                                 self._sout, self.nout, rinv, rlogdet, prep.wrow, self._w,
                                 self._ll, self._gphi, self._gth, self._status, self._maxn,
                                 self._maxm, self._maxc, self._nt, int(need_grad), y=prep.y,
                                 X=self._Xc, beta=np.ascontiguousarray(beta[self._xorder], dtype=float),
                                 gbeta_t=self._gbeta, unit_load=self._unit_load, xoff=self._xoff,
                                 hidx=self._hidx if hess else None, hphi_t=hphi,
                                 validate=not self._layout_ok)
            self._layout_ok = True
            if self._status.any():
                return fail
            ll = float(self._ll.sum())
            if not need_grad:
                return ll, None
            gphi = self._gphi.sum(axis=0).reshape(self.M, self.M)
            gR = self._gth.sum(axis=0).reshape(self.nout, self.nout)
            xtw = None
            if self.q:
                xtw = np.zeros(self.q)
                xtw[self._xorder] = self._gbeta[:, :self.q].sum(axis=0)
            if hess:
                hblock = hphi.sum(axis=0).reshape(nh, nh)
        g = chain_rule(self.table, psi, gphi, gR, xtw)
        if hess:
            return ll, g, 0.5 * (hblock + hblock.T)
        return ll, g
