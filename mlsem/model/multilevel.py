"""Model layer: parameter table -> matrices, the kernel call, the chain rule.

``Model.evaluate(psi)`` is the whole objective: it fills beta, Phi (and its
factor F), Theta from the natural parameter vector psi (the reported
parameters: coefficients, variances, covariances), calls the kernel once and
maps dl/dPhi, dl/dTheta and dl/dmu back to psi through the index arrays of the
parameter table (built once).  The optimiser works on tau, where the
unstructured covariance blocks are replaced by their Cholesky factors;
``tau_to_psi`` and ``grad_tau`` are that change of variables.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from . import _oracle
from ..errors import MlsemError, PerformanceWarning

# OpenMP threads that spin-wait between the kernel's parallel regions starve
# each other (and everything else) on a busy machine: a 2k-row fit took 20x
# longer with 2 threads than with 1 under load.  Sleep instead of spinning,
# unless the user chose otherwise (read when libgomp loads, i.e. at the import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from . import _core
    CORE_IMPORT_ERROR = None
except ImportError as e:  # the extension is not built: the NumPy oracle is the fallback
    _core = None
    CORE_IMPORT_ERROR = f"{type(e).__name__}: {e}"

_warned_fallback = False


def _fallback_message() -> str:
    import mlsem
    where = os.path.dirname(os.path.abspath(mlsem.__file__))
    return (f"mlsem: the compiled kernel mlsem.model._core could not be imported ({CORE_IMPORT_ERROR}); "
            f"fitting with the NumPy oracle instead, about 100x slower. mlsem was imported from "
            f"{where}: if that is a source checkout, build the extension there "
            f"(pip install -e . or python setup.py build_ext --inplace) or start Python outside "
            f"the source tree so that the installed package is found. Pass backend='numpy' to "
            f"choose the oracle on purpose and silence this warning.")


def resolve_backend(backend: str) -> str:
    """'auto' -> the compiled kernel when built, else the NumPy oracle, with a
    PerformanceWarning (once per process) saying why and what to do."""
    global _warned_fallback
    if backend == "auto":
        if _core is not None:
            return "cython"
        if not _warned_fallback:
            _warned_fallback = True
            import warnings
            warnings.warn(_fallback_message(), PerformanceWarning, stacklevel=3)
        return "numpy"
    if backend == "cython" and _core is None:
        raise MlsemError("backend='cython' but the compiled kernel mlsem.model._core could not be "
                         f"imported ({CORE_IMPORT_ERROR})")
    return backend


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    env = os.environ.get("MLSEM_NUM_THREADS")
    if env:
        n = int(env)
    return max(1, n)


SERIAL_BELOW = 50_000

_BLAS_CTL = []


def _blas_controller():
    """One threadpoolctl controller per process (finding the loaded BLAS
    libraries reads /proc: ~3 ms, once instead of per model); None without
    threadpoolctl."""
    if not _BLAS_CTL:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CTL.append(ThreadpoolController())
        except Exception:  # threadpoolctl is optional
            _BLAS_CTL.append(None)
    return _BLAS_CTL[0]


def psd_cholesky(S):
    """Lower Cholesky factor of a positive semi-definite S, a column 0 where
    its pivot is 0 up to rounding (lme4's theta of a singular fit)."""
    k = S.shape[0]
    L = np.zeros((k, k))
    tol = 1e-12 * max(np.max(np.abs(np.diag(S))), 1e-300)
    for j in range(k):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d <= tol:
            continue
        L[j, j] = np.sqrt(d)
        L[j + 1:, j] = (S[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    return L


def chain_rule(table, psi, gphi, gth, xtw=None) -> np.ndarray:
    """dl/dpsi from the kernel's dl/dPhi (M x M), dl/dTheta (P x P; a
    length-P vector when Theta is diagonal) and X'w (dl/dbeta), through the
    parameter table's index arrays."""
    npar = table.nparams
    g = np.zeros(npar)
    if xtw is not None and len(table.beta_param):
        np.add.at(g, table.beta_param, xtw)
    if len(table.phi_param):
        g += np.bincount(table.phi_param, weights=gphi[table.phi_row, table.phi_col], minlength=npar)
    if gth.ndim == 2:
        if table.theta_func is not None:
            g += table.theta_func.grad(psi, gth)
        else:
            g += np.bincount(table.theta_param, weights=gth[table.theta_row, table.theta_col],
                             minlength=npar)
    else:
        g += np.bincount(table.theta_param, weights=gth[table.theta_row], minlength=npar)
    return g


def ols_fit(prep):
    """(beta, mean squared residual) of the outcome's least-squares fit on the
    design, by the normal equations (O(n q^2), no n x q temporaries; the start
    values' and the units' scale); beta None without a design or if X'X is singular."""
    y = np.asarray(prep.y, dtype=float)
    X = prep.X
    if X.shape[1] == 0 or y.size == 0:
        return None, float(np.var(y)) if y.size else 1.0
    try:
        b = np.linalg.solve(X.T @ X, X.T @ y)
    except np.linalg.LinAlgError:
        return None, float(np.var(y))
    r = y - X @ b
    return b, float(r @ r) / y.size


def param_scales(table, prep, unit_load=False, ols=None) -> np.ndarray:
    """The unit of each parameter, from the data: s the root mean square
    residual of the outcome's least-squares fit on the design (the outcome's sd
    without a design), a design column's sd (its root mean square if constant), a
    latent's root mean square loading.  A coefficient's unit is s / sd(x), a
    (co)variance of latents a, b s^2 / (rms_a rms_b), a residual variance s^2,
    a correlation 1.  Multiplying y or a covariate by c multiplies the matching
    units by the same powers of c as the estimates, so that the optimiser, which
    works on psi / pscale (``Model.psi_to_tau``), sees the same problem in any
    units (issue 12)."""
    d = np.ones(table.nparams)
    y = np.asarray(prep.y, dtype=float)
    if y.size == 0:
        return d
    X = prep.X
    _, s2 = ols if ols is not None else ols_fit(prep)
    s = float(np.sqrt(s2)) if s2 > 0 else 0.0
    if not (s > 0 and np.isfinite(s)):
        s = float(np.std(y))
    if not (s > 0 and np.isfinite(s)):
        s = float(np.sqrt(np.mean(y * y))) or 1.0
    if not np.isfinite(s) or s <= 0:
        s = 1.0
    for c, prm in enumerate(np.asarray(table.beta_param)):
        col = X[:, c]
        if bool(np.all(col == 1.0)):     # the intercept: np.std 0, root mean square 1
            d[prm] = s
            continue
        sx = float(np.std(col))
        if not (sx > 0):
            sx = float(np.sqrt(np.mean(col * col)))
        d[prm] = s / sx if sx > 0 and np.isfinite(sx) else s
    if len(table.phi_param) and unit_load:       # every loading 1 (random intercepts)
        for p, a, b in zip(table.phi_param, table.phi_row, table.phi_col):
            d[p] = s * s
    elif len(table.phi_param):
        lat = np.asarray(prep.slot_lat)[np.asarray(prep.slot)]       # (nobs, nl)
        ok = lat >= 0
        M = max(table.nlatent, 1)
        load = np.asarray(prep.load, dtype=float)
        ss = np.bincount(lat[ok], weights=(load[ok] ** 2), minlength=M)
        cnt = np.bincount(lat[ok], minlength=M)
        rms = np.ones(M)
        has = (cnt > 0) & (ss > 0)
        rms[has] = np.sqrt(ss[has] / cnt[has])
        seen = set()
        for p, a, b in zip(table.phi_param, table.phi_row, table.phi_col):
            if p in seen:
                continue
            seen.add(p)
            d[p] = s * s / (rms[a] * rms[b])
    kinds = [prm.kind for prm in table.params]
    for p in set(np.asarray(table.theta_param).tolist()):
        if kinds[p] != "corr":
            d[p] = s * s
    return d


class Model:
    def __init__(self, prep, table, backend: str = "auto", nthreads: int | None = None,
                 units=None):
        # units: (ols, pscale) taken from another model of the same data (the
        # grouped data of mlsem.model.reduced), instead of computed here
        self.prep = prep
        self.table = table
        self.backend = resolve_backend(backend)
        # below SERIAL_BELOW observations an evaluation takes well under a
        # millisecond: waking a second thread for it costs more than it saves
        self.nthreads = nthreads or (1 if prep.nobs < SERIAL_BELOW else default_threads())
        self.M = max(table.nlatent, 1)
        self.P = table.nslots
        self.q = prep.X.shape[1]
        self.dense = not table.theta_diagonal
        # block structure of F: latents of one Cholesky group form a block
        self.blk_start = np.arange(self.M, dtype=np.int32)
        self.blk_end = np.arange(1, self.M + 1, dtype=np.int32)
        in_block = np.zeros(self.M, dtype=bool)
        for blk in table.chol_blocks:
            for grp in blk.groups:
                lo, hi = min(grp), max(grp) + 1
                if hi - lo != len(grp):
                    raise MlsemError("internal: a covariance block's latents are not contiguous")
                self.blk_start[lo:hi] = lo
                self.blk_end[lo:hi] = hi
                in_block[grp] = True
        diag_ent = (table.phi_row == table.phi_col) & ~in_block[table.phi_row]
        self._diag_lat = table.phi_row[diag_ent]
        self._offdiag_outside = np.any((table.phi_row != table.phi_col)
                                       & ~(in_block[table.phi_row] & in_block[table.phi_col]))
        if self._offdiag_outside:
            raise MlsemError("internal: covariances outside a declared block")
        self._tau_layout(table)
        self._hess_layout(table)
        # scratch, caller-allocated kernel outputs (reused every evaluation)
        nt = self.nthreads if (_core is not None and _core.HAVE_OPENMP) else 1
        self._nt = nt
        self._w = np.zeros(prep.nobs)
        self._ll = np.zeros(nt)
        self._gphi = np.zeros((nt, self.M * self.M))
        self._gth = np.zeros((nt, self.P * self.P if self.dense else self.P))
        self._status = np.zeros(nt, dtype=np.int32)
        self._slot = np.ascontiguousarray(prep.slot, dtype=np.int32)
        self._slot_lat = np.ascontiguousarray(prep.slot_lat, dtype=np.int32)
        self._load = np.ascontiguousarray(prep.load, dtype=np.float64)
        # random intercepts only: the kernel's row loops need not read the loadings
        # (every loading 1 settles it without gathering slot_lat per observation)
        # (a data layout may say so itself: mlsem.data.multivariate's loadings are all 1)
        self._unit_load = bool(getattr(prep, "unit_load", False)) or bool(
            np.all(self._load == 1.0)) or bool(
            np.all((self._load == 1.0) | (prep.slot_lat[prep.slot] < 0)))
        if units is None:
            self.ols = ols_fit(prep)
            self.pscale = param_scales(table, prep, self._unit_load, self.ols)
        else:
            self.ols, self.pscale = units
        self._X = np.ascontiguousarray(prep.X, dtype=np.float64)
        self._resid = np.empty(prep.nobs)
        self._xtw = np.zeros((max(nt, 1) * 4, self.q))
        self._gbeta = np.zeros((nt, max(self.q, 8)))   # rows a cache line apart
        nl = prep.slot_lat.shape[1]
        self._maxn = int(prep.max_row_obs)
        self._maxm = int(min(self.M, self._maxn * nl))
        self._maxc = int(self.M)
        self.nevals = 0
        # the kernel checks the arrays' shapes and the CSR layout (one pass over the
        # observations) on the first call only: they do not change between calls
        self._layout_ok = False
        self._xtw_status = np.zeros(self._xtw.shape[0], dtype=np.int32)
        # an evaluation is parallel over patterns (OpenMP); a multithreaded BLAS
        # inside it (LAPACK per pattern on the dense path, X @ beta) only
        # oversubscribes the cores: 0.9 s instead of 3 ms per dense evaluation,
        # 44 ms instead of 18 ms with 11 design columns on medium (2 busy
        # cores).  Pin BLAS to one thread for the evaluation.
        self._blas_ctl = _blas_controller() if self.backend == "cython" else None

    def __getstate__(self):
        # a threadpoolctl controller holds ctypes handles and cannot be pickled:
        # without this a Dask worker that retires cannot hand its partition
        # (a Model) to another worker, and client.retire_workers waits forever
        d = dict(self.__dict__)
        d["_blas_ctl"] = getattr(self, "_blas_ctl", None) is not None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._blas_ctl = _blas_controller() if d.get("_blas_ctl") else None

    def _one_blas_thread(self):
        if self._blas_ctl is None:
            return contextlib.nullcontext()
        return self._blas_ctl.limit(limits=1, user_api="blas")

    def _tau_layout(self, table):
        """tau: the plain parameters, then the Cholesky factor of each
        unstructured block (natural blocks keep their own parameters)."""
        blocked = np.zeros(table.nparams, dtype=bool)
        self._chol = [blk for blk in table.chol_blocks if not getattr(blk, "natural", False)]
        for blk in self._chol:
            blocked[np.unique(blk.pidx)] = True
        self.free_plain = np.flatnonzero(~blocked)
        self.ntau = len(self.free_plain) + sum(
            blk.pidx.shape[0] * (blk.pidx.shape[0] + 1) // 2 for blk in self._chol)

    def _hess_layout(self, table):
        """The parameters whose second derivatives the kernel gives directly:
        those that enter Phi only, and linearly (every variance and covariance of
        the random effects; not beta, not Theta).  ``hess_params`` lists them;
        ``_hidx[a * M + b]`` is the position in that list of Phi entry (a, b)'s
        parameter, -1 for none.  Only on the factor path (diagonal Theta)."""
        other = set(np.asarray(table.beta_param).tolist()) | set(np.asarray(table.theta_param).tolist())
        lin = sorted(set(np.asarray(table.phi_param).tolist()) - other)
        self.hess_params = np.array(lin if not self.dense else [], dtype=np.int64)
        pos = np.full(table.nparams, -1, dtype=np.int64)
        pos[self.hess_params] = np.arange(len(self.hess_params))
        hidx = np.full((self.M, self.M), -1, dtype=np.int32)
        if len(table.phi_param):
            hidx[table.phi_row, table.phi_col] = pos[table.phi_param]
        self._hidx = hidx.ravel()

    # ---- parameter maps ---------------------------------------------------
    def matrices(self, psi):
        t = self.table
        beta = psi[t.beta_param] if self.q else np.zeros(0)
        Phi = np.zeros((self.M, self.M))
        if len(t.phi_param):
            Phi[t.phi_row, t.phi_col] = psi[t.phi_param]
        if self.dense:
            Theta = np.zeros((self.P, self.P))
            Theta[t.theta_row, t.theta_col] = psi[t.theta_param]
            if t.theta_func is not None:
                Theta = t.theta_func.theta(psi, Theta)
        else:
            Theta = np.zeros(self.P)
            Theta[t.theta_row] = psi[t.theta_param]
        return beta, Phi, Theta

    def factor(self, Phi):
        """Any F with F F' = Phi, nonzero only inside the blocks; None if Phi is
        not positive semi-definite.  A block's F is its lower Cholesky factor
        where that exists: a pattern touching the block's first m latents then
        uses only F's first m columns (the kernel's c x c matrix K is m x m, not
        b x b: on the nested designs, where a county's schools fill the first
        slots, a third of the work).  A singular block falls back to Q sqrt(L)
        from its eigen-decomposition."""
        F = np.zeros_like(Phi)
        d = Phi[self._diag_lat, self._diag_lat]
        if np.any(d < 0):
            return None
        F[self._diag_lat, self._diag_lat] = np.sqrt(d)
        for blk in self.table.chol_blocks:
            g0 = np.asarray(blk.groups[0])
            S = Phi[np.ix_(g0, g0)]
            try:
                Fb = np.linalg.cholesky(S)
                if not np.all(np.isfinite(Fb)):
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:
                lam, Q = np.linalg.eigh(S)
                if lam.min() < -1e-10 * max(1.0, abs(lam).max()):
                    return None
                Fb = Q * np.sqrt(np.clip(lam, 0.0, None))
            G = np.asarray(blk.groups)
            F[G[:, :, None], G[:, None, :]] = Fb[None, :, :]
        return F

    def _scale(self):
        """Each parameter's unit (``pscale``; ones where the model has none)."""
        d = getattr(self, "pscale", None)
        return np.ones(self.table.nparams) if d is None else d

    def tau_to_psi(self, tau):
        """tau is dimensionless: a plain parameter is psi / pscale; a block's
        entries are the Cholesky factor of the block divided by the square
        roots of its variances' units (the optimiser then sees the same problem
        whatever the units of y, the covariates and the loadings)."""
        d = self._scale()
        psi = np.zeros(self.table.nparams)
        n0 = len(self.free_plain)
        psi[self.free_plain] = tau[:n0] * d[self.free_plain]
        pos = n0
        for blk in self._chol:
            b = blk.pidx.shape[0]
            L = np.zeros((b, b))
            L[np.tril_indices(b)] = tau[pos: pos + b * (b + 1) // 2]
            pos += b * (b + 1) // 2
            sq = np.sqrt(d[np.diag(blk.pidx)])
            psi[blk.pidx] = (L @ L.T) * np.outer(sq, sq)
        return psi

    def psi_to_tau(self, psi, psd=False):
        """The optimiser's variables at psi.  A block that is only positive
        semi-definite gets a jittered Cholesky factor, or with ``psd=True`` its
        exact factor with a zero column where a pivot is 0 (lme4's theta of a
        singular fit; the small-sample df need it)."""
        d = self._scale()
        tau = np.zeros(self.ntau)
        n0 = len(self.free_plain)
        tau[:n0] = psi[self.free_plain] / d[self.free_plain]
        pos = n0
        for blk in self._chol:
            b = blk.pidx.shape[0]
            sq = np.sqrt(d[np.diag(blk.pidx)])
            S = psi[blk.pidx] / np.outer(sq, sq)
            if psd:
                L = psd_cholesky(S)
            else:
                try:
                    L = np.linalg.cholesky(S)
                except np.linalg.LinAlgError:
                    try:
                        L = np.linalg.cholesky(S + 1e-8 * np.eye(b) * max(1.0, np.trace(S)))
                    except np.linalg.LinAlgError:    # indefinite beyond rounding (a
                        L = psd_cholesky(S)          # polish step): its PSD pivots
            tau[pos: pos + b * (b + 1) // 2] = L[np.tril_indices(b)]
            pos += b * (b + 1) // 2
        return tau

    def grad_tau(self, tau, gpsi):
        d = self._scale()
        g = np.zeros(self.ntau)
        n0 = len(self.free_plain)
        g[:n0] = gpsi[self.free_plain] * d[self.free_plain]
        pos = n0
        for blk in self._chol:
            b = blk.pidx.shape[0]
            L = np.zeros((b, b))
            idx = np.tril_indices(b)
            L[idx] = tau[pos: pos + b * (b + 1) // 2]
            sq = np.sqrt(d[np.diag(blk.pidx)])
            G = gpsi[blk.pidx] / 2.0
            G[np.diag_indices(b)] *= 2.0
            dL = 2.0 * (G * np.outer(sq, sq)) @ L
            g[pos: pos + b * (b + 1) // 2] = dL[idx]
            pos += b * (b + 1) // 2
        return g

    def tau_bounds(self):
        params = self.table.params
        d = self._scale()
        bounds = [(p.lower / d[i] if np.isfinite(p.lower) else None, None)
                  for i, p in ((i, params[i]) for i in self.free_plain)]
        for blk in self._chol:
            b = blk.pidx.shape[0]
            for i, j in zip(*np.tril_indices(b)):
                bounds.append((0.0, None) if i == j else (None, None))
        return bounds

    # ---- the objective ----------------------------------------------------
    def evaluate(self, psi, need_grad: bool = True):
        """(log-likelihood, dl/dpsi); (None, None) where Sigma is not positive definite."""
        with self._one_blas_thread():
            return self._evaluate(psi, need_grad)

    def phi_hessian(self, psi):
        """(ll, dl/dpsi, d2l/dpsi_k dpsi_l) at psi in one pass, the last for the
        parameters ``hess_params`` only (those linear in Phi); None when there
        are none (or Sigma is not positive definite there)."""
        if not len(self.hess_params):
            return None
        with self._one_blas_thread():
            return self._evaluate(psi, True, hess=True)

    def _evaluate(self, psi, need_grad, hess=False):
        self.nevals += 1
        fail = None if hess else (None, None)     # Sigma not positive definite at psi
        t = self.table
        prep = self.prep
        beta, Phi, Theta = self.matrices(psi)
        if self.backend == "numpy":
            resid = prep.y - prep.X @ beta if self.q else prep.y.copy()
        elif self.dense:
            # one parallel pass into a reused buffer (no temporaries per evaluation)
            _core.residuals(prep.y, self._X, np.ascontiguousarray(beta, dtype=float),
                            self._resid, self._nt)
            resid = self._resid
        else:
            resid = self._resid   # filled by the fused factor kernel
        if self.backend == "numpy":
            Th = Theta if self.dense else np.diag(Theta)
            ll, gphi, gth, w = _oracle.loglik(prep.row_ptr, prep.slot, resid, prep.load,
                                              prep.slot_lat, Phi, Th, prep.wrow, need_grad)
            if ll is None:
                return fail
            if hess:
                H4 = _oracle.phi_hessian(prep.row_ptr, prep.slot, resid, prep.load,
                                         prep.slot_lat, Phi, Th, prep.wrow)
                if H4 is None:
                    return fail
                hblock = self._contract_phi_hessian(H4)
            gphi = gphi.ravel()
            gth = gth.ravel() if self.dense else np.diag(gth).copy()
        else:
            self._ll[:] = 0.0
            self._status[:] = 0
            if need_grad:
                self._gphi[:] = 0.0
                self._gth[:] = 0.0
            if self.dense:
                _core.dense_loglik(prep.pat_ptr, prep.row_ptr, self._slot, resid, self._load,
                                   self._slot_lat, Phi, Theta, prep.wrow, self._w, self._ll,
                                   self._gphi, self._gth, self._status, self._maxn, self._nt,
                                   int(need_grad), validate=not self._layout_ok)
                self._layout_ok = True
            else:
                if np.any(Theta <= 0):
                    return fail
                F = self.factor(Phi)
                if F is None:
                    return fail
                nh = len(self.hess_params)
                hphi = np.zeros((self._nt, nh * nh)) if hess else None
                # fused: y - X beta and X'w computed per pattern inside the kernel
                _core.factor_loglik(prep.pat_ptr, prep.row_ptr, self._slot, resid, self._load,
                                    self._slot_lat, F, self.blk_start, self.blk_end, Theta,
                                    prep.wrow, self._w, self._ll, self._gphi, self._gth,
                                    self._status, self._maxn, self._maxm, self._maxc, self._nt,
                                    int(need_grad), y=prep.y, X=self._X,
                                    beta=np.ascontiguousarray(beta, dtype=float),
                                    gbeta_t=self._gbeta,
                                    hidx=self._hidx if hess else None, hphi_t=hphi,
                                    unit_load=self._unit_load, validate=not self._layout_ok)
                self._layout_ok = True
                if hess:
                    hblock = hphi.sum(axis=0).reshape(nh, nh)
            if self._status.any():
                return fail
            ll = float(self._ll.sum())
            if not need_grad:
                return ll, None
            gphi = self._gphi.sum(axis=0)
            gth = self._gth.sum(axis=0)
            w = self._w
            if self.q and self.dense:
                _core.xt_w(self._X, w, self._xtw, self._nt, self._xtw_status)
                xtw = self._xtw.sum(axis=0)
            elif self.q:
                xtw = self._gbeta[:, :self.q].sum(axis=0)
        if not need_grad:
            return ll, None
        if self.q:
            xtw = prep.X.T @ w if self.backend == "numpy" else xtw
        gth = gth.reshape(self.P, self.P) if self.dense else gth
        g = chain_rule(t, psi, gphi.reshape(self.M, self.M), gth, xtw if self.q else None)
        if hess:
            return ll, g, 0.5 * (hblock + hblock.T)
        return ll, g

    def _contract_phi_hessian(self, H4):
        """Sum the oracle's (M, M, M, M) d2l/dPhi2 over each parameter's entries."""
        nh = len(self.hess_params)
        k = self._hidx
        e = np.flatnonzero(k >= 0)
        H2 = H4.reshape(self.M * self.M, self.M * self.M)[np.ix_(e, e)]
        out = np.zeros((nh, nh))
        np.add.at(out, (k[e][:, None], k[e][None, :]), H2)
        return out

    def residuals(self, psi):
        beta = psi[self.table.beta_param] if self.q else np.zeros(0)
        return self.prep.y - self.prep.X @ beta if self.q else self.prep.y.copy()
