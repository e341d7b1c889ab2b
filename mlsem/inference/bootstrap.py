"""Parametric bootstrap (results layer): simulate from the fitted model,
refit, collect.

* ``bootstrap(res, n, seed, parallel)``: n outcome vectors drawn from the
  fitted model (y* = X beta + Lambda u* + e*, u* ~ N(0, Phi), e* ~ N(0,
  Theta) per top-level unit, the covariates and the design as observed), each
  refitted by the fit's own method (ML or REML), warm-started at the
  estimates.  Replicate i uses the i-th child of ``numpy.random.SeedSequence(seed)``,
  so the draws do not depend on ``parallel`` (worker processes, fork only).
  A refit that fails or does not converge is kept as a row with
  ``converged = False``, counted in ``Bootstrap.failed`` and reported; the
  intervals and standard errors use the converged refits and say how many
  were left out.
* ``percentile_ci``: percentile intervals of the draws; ``Bootstrap.std_err``
  their standard deviations.
* ``lr_bootstrap(restricted, relaxed, n, seed)``: the parametric bootstrap
  LR test (as pbkrtest's PBmodcomp): data simulated from the restricted fit,
  both models refitted, p = (1 + #{LR* >= LR}) / (1 + n_ok).  The reference
  distribution of a variance tested at its boundary (0), where chi2 is wrong.

Progress: tqdm (``tqdm.auto``: a bar in notebooks too) when installed, else
one self-overwriting line on stderr.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
import warnings

import numpy as np
import polars as pl

from ..errors import ConvergenceWarning, MlsemError


@dataclasses.dataclass
class Bootstrap:
    draws: pl.DataFrame          # replicate, converged, one column per parameter
    n: int
    seed: object
    failed: int
    seconds: float
    names: list
    errors: list = dataclasses.field(default_factory=list)   # the refits that raised, "Type: message"

    def ok(self) -> pl.DataFrame:
        return self.draws.filter(pl.col("converged"))

    @property
    def std_err(self) -> dict:
        d = self.ok()
        return {n: float(d[n].std()) for n in self.names}

    def note(self) -> str:
        s = f"parametric bootstrap: {self.n} refits in {self.seconds:.1f} s"
        if self.failed:
            s += (f"; {self.failed} failed or did not converge and are left out of the "
                  "intervals and standard errors")
        if self.errors:
            s += f" ({len(self.errors)} raised an error, e.g. {self.errors[0]})"
        return s


# ---- simulation and refits ------------------------------------------------------
def _check(res):
    m = res.model
    if res.sem_rows is not None or m is None or not hasattr(m, "tau_to_psi"):
        raise MlsemError("bootstrap: available for multilevel fits (mlsem.fit)")
    if getattr(m, "dense", False) or m.table.theta_func is not None:
        raise MlsemError("bootstrap: the model has a structured or correlated residual "
                         "covariance; the parametric bootstrap needs a diagonal one")
    if np.any(m.prep.wrow != 1.0):
        raise MlsemError("bootstrap: not with sampling weights (no model to simulate the "
                         "design from)")
    if res.method not in ("ML", "REML"):
        raise MlsemError(f"bootstrap: refits by ML or REML only, not {res.method}")
    if not res.converged:
        raise MlsemError("bootstrap: the fit did not converge")


def simulate_y(model, psi, rng) -> np.ndarray:
    """One outcome vector from the model at psi, in the model's observation order."""
    prep = model.prep
    beta, Phi, Theta = model.matrices(psi)
    F = model.factor(Phi)
    if F is None:
        raise MlsemError("bootstrap: the random effects' covariance is not positive semi-definite")
    n = prep.nrows
    rowid = np.repeat(np.arange(n), np.diff(prep.row_ptr))
    U = rng.standard_normal((n, model.M)) @ F.T
    y = prep.X @ beta if model.q else np.zeros(prep.nobs)
    for k in range(prep.slot_lat.shape[1]):
        lat = prep.slot_lat[prep.slot, k]
        ok = lat >= 0
        y[ok] += prep.load[ok, k] * U[rowid[ok], lat[ok]]
    y += np.sqrt(Theta[prep.slot]) * rng.standard_normal(prep.nobs)
    return y


def with_outcome(model, y):
    """The model on the same design with outcome y (shares every other array)."""
    m = copy.copy(model)
    m.prep = dataclasses.replace(model.prep, y=np.ascontiguousarray(y, dtype=float))
    m._blas_ctl = None      # the caller (_map) pins BLAS to one thread for all the refits
    return m


def refit(model, y, start, method):
    """(psi, loglik, converged) of the model refitted to y, warm-started at
    ``start``.  A refit that does not converge is retried before it is
    reported as failed: (REML) from the ML estimates, then (both) from
    ``start`` with its smallest variance at 0 (near-boundary replicates, where
    the optimiser stalls a hair inside the bound)."""
    m = with_outcome(model, y)
    from ..estimate.optimize import optimize
    from ..estimate.reml import optimize_reml

    def run(s0):
        if method == "REML":
            opt, _ = optimize_reml(m, start=s0)
        else:
            opt = optimize(m, start=s0)
        return opt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        best = run(start)
        if best.converged:
            return best.final, float(best.loglik), True
        starts = []
        if method == "REML":
            ml = optimize(m, start=start)
            if ml.converged:
                starts.append(ml.final)
        z = _smallest_variance_at_zero(m, start)
        if z is not None:
            starts.append(z)
        for s0 in starts:
            opt = run(s0)
            if opt.converged:
                return opt.final, float(opt.loglik), True
            if np.isfinite(opt.loglik) and not (opt.loglik <= best.loglik):
                best = opt
    return best.final, float(best.loglik), False


def _smallest_variance_at_zero(model, psi):
    """psi with its smallest random-effect variance (relative to its unit)
    at 0 and that variance's covariances at 0; None without one."""
    from ..estimate.optimize import param_scale
    t = model.table
    unit = param_scale(model)
    var = [i for i, p in enumerate(t.params) if p.kind == "var"]
    if not var:
        return None
    i = min(var, key=lambda k: psi[k] / unit[k])
    out = np.asarray(psi, dtype=float).copy()
    out[i] = 0.0
    for blk in t.chol_blocks:
        w = np.argwhere(blk.pidx == i)
        if len(w):
            r = int(w[0][0])
            for c in range(blk.pidx.shape[0]):
                if c != r and blk.pidx[r, c] >= 0:
                    out[blk.pidx[r, c]] = 0.0
    return out


# numerical failures of one refit (a singular matrix, overflow): counted, the run goes on
REFIT_ERRORS = (MlsemError, np.linalg.LinAlgError, ArithmeticError, ValueError)


# ---- running replicates -------------------------------------------------------------
class _Progress:
    def __init__(self, n, label, enabled):
        self.n, self.label, self.done = n, label, 0
        self.bar = None
        self.enabled = enabled
        self.last = 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=n, desc=label, file=sys.stderr)
        except Exception:      # tqdm is optional
            self.bar = None

    def update(self, k=1, failed=0):
        self.done += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.monotonic()
        if now - self.last > 0.5 or self.done == self.n:
            self.last = now
            print(f"\r{self.label}: {self.done}/{self.n} refits ({failed} failed)", end="",
                  file=sys.stderr, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)


_STATE = {}


def _run_chunk(idx):
    """Worker: replicates idx of the task in _STATE (set before the fork)."""
    task = _STATE["task"]
    return [task(i) for i in idx]


def _map(task, n, parallel, progress, label, model=None):
    """[task(i) for i in range(n)], serially or over forked worker processes."""
    if model is not None:
        with model._one_blas_thread():
            return _map(task, n, parallel, progress, label)
    prog = _Progress(n, label, progress)
    out = [None] * n
    failed = 0
    try:
        if parallel is None or parallel is False:
            nproc = 1
        elif parallel is True:
            nproc = os.cpu_count() or 1
        elif isinstance(parallel, (int, np.integer)) and parallel >= 1:
            nproc = int(parallel)
        else:           # parallel=0 included (0 == False, but not a number of processes)
            raise MlsemError(f"bootstrap: parallel={parallel!r} must be None, True, False or a "
                             "positive number of processes")
        if nproc > 1:
            import multiprocessing as mp
            try:
                ctx = mp.get_context("fork")
            except ValueError:
                ctx = None
            if ctx is None:
                warnings.warn("bootstrap: no fork start method on this platform; running serially",
                              stacklevel=3)
                nproc = 1
        if nproc == 1:
            for i in range(n):
                out[i] = task(i)
                failed += not out[i][2]
                prog.update(1, failed)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            _STATE["task"] = task
            chunk = max(1, min(50, n // (4 * nproc) or 1))
            parts = [list(range(a, min(n, a + chunk))) for a in range(0, n, chunk)]
            with ProcessPoolExecutor(nproc, mp_context=ctx) as ex:
                futs = {ex.submit(_run_chunk, p): p for p in parts}
                for f in as_completed(futs):
                    for i, r in zip(futs[f], f.result()):
                        out[i] = r
                        failed += not r[2]
                    prog.update(len(futs[f]), failed)
    finally:
        _STATE.clear()
        prog.close()
    return out


def _seeds(seed, n):
    ss = np.random.SeedSequence(seed)
    return ss, ss.spawn(n)


def bootstrap(res, n=1000, seed=None, parallel=None, progress=True) -> Bootstrap:
    if getattr(res, "survey", None) is not None:
        raise MlsemError("bootstrap: the parametric bootstrap simulates from the model, not from "
                         "the sampling design; for a survey fit use the linearised standard errors, "
                         "or replicate weights by hand from res.scores() (docs/survey.md)")
    _check(res)
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise MlsemError(f"bootstrap: n={n!r} must be an integer of at least 2")
    model, psi = res.model, res.estimate.copy()
    ss, children = _seeds(seed, n)

    def task(i):
        rng = np.random.default_rng(children[i])
        try:
            y = simulate_y(model, psi, rng)
            est, ll, conv = refit(model, y, psi, res.method)
            return est, ll, conv
        except REFIT_ERRORS as e:
            return np.full(len(psi), np.nan), float("nan"), False, f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    out = _map(task, n, parallel, progress, "bootstrap", model)
    E = np.vstack([o[0] for o in out])
    conv = np.array([o[2] for o in out])
    errors = [o[3] for o in out if len(o) > 3]
    cols = {"replicate": np.arange(n), "converged": conv}
    for j, nm in enumerate(res.names):
        cols[nm] = E[:, j]
    draws = pl.DataFrame(cols)
    b = Bootstrap(draws=draws, n=n, seed=ss.entropy if seed is None else seed,
                  failed=int((~conv).sum()), seconds=time.perf_counter() - t0,
                  names=list(res.names), errors=errors)
    res.boot = b
    res.notes[:] = [x for x in res.notes if not x.startswith("parametric bootstrap:")]
    res.notes.append(b.note())
    return b


def percentile_ci(res, level=0.95, n=None, seed=None, parallel=None, progress=True) -> pl.DataFrame:
    """Percentile intervals of the bootstrap draws (running the bootstrap with
    n, seed when it has not run, or when n or seed differ)."""
    if not (0.0 < level < 1.0):
        raise MlsemError(f"confint: level={level!r} must be between 0 and 1")
    b = res.boot
    if b is None or (n is not None and n != b.n) or (seed is not None and seed != b.seed):
        if n is None:
            raise MlsemError("confint(method='bootstrap'): run res.bootstrap(n=..., seed=...) "
                             "first, or pass n= and seed=")
        b = bootstrap(res, n=n, seed=seed, parallel=parallel, progress=progress)
    ok = b.ok()
    if ok.height < 2:
        raise MlsemError(f"confint(method='bootstrap'): only {ok.height} of {b.n} refits converged")
    a = (1.0 - level) / 2.0
    rows = []
    for nm in b.names:
        v = ok[nm].to_numpy()
        rows.append((nm, float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))))
    return pl.DataFrame(rows, schema={"name": pl.String, "lower": pl.Float64, "upper": pl.Float64},
                        orient="row")


# ---- the bootstrap LR test -----------------------------------------------------------
def _order_map(src, dst):
    """Index array p with y_dst = y_src[p]: both models' observations matched
    by their original row numbers."""
    a, b = src.prep.obs_row, dst.prep.obs_row
    if len(a) != len(b) or not np.array_equal(np.sort(a), np.sort(b)):
        raise MlsemError("lrtest(bootstrap=): the two fits are not on the same observations")
    pos = np.empty(a.max() + 1, dtype=np.int64)
    pos[a] = np.arange(len(a))
    return pos[b]


def lr_bootstrap(restricted, relaxed, chi2, n, seed=None, parallel=None, progress=True) -> dict:
    for r in (restricted, relaxed):
        _check(r)
        if r.method != "ML":
            raise MlsemError("lrtest(bootstrap=): the LR test compares ML fits (method='ml')")
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise MlsemError(f"lrtest: bootstrap={n!r} must be an integer of at least 2")
    m0, m1 = restricted.model, relaxed.model
    p = _order_map(m0, m1)
    psi0, psi1 = restricted.estimate.copy(), relaxed.estimate.copy()
    ss, children = _seeds(seed, n)

    def task(i):
        rng = np.random.default_rng(children[i])
        try:
            y = simulate_y(m0, psi0, rng)
            _, l0, c0 = refit(m0, y, psi0, "ML")
            _, l1, c1 = refit(m1, y[p], psi1, "ML")
            return max(0.0, 2.0 * (l1 - l0)), None, bool(c0 and c1)
        except REFIT_ERRORS as e:
            return float("nan"), None, False, f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    out = _map(task, n, parallel, progress, "bootstrap LR", m0)
    lr = np.array([o[0] for o in out])
    ok = np.array([o[2] for o in out])
    k = int(ok.sum())
    errors = [o[3] for o in out if len(o) > 3]
    if k == 0:
        raise MlsemError("lrtest(bootstrap=): no refit converged"
                         + (f" ({errors[0]})" if errors else ""))
    pb = (1.0 + float(np.sum(lr[ok] >= chi2 - 1e-10))) / (1.0 + k)
    return {"p_value": pb, "n": n, "failed": int(n - k), "seed": seed,
            "draws": lr, "converged": ok, "errors": errors, "seconds": time.perf_counter() - t0}
