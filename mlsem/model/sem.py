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

Parameter table (mlsem.spec.semtable; the wide data: mlsem.data.wide): one
:class:`Entry` per matrix entry a statement (or a lavaan
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

import numpy as np

from . import _oracle
from ..data.wide import SemData
from ..spec.semtable import MATRICES, SemTable, _shape
from .multilevel import default_threads, resolve_backend

try:
    from . import _core
except ImportError:  # pragma: no cover
    _core = None


# the start's mean design is built dense up to this many cells (observations x
# (full parameters + covariate paths)), else sparse
DENSE_START_CELLS = 2_000_000


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
        # tau = psi / pscale: every parameter is "plain" (mlsem.estimate.optimize's bound handling)
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
        gy_r, gy_c, gy_f, gy_v = [], [], [], []
        for e in table.entries:
            if e.matrix == "gy" and (e.full >= 0 or e.value != 0.0):
                gy_r.append(e.i), gy_c.append(e.j), gy_f.append(e.full), gy_v.append(e.value)
        self._gy_f = np.asarray(gy_f, dtype=np.int64)
        self._gy_v = np.asarray(gy_v, dtype=float)
        self._gy_free = self._gy_f >= 0
        ne = len(gy_r)
        # Gamma_y per observation, padded: the entries of the observation's slot
        # (self._gy_ent, nobs x the most entries of one slot) and the covariate
        # values they multiply (self._gy_val, 0 where padded):
        # mu_obs += sum_e val * gamma[ent] (NumPy only: scipy.sparse's
        # constructors and first calls cost ~3 ms of a 40 ms fit)
        if ne:
            per = np.bincount(np.asarray(gy_r, dtype=np.int64), minlength=P)
            emax = int(per.max())
            slot_ent = np.zeros((P, emax), dtype=np.int64)
            slot_col = np.zeros((P, emax), dtype=np.int64)
            slot_on = np.zeros((P, emax), dtype=bool)
            fill = np.zeros(P, dtype=np.int64)
            for k, (r, c) in enumerate(zip(gy_r, gy_c)):
                slot_ent[r, fill[r]], slot_col[r, fill[r]], slot_on[r, fill[r]] = k, c, True
                fill[r] += 1
            self._gy_ent = np.ascontiguousarray(slot_ent[d.slot])
            on = slot_on[d.slot]
            self._gy_val = np.where(on, d.X[d.obs_row[:, None], slot_col[d.slot]], 0.0) if d.X.shape[1] else \
                np.zeros(on.shape)
            self._has_gy = True
        else:
            self._gy_ent = self._gy_val = None
            self._has_gy = False
        self._ne = ne
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
        # each slot's count, mean and variance, in one pass (bincount) instead of
        # two boolean masks per slot
        cnt = np.bincount(d.slot, minlength=P)
        n1 = np.maximum(cnt, 1)
        smean = np.bincount(d.slot, weights=d.y, minlength=P) / n1
        dev = d.y - smean[d.slot]
        svar = np.bincount(d.slot, weights=dev * dev, minlength=P) / n1
        self._slot_stats = (cnt, smean, svar)
        sv = np.where(cnt > 1, svar, 1.0)
        sv[~(sv > 0)] = 1.0
        self.pscale = self._units(np.sqrt(sv))
        ents = [e for e in table.entries if e.full >= 0]
        if ents:
            ent_full = np.array([e.full for e in ents])
            ent_thdiag = np.array([e.matrix == "theta" and e.i == e.j for e in ents])
            ent_i = np.array([e.i for e in ents])
            on = table.T[ent_full] != 0                  # (entries, params)
            for c, prm in enumerate(table.params):
                if prm.lower != 0.0:
                    continue
                hit = on[:, c]
                if hit.any() and ent_thdiag[hit].all():
                    prm.lower = 1e-6 * float(sv[ent_i[hit]].min())

    def _units(self, sd_slot) -> np.ndarray:
        """Each free parameter's unit from the observed variables' sds: a loading
        sd(y) / sd(latent), a (co)variance the product of the two sds, an intercept
        sd(y), a regression sd(lhs) / sd(rhs); a latent's sd is its marker indicator's
        over the marker's fixed loading (1 where the latent's variance is fixed, as
        with std.lv).  The optimiser works on psi / unit (``psi_to_tau``), so that it
        sees the same problem in any units: with two indicators in units 1e5 times
        smaller, L-BFGS-B on psi itself stopped at its start (|gradient| 4e11)."""
        t, d = self.table, self.prep
        P, M = self.P, self.M
        X = np.asarray(d.X, dtype=float)
        sdx = np.std(X, axis=0) if X.ndim == 2 and X.shape[1] else np.ones(0)
        sdx = np.where((sdx > 0) & np.isfinite(sdx), sdx, 1.0)
        lat = np.full(M, np.nan)
        fixed = [e for e in t.entries if e.full < 0 and e.value != 0.0 and e.matrix in ("lambda", "beta")]
        for _ in range(M + 1):          # markers, then higher-order factors on markers
            before = np.isnan(lat).sum()
            for e in fixed:
                if e.matrix == "lambda" and np.isnan(lat[e.j]):
                    lat[e.j] = sd_slot[e.i] / abs(e.value)
                elif e.matrix == "beta" and e.op == "=~" and np.isnan(lat[e.j]) and not np.isnan(lat[e.i]):
                    lat[e.j] = lat[e.i] / abs(e.value)
            if np.isnan(lat).sum() == before:
                break                   # a fixed point: further passes change nothing
        lat[~(np.isfinite(lat) & (lat > 0))] = 1.0

        def unit(e):
            m = e.matrix
            if m == "lambda":
                return sd_slot[e.i] / lat[e.j]
            if m == "theta":
                return sd_slot[e.i] * sd_slot[e.j]
            if m == "nu":
                return sd_slot[e.i]
            if m == "psi":
                return lat[e.i] * lat[e.j]
            if m == "alpha":
                return lat[e.i]
            if m == "beta":
                return lat[e.i] / lat[e.j]
            if m == "gy":
                return sd_slot[e.i] / sdx[e.j]
            if m == "geta":
                return lat[e.i] / sdx[e.j]
            return 1.0
        full_unit = np.full(len(t.full_names), np.nan)
        for e in t.entries:
            if e.full >= 0 and np.isnan(full_unit[e.full]):
                full_unit[e.full] = unit(e)
        self._full_unit = full_unit
        units = np.ones(t.nparams)
        for c in range(t.nparams):
            col = t.T[:, c]
            nz = np.flatnonzero((col != 0) & np.isfinite(full_unit))
            if len(nz):
                u = full_unit[nz[0]] / abs(col[nz[0]])
                units[c] = u if np.isfinite(u) and u > 0 else 1.0
        return units

    # ---- tau = psi / pscale (each parameter in its unit) ---------------------------
    def tau_to_psi(self, tau):
        return np.asarray(tau, dtype=float) * self.pscale

    def psi_to_tau(self, psi):
        return np.asarray(psi, dtype=float) / self.pscale

    def grad_tau(self, tau, g):
        return g * self.pscale

    def tau_bounds(self):
        return [(p.lower / u if np.isfinite(p.lower) else None, None)
                for p, u in zip(self.table.params, self.pscale)]

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
        cnt, smean, svar = self._slot_stats
        mean = np.where(cnt > 0, smean, 0.0)
        var = np.where((cnt > 1) & (svar > 0), svar, 1.0)
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
                # 1 in the ratio of the indicator's sd to the latent's (lavaan's 1 when
                # the variables share their units; a loading of 1 on an indicator in
                # units 1e5 times smaller would start 1e5 units from the estimate)
                u = self._full_unit[e.full]
                v = float(u) if np.isfinite(u) and u > 0 else 1.0
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
        if not self._has_gy and not len(f_nu):
            return
        nfull = len(t.full_names)
        ne = self._ne
        mean_full = np.zeros(nfull, dtype=bool)
        mean_full[np.unique(np.concatenate([f_nu, self._gy_f[self._gy_free]]))] = True
        if given[mean_full].any() or self._mean_lat:
            return
        # free parameters that only move mean entries
        cols = np.flatnonzero(np.any(t.T[mean_full] != 0, axis=0) & ~np.any(t.T[~mean_full] != 0, axis=0))
        if not len(cols):
            return
        # the mean design D (observations x full parameters): dense where small
        # (scipy.sparse's constructors cost ~1 ms on the wide ``unbalanced``)
        dense = d.nobs * (nfull + ne) <= DENSE_START_CELLS
        parts = []
        if len(f_nu):
            col = np.full(self.P, -1)
            col[r_nu] = f_nu
            ok = col[d.slot] >= 0
            if dense:
                Dn = np.zeros((d.nobs, nfull))
                Dn[np.flatnonzero(ok), col[d.slot][ok]] = 1.0
                parts.append(Dn)
            else:
                from scipy import sparse
                parts.append(sparse.csr_matrix((np.ones(ok.sum()), (np.flatnonzero(ok), col[d.slot][ok])),
                                               shape=(d.nobs, nfull)))
        off = np.zeros(d.nobs)
        base_nu = self.base["nu"][d.slot]
        off += base_nu
        if self._has_gy:
            ent, val = self._gy_ent, self._gy_val
            off += np.einsum("oe,oe->o", val, np.where(self._gy_free, 0.0, self._gy_v)[ent])
            fr = self._gy_free[ent]                     # (nobs, emax): a free entry
            o_i, e_i = np.nonzero(fr)
            cols_f = self._gy_f[ent[o_i, e_i]]
            if dense:
                Dg = np.zeros((d.nobs, nfull))
                np.add.at(Dg, (o_i, cols_f), val[o_i, e_i])
                parts.append(Dg)
            else:
                from scipy import sparse
                parts.append(sparse.csr_matrix((val[o_i, e_i], (o_i, cols_f)), shape=(d.nobs, nfull)))
        D = sum(parts[1:], parts[0])
        if not dense:
            D = D.tocsc()
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
        if self._has_gy:
            gv = self._gy_v.copy()
            gv[self._gy_free] = full[self._gy_f[self._gy_free]]
            mu = mu + np.einsum("oe,oe->o", self._gy_val, gv[self._gy_ent])
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
        if self._has_gy and self._gy_free.any():
            gg = np.bincount(self._gy_ent.ravel(), weights=(self._gy_val * w[:, None]).ravel(),
                             minlength=self._ne)
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
