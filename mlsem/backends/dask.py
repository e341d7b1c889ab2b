"""Distributed backend: the same fit with the data spread over Dask workers.

The log-likelihood is a sum over top-level units, so the data are split by
the top-level id into partitions, each held by one worker:

    files --(one task per file: read with Polars, bucket rows by a hash of the
             top-level id)--> partition p = bucket p of every file, in file
             order (a shuffle by the top id; row order within a group kept)
          --> global tables: label modes and slot keys (a cheap pass over the
              ids), unioned on the driver, sent back to every partition
          --> data.prepare(share, slots=global) -> model.Model, kept in worker
              memory

Per evaluation the driver sends psi to every partition (one small task each)
and adds up (loglik, dl/dpsi); the optimiser (mlsem.estimate.optimize) stays on the
driver and sees a :class:`DaskModel`, which has the interface of
``model.Model``.

Every partition is a Dask task whose inputs (file list, number of partitions,
global tables, parameter table) are in its recipe: when a worker is lost, Dask
recomputes the lost partitions on the workers that remain and the evaluation
is repeated.  Each evaluation also returns the partition's number of
observations and a checksum of its data, compared with those of the first
build: a rebuilt partition that differs stops the fit with an error, never a
silently different likelihood.  A recomputation that fails (files gone, all
workers lost, the same task killing workers again and again) stops the fit
with an :class:`MlsemError` that says so.

Layer: just below api (it imports spec, data and model; only api imports it,
and only for ``backend="dask"``).  Dask is an optional dependency
(``pip install mlsem[dask]``); the rest of the package never imports it.
"""
from __future__ import annotations

import copy
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..data.prepare import label_mode, LevelInfo
from ..data.encode import Encoding
from ..spec.formula import effects_of
from ..errors import MlsemError
from ..estimate.optimize import variance_starts
from ..model.multilevel import Model
from ..spec.relax import coefficient_design, relax_table
from ..spec.table import multilevel_table
from .partitions import (_concat, _factor_pass, _id_stats, _learn_encoding, _make_part,
                         _merge_levels, _part_echo, _part_eval, _part_hessian, _part_id,
                         _part_moments, _part_rss, _part_summary, _pick, _prepare_share,
                         _read_split, _slot_keys, sources)

try:
    import distributed as _dd
except ImportError:  # pragma: no cover - exercised only without dask
    _dd = None


def connect(address: str, timeout: float = 10.0):
    """A dask.distributed.Client for a scheduler address (``tcp://host:8786``)."""
    if _dd is None:
        raise MlsemError("backend='dask' needs dask.distributed: pip install 'mlsem[dask]' "
                         "(or pip install 'dask[distributed]')")
    try:
        return _dd.Client(address, timeout=timeout)
    except Exception as exc:
        raise MlsemError(f"cannot connect to the Dask scheduler at {address!r} "
                         f"({type(exc).__name__}: {exc})") from None


def _require_dask(client):
    """The client to use, and whether this call opened it (a scheduler address)."""
    if _dd is None:
        raise MlsemError("backend='dask' needs dask.distributed: pip install 'mlsem[dask]' "
                         "(or pip install 'dask[distributed]')")
    if client is None:
        raise MlsemError("backend='dask' needs client=: a dask.distributed.Client or a scheduler "
                         "address (e.g. 'tcp://scheduler:8786')")
    if isinstance(client, str):
        return connect(client), True
    if not isinstance(client, _dd.Client):
        raise MlsemError(f"client={client!r} is neither a dask.distributed.Client nor a "
                         "scheduler address")
    return client, False


# ---- the driver side ---------------------------------------------------------

@dataclass
class DistributedData:
    """What the driver knows of the distributed data: the global metadata the
    parameter table and the results need (the Prepared-like attributes of
    spec.multilevel_table and api._finish), no arrays."""
    xnames: list
    latent_names: list
    latent_term: list
    latent_node: np.ndarray
    nlatent: int
    nslots: int
    slot_labels: pl.DataFrame
    level_labels: list
    levels: list
    nobs: int
    nrows: int
    npatterns: int
    dropped_covariate: int
    missing_outcome: int
    npartitions: int
    nsources: int
    slot_lat: np.ndarray | None = None   # (P, nl) global latent of each slot (relax.relax_table)
    meta: dict = field(default_factory=dict)


def _global_levels(summaries) -> list:
    out = []
    for d, lv in enumerate(summaries[0]["levels"]):
        per = [s["levels"][d] for s in summaries]
        ng = sum(x.ngroups for x in per)
        nobs = sum(s["nobs"] for s in summaries)     # every level's groups hold every observation
        out.append(LevelInfo(lv.name, lv.columns, ng, min(x.min_obs for x in per),
                             nobs / ng, max(x.max_obs for x in per)))
    return out


class DaskModel(Model):
    """``model.Model``'s interface over partitions held by Dask workers."""

    def __init__(self, client, parts, data: DistributedData, table, checksums, builds,
                 timeout: float = 120.0, poll: float = 1.0):
        self.client = client
        self.parts = parts
        self.prep = data
        self.table = table
        self.backend = "dask"
        self.q = len(data.xnames)
        self.M = max(table.nlatent, 1)
        self.P = table.nslots
        self.dense = not table.theta_diagonal
        self._tau_layout(table)
        self._hess_layout(table)
        self.nevals = 0
        self.checksums = checksums
        self.builds = builds
        self.recoveries = 0
        self.eval_seconds = 0.0
        self.timeout = timeout
        self.poll = poll
        self.owned = False      # the client was opened by build() from an address
        self._where = None      # partition key -> worker address (refreshed when a worker is lost)
        self.base_table = None  # the mixed model's table when ``table`` relaxes it
        self._which = "model"   # the worker-side model evaluated ("base_model": the mixed one)

    def base(self) -> "DaskModel":
        """The mixed (unrelaxed) model on the same partitions, for the relaxed
        fit's warm start (api.fit's relax.warm_start)."""
        if self.base_table is None:
            raise MlsemError("internal: this distributed model is not a relaxation")
        m = copy.copy(self)
        m.table, m.base_table, m._which = self.base_table, None, "base_model"
        m.M, m.P = max(m.table.nlatent, 1), m.table.nslots
        m.dense = not m.table.theta_diagonal
        m._tau_layout(m.table)
        m._hess_layout(m.table)
        m.owned = False
        return m

    # ---- one round trip ------------------------------------------------------
    def _submit(self, func, args):
        """One task per partition, pinned to the worker that holds it (so that
        Dask's work stealing never copies a partition to another worker);
        where a partition is being rebuilt, wherever Dask puts it."""
        if self._where is None:
            self._where = {k: v[0] for k, v in self.client.who_has(self.parts).items() if v}
        futs, pins = [], []
        for part in self.parts:
            w = self._where.get(part.key)
            kw = {"workers": [w], "allow_other_workers": False} if w else {}
            futs.append(self.client.submit(func, part, *args, pure=False, **kw))
            pins.append(w)
        return futs, pins

    def _run(self, func, *args):
        if self.parts is None:
            raise MlsemError("this distributed model was closed: its partitions were released")
        try:
            futs, pins = self._submit(func, args)
            empty_since = None
            while True:
                try:
                    _dd.wait(futs, timeout=self.poll)
                    break
                except _dd.TimeoutError:
                    alive = self.client.ncores()
                    if not alive:
                        empty_since = empty_since or time.monotonic()
                        if time.monotonic() - empty_since > self.timeout:
                            raise MlsemError(
                                f"backend='dask': no worker has been left in the cluster for "
                                f"{self.timeout:.0f} s; the fit was stopped (no result)") from None
                        continue
                    empty_since = None
                    if any(w is not None and w not in alive for w in pins):
                        # a worker was lost: its partitions are rebuilt elsewhere; ask again
                        self.client.cancel(futs)
                        self._where = None
                        futs, pins = self._submit(func, args)
            return self.client.gather(futs)
        except MlsemError as exc:
            if str(exc).startswith("backend='dask'"):
                raise
            raise MlsemError(
                f"backend='dask': a partition could not be evaluated or rebuilt after a worker "
                f"was lost ({exc}); the fit was stopped (no result)") from None
        except Exception as exc:
            raise MlsemError(
                f"backend='dask': a partition could not be evaluated or rebuilt after a worker "
                f"was lost ({type(exc).__name__}: {exc}); the fit was stopped (no result)") from None

    def round_trip(self, psi) -> float:
        """Seconds for one evaluation's communication alone: psi to every
        partition and a gradient-sized answer back, no likelihood work."""
        t0 = time.perf_counter()
        self._run(_part_echo, np.asarray(psi, dtype=float), True)
        return time.perf_counter() - t0

    def _check_parts(self, out):
        """Each partition's (checksum, build) against the first read; counts
        rebuilt partitions."""
        for p, (chk, build) in enumerate(out):
            if chk != self.checksums[p]:
                raise MlsemError(
                    f"backend='dask': partition {p} was rebuilt after a worker was lost but its "
                    f"data differ from the first read ({chk} != {self.checksums[p]}; did the "
                    "files change during the fit?); the fit was stopped (no result)")
            if build != self.builds[p]:
                self.builds[p] = build
                self.recoveries += 1

    def _reduce(self, func, nsum, *args):
        """One round trip: ``func`` on every partition, the first ``nsum`` fields
        of the answers summed (None fields stay None); None if a partition
        reports a Sigma that is not positive definite."""
        self.nevals += 1
        t0 = time.perf_counter()
        out = self._run(func, *args)
        self._check_parts([o[nsum:] for o in out])
        self.eval_seconds += time.perf_counter() - t0
        if any(o[0] is None for o in out):
            return None
        return tuple(None if out[0][i] is None else sum(o[i] for o in out) for i in range(nsum))

    def evaluate(self, psi, need_grad: bool = True):
        got = self._reduce(_part_eval, 2, np.asarray(psi, dtype=float), need_grad, self._which)
        return (None, None) if got is None else got

    def phi_hessian(self, psi):
        """Model.phi_hessian summed over the partitions."""
        if not len(self.hess_params):
            return None
        return self._reduce(_part_hessian, 3, np.asarray(psi, dtype=float), self._which)

    # ---- starting values and the null model, from reduced moments --------------
    def _ols(self):
        mom = self._run(_part_moments)
        XtX = sum(m[0] for m in mom)
        Xty = sum(m[1] for m in mom)
        n = sum(m[5] for m in mom)
        xsum = sum(m[4] for m in mom)
        if self.q:
            beta = np.linalg.lstsq(XtX, Xty, rcond=None)[0]
        else:
            beta = np.zeros(0)
        return beta, XtX, xsum, n, sum(m[3] for m in mom)

    def start_values(self) -> np.ndarray:
        """As estimate.start_values: OLS for the mean, the OLS residual
        variance split over the components (moments reduced over partitions)."""
        t = self.table
        beta, XtX, xsum, n, ysum = self._ols()
        psi = np.zeros(t.nparams)
        if self.q:
            psi[t.beta_param] = beta
            rss = sum(self._run(_part_rss, beta, 0.0))
        else:
            rss = sum(self._run(_part_rss, beta, ysum / n))
        s2 = rss / n or 1.0
        xvar = {name: float(XtX[c, c] / n - (xsum[c] / n) ** 2)
                for c, name in enumerate(self.prep.xnames)}
        return variance_starts(t, psi, s2, xvar)

    def ols_loglik(self) -> float:
        """Log-likelihood of the linear regression (api._ols_loglik's value)."""
        beta, *_, n, _ = self._ols()
        rss = sum(self._run(_part_rss, beta, 0.0))
        return -0.5 * n * (math.log(2 * math.pi) + math.log(rss / n) + 1.0)

    def residuals(self, psi):
        raise MlsemError("backend='dask': the residuals stay on the workers")

    def notes(self) -> list:
        out = [f"dask: {self.prep.npartitions} partitions of {self.prep.nsources} source(s); "
               f"{self.nevals} evaluations, {self.eval_seconds:.2f} s in distributed evaluations"]
        if self.recoveries:
            out.append(f"dask: {self.recoveries} partition(s) rebuilt on another worker after a "
                       "worker was lost; every evaluation used all the data")
        return out

    def close(self):
        """Release the partitions (worker memory)."""
        if self.parts is not None:
            self.client.cancel(self.parts)
            self.parts = None
        if self.owned:
            self.client.close()
            self.owned = False


def build(data, client, F, levels, effects, index, *, npartitions=None, backend="auto",
          nthreads=None, relax=None) -> DaskModel:
    """Read, shuffle and prepare ``data`` on the workers of ``client``; build the
    parameter table on the driver; return the distributed model.  ``relax``:
    (effects, residuals[, coefficients]) of mlsem.spec.relax, applied to the table on the driver
    with the global slot metadata."""
    client, owned = _require_dask(client)
    try:
        model = _build(data, client, F, levels, effects, index, npartitions, backend, nthreads,
                       relax)
    except BaseException:
        if owned:
            client.close()
        raise
    model.owned = owned
    return model


def _build(data, client, F, levels, effects, index, npartitions, backend, nthreads, relax=None):
    if npartitions is None:
        npartitions = max(1, len(client.ncores()))
    if not isinstance(npartitions, int) or npartitions < 1:
        raise MlsemError(f"npartitions={npartitions!r} must be a positive integer")
    if F.outcome_vars:
        raise MlsemError(f"backend='dask': the transformed outcome {F.outcome!r} is not computed on the "
                         "partitions; make it a column before fitting, or fit in process")
    level_cols = [lv[-1] for lv in levels]
    top = level_cols[0]
    cols = F.columns + ([index] if index else [])
    numeric = [F.outcome]       # the covariates' types are checked by the encoding (mlsem.data.encode)
    srcs = sources(data)
    tag = uuid.uuid4().hex[:8]
    clock = [time.perf_counter()]
    stages = {}

    def lap(name):
        clock.append(time.perf_counter())
        stages[name] = clock[-1] - clock[-2]
    workers = sorted(client.ncores()) or [None]

    def sub(func, *args, key, at=0, **kw):
        # partition p prefers worker p (round robin) so that the shares are spread;
        # any worker may take it over when that one is lost
        w = workers[at % len(workers)]
        where = {} if w is None else {"workers": [w], "allow_other_workers": True}
        return client.submit(func, *args, key=key, **where, **kw)

    try:
        splits = [sub(_read_split, s, cols, numeric, level_cols, top, npartitions,
                      key=f"mlsem-read-{tag}-{i}", at=i) for i, s in enumerate(srcs)]
        raws = []
        for p in range(npartitions):
            buckets = [sub(_pick, s, p, key=f"mlsem-bucket-{tag}-{i}-{p}", at=i)
                       for i, s in enumerate(splits)]
            raws.append(sub(_concat, *buckets, key=f"mlsem-share-{tag}-{p}", at=p))
        # global label modes (a pass over the id columns)
        stats = client.gather([sub(_id_stats, r, level_cols, key=f"mlsem-ids-{tag}-{p}", at=p)
                               for p, r in enumerate(raws)])
        lap("read, shuffle, id pass")
        if sum(s[0] for s in stats) == 0:
            raise MlsemError("data: the data set is empty (0 rows)")
        modes = []
        for d in range(1, len(level_cols)):
            n_id = pl.concat([s[1][d - 1][0] for s in stats]).n_unique()
            modes.append(label_mode(n_id, sum(s[1][d - 1][1] for s in stats),
                                    sum(s[1][d - 1][2] for s in stats)))
        # the fixed part's encoding: the levels of every factor over the whole data
        # set, then formulaic's ModelSpec learned once (on the largest share) and
        # applied by every partition alike
        enc = Encoding(F.fixed_text, [e for rt in F.random for e in rt.effects], F.variables, F.outcome)
        passes = client.gather([sub(_factor_pass, r, enc, key=f"mlsem-factors-{tag}-{p}", at=p)
                                for p, r in enumerate(raws)])
        best = int(np.argmax([n for n, _ in passes]))
        if passes[best][0] == 0:
            raise MlsemError(f"data: no observation has both {F.outcome!r} and the covariates observed")
        enc = client.gather(sub(_learn_encoding, raws[best], enc, _merge_levels(passes),
                                key=f"mlsem-encoding-{tag}", at=best))
        if enc.stateful:
            raise MlsemError(
                f"backend='dask': the transform(s) {', '.join(enc.stateful)} learn their state (a mean, a "
                "standard deviation, polynomial coefficients) from the data, which the partitions hold "
                "in pieces; make the column before fitting, or fit in process")
        F = enc.resolve(F)
        effects = effects_of(F)
        args = {"prepare": (F.outcome, list(F.fixed), F.intercept, levels, effects), "index": index,
                "encoding": enc}
        # the global slot table: the union of every share's slot keys
        keys = client.gather([sub(_slot_keys, r, args, modes, key=f"mlsem-keys-{tag}-{p}", at=p)
                              for p, r in enumerate(raws)])
        lap("slot keys")
        keys = [k for k in keys if k is not None]
        if not keys:
            raise MlsemError(f"data: no observation has both {F.outcome!r} and the covariates observed")
        slots = pl.concat(keys).unique()
        slots = slots.sort(slots.columns)
        if relax is not None and len(relax) > 2 and relax[2]:
            # group-specific coefficients: one column per label of the whole data set
            # (data.prepare's design rows are its slot rows, so these are the in-process labels)
            labels = {d: slots[f"__lab{d}"].unique().sort().to_list() for d in range(1, len(levels))}
            args = dict(args, design=coefficient_design(relax[2], F, levels, labels))
        preps = [sub(_prepare_share, r, args, modes, slots, key=f"mlsem-prepare-{tag}-{p}", at=p)
                 for p, r in enumerate(raws)]
        slopes = any(e != "Intercept" for v in effects.values() for e in v)
        summ = client.gather([sub(_part_summary, pr, slopes, key=f"mlsem-summary-{tag}-{p}", at=p)
                              for p, pr in enumerate(preps)])
    except MlsemError:
        raise
    except Exception as exc:
        raise MlsemError(f"backend='dask': reading or preparing the data failed "
                         f"({type(exc).__name__}: {exc})") from None
    lap("prepare")
    keep = [p for p, s in enumerate(summ) if s is not None]
    summ = [summ[p] for p in keep]
    preps = [preps[p] for p in keep]
    s0 = summ[0]
    for s in summ[1:]:
        if (s["nslots"], s["nlatent"], s["xnames"], s["latent_names"]) != (
                s0["nslots"], s0["nlatent"], s0["xnames"], s0["latent_names"]):
            raise MlsemError("internal: partitions numbered their slots or latents differently")
    dd = DistributedData(
        xnames=s0["xnames"], latent_names=s0["latent_names"], latent_term=s0["latent_term"],
        latent_node=s0["latent_node"], nlatent=s0["nlatent"], nslots=s0["nslots"],
        slot_labels=s0["slot_labels"], level_labels=s0["level_labels"],
        levels=_global_levels(summ), nobs=sum(s["nobs"] for s in summ),
        nrows=sum(s["nrows"] for s in summ), npatterns=(sum(s["npatterns"] for s in summ) if slopes
                   else len(set().union(*(s["patterns"] for s in summ)))),
        dropped_covariate=sum(s["dropped_covariate"] for s in summ),
        missing_outcome=sum(s["missing_outcome"] for s in summ),
        npartitions=len(keep), nsources=len(srcs), slot_lat=s0["slot_lat"])
    base_table = multilevel_table(dd, F, levels)
    table = relax_table(base_table, dd, *(tuple(relax or ())[:2] or (None, None)), index)
    base_arg = None if table is base_table else base_table
    parts = [sub(_make_part, pr, table, backend, nthreads, base_arg,
                 key=f"mlsem-model-{tag}-{keep[i]}", at=keep[i])
             for i, pr in enumerate(preps)]
    first = client.gather([client.submit(_part_id, pt, pure=False) for pt in parts])
    lap("model")
    dd.meta["build_seconds"] = stages
    # the shares and prepared frames stay in the graph (lineage for recovery)
    # but need not stay in memory: drop our references
    del raws, preps, splits
    model = DaskModel(client, parts, dd, table, [f[0] for f in first], [f[1] for f in first])
    model.base_table = base_arg
    model.formula = F
    model.encoding = enc
    return model
