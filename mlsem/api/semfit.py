"""``mlsem.sem``: a model written in lavaan syntax, fitted on wide data by FIML
(or by ADF / GMM, mlsem.estimate.adf), with its inference options (robust,
cluster-robust, weights) and the lavaan-like parameter rows of the result;
also the ADF fit of a nested model through its wide form (multilevel_adf).
The nested model as that wide data plus syntax: mlsem.api.bridge.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import polars as pl

from ..data.prepare import scan
from ..errors import ConvergenceWarning, MlsemError
from ..estimate.optimize import (REUSE_HESSIAN_STEP, _serial_blas, identification, information, optimize,
                                vcov_from_information)
from ..results.fitresult import FitResult
from ..data.wide import prepare_wide
from ..model.sem import SemModel
from ..spec.semtable import build_table, count_moments
from ..estimate.adf import ADF_NAMES
from ..estimate.semscoring import fit as scoring_fit
from ..model.seminfo import linear_in_psi, observed_information
from ..inference.vce import check_inference_options
from ..spec.lavaan import parse

LOG2PI = math.log(2.0 * math.pi)


def _one_blas_thread():
    """The optimiser's and the model's matrices are tiny: a multithreaded BLAS on
    them is many times slower than one thread (DESIGN.md section 5).  The
    controller is mlsem.estimate.optimize's, built once at its import (a second
    one here cost 5-7 ms on the first fit of a process)."""
    return _serial_blas()


def _wide_arrays(lf, observed, covariates, data):
    """The model's columns as float arrays (null -> NaN), one collect; errors name
    the column and the rows."""
    cols = observed + covariates
    schema = lf.collect_schema()
    for c in cols:
        dt = schema[c]
        if not (dt.is_numeric() or dt == pl.Boolean):
            raise MlsemError(f"data: column {c!r} must be numeric, but it is {dt}")
    # columns already Float64 are selected by name, without a cast node per
    # column (72 casts cost ~1 ms of expression building on the wide
    # ``unbalanced``); an in-memory frame is selected eagerly (no query plan)
    sel = cols if all(schema[c] == pl.Float64 for c in cols) else [
        pl.col(c) if schema[c] == pl.Float64 else pl.col(c).cast(pl.Float64) for c in cols]
    try:
        df = data.select(sel) if isinstance(data, pl.DataFrame) else lf.select(sel).collect()
    except Exception as exc:
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    if df.height == 0:
        raise MlsemError("data: the data set is empty (0 rows)")
    A = df.to_numpy().astype(np.float64, copy=False)
    bad = ~np.isfinite(A) & ~np.isnan(A)
    if bad.any():
        r, c = np.nonzero(bad)
        rows = ", ".join(str(int(i) + 1) for i in r[c == c[0]][:5])
        raise MlsemError(f"data: column {cols[c[0]]!r} has infinite values, rows {rows}")
    # NaN stored as a value (not null) is a missing cell too, as in lavaan
    P = len(observed)
    return np.ascontiguousarray(A[:, :P]), np.ascontiguousarray(A[:, P:])


def _fixed_x_loglik(X: np.ndarray) -> float:
    """The covariates' own normal log-likelihood at their sample moments (what
    lavaan adds with fixed.x = TRUE)."""
    n, q = X.shape
    if q == 0 or n == 0:
        return 0.0
    if np.isnan(X).any():
        return float("nan")
    C = np.cov(X, rowvar=False, bias=True).reshape(q, q)
    sign, logdet = np.linalg.slogdet(C)
    if sign <= 0:
        return float("nan")
    return -0.5 * n * (q * LOG2PI + logdet + q)


def sem(model: str, data, *, vce=None, method: str = "ml", weights: str | None = None,
        backend: str = "auto", nthreads: int | None = None, start=None, progress=None,
        survey=None) -> FitResult:
    """Fit a structural equation model written in lavaan syntax by FIML.

    Defaults are lavaan's ``sem(missing = "ml", fixed.x = TRUE)``: residual
    variances and observed intercepts free, exogenous latent variables
    covary, observed exogenous covariates (that only predict) are conditioned
    on.  ``data``: anything :func:`mlsem.fit` accepts, one row per unit.
    Standard errors from the observed information matrix (``vce="oim"``), or
    the Huber-White sandwich (``vce="robust"``, lavaan's se =
    "robust.huber.white"), clustered (``vce=("cluster", column)``, lavaan's
    ``cluster =``); ``weights``: a column of sampling weights (lavaan's
    ``sampling.weights =``, normalised to sum to the number of rows; the
    standard errors are then the sandwich's, and vce="oim" is refused).
    ``method="adf"`` (or "gmm"): asymptotically distribution-free weighted
    least squares (lavaan's estimator = "WLS"; mlsem.estimate.adf) on complete data.
    ``survey``: an mlsem.SurveyDesign (the rows are the units: one weight,
    ``weights={"obs": column}``, strata, PSUs, FPC, subpopulation):
    pseudo-ML with linearised standard errors (mlsem.api.survey_sem).
    """
    if survey is not None:
        from .survey_sem import check_sem_survey, sem_survey
        check_sem_survey(survey, vce, method, weights)
        res = sem_survey(sem, model, data, survey, backend=backend, nthreads=nthreads,
                         start=start, progress=progress)
        _refresh_sem_rows(res)
        return res
    if isinstance(method, str) and method.lower() in ADF_NAMES:
        method = "adf"
        if vce not in (None, "oim") or weights is not None:
            raise MlsemError(f"method='adf' has its own standard errors ((Delta' W Delta)^-1 / (N - 1), "
                             f"already distribution-free): vce={vce!r} and weights= are not available with it")
        vce_, cluster = "adf", None
    else:
        if vce is None:   # the default: OIM, or the sandwich under sampling weights
            vce = "mixed" if weights is not None else "oim"
        elif vce == "mixed":
            raise MlsemError("vce='mixed' is the multilevel convention; SEM fits take 'oim', 'robust' "
                             "or ('cluster', column)")
        vce_, cluster, weights, method = check_inference_options(vce, weights, method)
        if method != "ml":
            raise MlsemError(f"method={method!r}: SEM fits support method='ml' (FIML) and 'adf' (GMM)")
    if backend not in ("auto", "cython", "numpy"):
        raise MlsemError(f"backend={backend!r} is not one of 'auto', 'cython', 'numpy'")
    # one BLAS thread for the whole fit (the matrices are at most P x P or
    # rows x covariates): the first multithreaded BLAS call of a process (e.g.
    # the covariates' slogdet) woke OpenBLAS's threads for 5-20 ms
    with _one_blas_thread():
        return _fit_ml(model, data, vce_, cluster, weights, method, backend, nthreads, start, progress)


def _fit_ml(model, data, vce_, cluster, weights, method, backend, nthreads, start, progress):
    t0 = time.perf_counter()
    stmts = parse(model)
    lf = scan(data)
    try:
        columns = list(lf.collect_schema().names())
    except Exception as exc:
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    table = build_table(stmts, columns)
    for c in (weights, cluster):
        if c is not None and c not in columns:
            raise MlsemError(f"data: column {c!r} (given as {'weights' if c == weights else 'cluster'}) "
                             "is not in the data")
    Y, X = _wide_arrays(lf, table.observed, table.covariates, data)
    if method == "adf":
        return _sem_adf(model, table, Y, X, start, t0)
    unit = _unit_values(lf, weights, cluster, data)
    nmom = count_moments(table)
    if table.nparams > nmom:
        raise MlsemError(f"the model has {table.nparams} free parameters but the data have only "
                         f"{nmom} moments (means, variances, covariances): it is not identified")
    wd = prepare_wide(table, Y, X)
    if wd.nrows == 0:
        raise MlsemError("data: no row has an observed value of the model's variables")
    if unit.get("weights") is not None:
        w = unit["weights"][wd.data_row]
        wd.wrow = np.ascontiguousarray(w * (len(w) / w.sum()))
    m = SemModel(table, wd, backend=backend, nthreads=nthreads, Y=Y)
    t1 = time.perf_counter()
    psi0 = m.start_values() if start is None else np.asarray(start, dtype=float)
    if len(psi0) != table.nparams:
        raise MlsemError(f"start: {len(psi0)} values for {table.nparams} free parameters ({', '.join(table.names)})")
    if m.evaluate(psi0, need_grad=False)[0] is None:
        raise MlsemError("the model-implied covariance matrix at the starting values is not positive "
                         "definite (check fixed values, e.g. negative or zero variances); "
                         "give start values with start(...)* or start=")
    start = psi0
    blas = _one_blas_thread()
    with blas, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = scoring_fit(m, start, progress=progress)
    lo = np.array([p.lower for p in table.params])
    at = np.isfinite(lo) & (opt.final - lo <= 1e-7 * np.maximum(1.0, np.abs(opt.final)) + 1e-12)
    if at.any():
        # lavaan does not bound variances: continue from here without the bound
        for p in table.params:
            p.lower = -np.inf
        with _one_blas_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt2 = optimize(m, start=opt.final, progress=progress)
        if opt2.loglik >= opt.loglik - 1e-9 or not opt.converged:
            opt = opt2
        neg = [table.names[i] for i in np.flatnonzero(opt.final < 0) if table.params[i].kind == "variance"]
        if neg:
            notes_pre = [f"negative variance estimate(s) (a Heywood case): {', '.join(neg)}"]
        else:
            notes_pre = []
    else:
        notes_pre = []
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    t2 = time.perf_counter()
    psi = opt.final
    with _one_blas_thread():
        info = _information(m, psi, opt)
    names = table.names
    n = len(names)
    notes = list(notes_pre)
    if info is None or not np.all(np.isfinite(info)):
        cov = np.full((n, n), np.nan)
        identified, confounded = False, list(names)
    else:
        identified, confounded = identification(info, names)
        cov = vcov_from_information(info)
    rows_x = X[wd.data_row] if table.q else X
    llx = _fixed_x_loglik(rows_x) if table.q else 0.0
    if table.q and np.isfinite(llx):
        notes.append(f"the log-likelihood is conditional on the fixed covariates "
                     f"{', '.join(table.covariates[:6])}{' ...' if table.q > 6 else ''} (as lavaan's "
                     f"with fixed.x = TRUE); with their own normal likelihood at the sample moments "
                     f"({llx:.6f}) the joint one is {opt.loglik + llx:.6f}")
    if wd.dropped_rows:
        notes.append(f"{wd.dropped_rows} row(s) with no observed value were dropped")
    if wd.dropped_cells:
        notes.append(f"{wd.dropped_cells} observed value(s) dropped because a covariate of their mean is missing")
    if vce_ in ("robust", "cluster") and info is not None and np.all(np.isfinite(info)):
        cov = _sem_sandwich(m, psi, info, wd, unit, vce_, cluster, notes, weights)
    elif vce_ in ("robust", "cluster"):
        notes.append("robust standard errors not computed: no information matrix")
    # the parameter rows of summary() and the := parameters use the final covariance
    full = table.full_values(psi)
    Vfull = table.T @ cov @ table.T.T
    sem_rows = _sem_rows(table, full, Vfull) + _fixed_x_rows(table.covariates, rows_x)
    defined = _defined(table, psi, cov)
    vce_name = {"cluster": f"cluster({cluster})"}.get(vce_, vce_)
    timings = {"prepare": t1 - t0, "optimize": t2 - t1, "inference": time.perf_counter() - t2}
    res = FitResult(
        formula=model, names=names, kinds=[p.kind for p in table.params], estimate=psi.copy(),
        cov=cov, loglik=float(opt.loglik), converged=opt.converged, nobs=wd.nrows, vce=vce_name,
        levels=[], opt=opt, outcome=", ".join(table.observed), identified=identified,
        confounded=confounded, npatterns=len(wd.pat_ptr) - 1, nslots=table.P, timings=timings,
        model=m, info=info, notes=notes, method="SEM", sem_rows=sem_rows,
        sem_labels=[_row_of(table, k) for k in table.free_full], defined=defined,
        loglik_fixed_x=llx, kernel="factor" if m.factor_path else "dense", backend=m.backend)
    return res


def _information(m, psi, opt):
    """The observed information at the estimates: the exact one of the last
    Newton step (mlsem.estimate.semscoring: ``opt.hessian_exact``) where that
    was at, or within a negligible step of, psi
    (mlsem.estimate.optimize.REUSE_HESSIAN_STEP), else exact
    (mlsem.model.seminfo.observed_information) where Sigma and the means are
    linear in psi, else by central differences of the gradient."""
    if getattr(opt, "hessian_exact", False) and opt.hessian is not None and opt.hessian_at is not None:
        scale = np.maximum(np.abs(psi), 0.1 * np.asarray(m.pscale, dtype=float))
        if np.max(np.abs(psi - opt.hessian_at) / scale, initial=0.0) <= REUSE_HESSIAN_STEP:
            return -opt.hessian
    info = observed_information(m, psi) if linear_in_psi(m) else None
    return info if info is not None else information(m, psi)


def _unit_values(lf, weights, cluster, data):
    """Sampling weights (float) and cluster codes per data row (or None)."""
    out = {}
    if weights is None and cluster is None:
        return out
    cols = [c for c in (weights, cluster) if c is not None]
    try:
        df = lf.select(cols).collect()
    except Exception as exc:
        raise MlsemError(f"data: cannot read {data!r}: {exc}") from None
    if weights is not None:
        from ..inference.vce import check_weight_dtype, check_weights
        check_weight_dtype(df, weights)
        if df[weights].null_count():
            raise MlsemError(f"weights column {weights!r} has missing values")
        w = df[weights].cast(pl.Float64).to_numpy()
        check_weights(w, weights, lambda bad: "rows " + ", ".join(
            str(int(i) + 1) for i in np.flatnonzero(bad)[:5]))
        out["weights"] = w
    if cluster is not None:
        if df[cluster].null_count():
            raise MlsemError(f"cluster column {cluster!r} has {df[cluster].null_count()} missing value(s)")
        out["cluster"] = df[cluster].rank("dense").cast(pl.Int64).to_numpy() - 1
    return out


def _sem_sandwich(m, psi, info, wd, unit, vce, cluster, notes, weights):
    """Huber-White / cluster-robust covariance of an SEM fit (mlsem.inference.vce's
    definitions, with the rows of the wide data as units)."""
    from ..inference.vce import sandwich
    from ..model.semscores import sem_row_scores
    with _one_blas_thread():
        S = sem_row_scores(m, psi)
    cl = unit.get("cluster")
    cl = None if cl is None else np.unique(cl[wd.data_row], return_inverse=True)[1].ravel()
    w = wd.wrow if weights is not None else None
    cov, _ = sandwich(m, psi, info, w, cl, scores=S)
    if vce == "cluster":
        notes.append(f"Std. errors adjusted for {int(cl.max()) + 1} clusters in {cluster} "
                     "(sandwich, observed-information bread, G/(G-1))")
    else:
        notes.append("Std. errors: Huber-White sandwich (lavaan's robust.huber.white), scores per "
                     "row, observed-information bread")
    if weights is not None:
        notes.append(f"sampling weights {weights!r}, rescaled to sum to the number of rows "
                     "(pseudo-likelihood)")
    return cov


def _sem_adf(model, table, Y, X, start, t0) -> FitResult:
    """method='adf': ADF / GMM (mlsem.estimate.adf) on complete wide data."""
    from ..estimate.adf import AdfObjective, Moments, check_complete
    check_complete(Y, X, table.observed + table.covariates)
    mom = Moments(Y, X, table.observed + table.covariates, unbiased=True)
    if table.nparams > mom.nmom:
        raise MlsemError(f"the model has {table.nparams} free parameters but the data have only "
                         f"{mom.nmom} moments (means, variances, covariances): it is not identified")
    mom.W  # a singular Gamma is an error before anything else runs
    wd = prepare_wide(table, Y, X)
    m = SemModel(table, wd, backend="numpy", Y=Y)
    psi0 = m.start_values() if start is None else np.asarray(start, dtype=float)
    if len(psi0) != table.nparams:
        raise MlsemError(f"start: {len(psi0)} values for {table.nparams} free parameters ({', '.join(table.names)})")
    obj = AdfObjective.for_sem(m, mom)
    t1 = time.perf_counter()
    with _one_blas_thread():
        psi, fmin, info = obj.minimize(psi0)
    t2 = time.perf_counter()
    res = _adf_result(model, table, psi, psi0, fmin, info, mom, obj, t0, t1, t2)
    full = table.full_values(psi)
    Vfull = table.T @ res.cov @ table.T.T
    res.sem_rows = _sem_rows(table, full, Vfull) + _fixed_x_rows(table.covariates, X, ddof=1)
    res.sem_labels = [_row_of(table, k) for k in table.free_full]
    res.defined = _defined(table, psi, res.cov)
    res.outcome = ", ".join(table.observed)
    res.nslots = table.P
    res.model = m
    res.adf["objective"] = obj
    return res


def multilevel_adf(model, opts, F, prep, t0, t1) -> FitResult:
    """mlsem.fit(method='adf'): ADF on the moments of the wide form (one row per
    top-level unit, slots as variables, every slot's covariates as fixed x),
    with the multilevel parameter table (relaxations included)."""
    from ..estimate.adf import AdfObjective, MultilevelMoments
    from ..estimate.optimize import start_values
    table = model.table
    mm = MultilevelMoments(prep, table, unbiased=True)
    mom = mm.mom
    if table.nparams > mom.nmom:
        raise MlsemError(f"the model has {table.nparams} free parameters but the wide form has only "
                         f"{mom.nmom} moments: it is not identified")
    mom.W
    obj = AdfObjective(mm, mom)
    psi0 = start_values(model)
    t1b = time.perf_counter()
    with _one_blas_thread():
        psi, fmin, info = obj.minimize(psi0)
    t2 = time.perf_counter()
    res = _adf_result(opts.formula, table, psi, psi0, fmin, info, mom, obj, t0, t1b, t2)
    res.levels = prep.levels
    res.outcome = F.outcome
    res.npatterns = prep.npatterns
    res.nslots = prep.nslots
    res.sem_rows = None
    res.sem_labels = None
    res.model = model
    res.adf["objective"] = obj
    res.notes.append(f"the wide form: {prep.nrows} top-level units, {prep.nslots} slots, "
                     f"{mom.q} covariate column(s) of the slots as fixed x")
    return res


def _adf_result(formula, table, psi, psi0, fmin, info, mom, obj, t0, t1, t2) -> FitResult:
    from ..estimate.adf import chi2_pvalue
    from ..estimate.optimize import OptSummary
    names = table.names
    n = mom.n
    H = info["info"]
    identified, confounded = identification(H, names)
    cov = (np.linalg.inv(H) if identified else np.linalg.pinv(H)) / (n - 1)
    cov = 0.5 * (cov + cov.T)
    if not identified:
        bad = [names.index(c) for c in confounded]
        cov[bad, :] = np.nan
        cov[:, bad] = np.nan
    df = mom.nmom - table.nparams
    chi2 = (n - 1) * fmin
    gmax = float(np.max(np.abs(info["grad"]))) if len(psi) else 0.0
    opt = OptSummary(start=np.asarray(psi0, dtype=float).copy(), final=psi.copy(), loglik=float("nan"),
                     converged=info["converged"], iterations=info["iterations"],
                     evaluations=obj.nevals, gradient_norm=gmax, seconds=t2 - t1,
                     message="Gauss-Newton on the ADF objective" if info["converged"] else
                     "the ADF objective did not converge")
    notes = [f"ADF (GMM) with the distribution-free weight matrix W = Gamma^-1 (fourth-order "
             f"moments; lavaan's estimator = \"WLS\"): {n} units, {mom.nmom} sample moments, "
             f"F_min = {fmin:.6g}; standard errors (Delta' W Delta)^-1 / (N - 1)"]
    if not info["converged"]:
        warnings.warn(f"the ADF fit did not converge (largest gradient {gmax:.3g})", ConvergenceWarning,
                      stacklevel=3)
    timings = {"prepare": t1 - t0, "optimize": t2 - t1, "inference": time.perf_counter() - t2}
    res = FitResult(
        formula=formula, names=names, kinds=[p.kind for p in table.params], estimate=psi.copy(),
        cov=cov, loglik=float("nan"), converged=info["converged"], nobs=n, vce="adf",
        levels=[], opt=opt, outcome="", identified=identified, confounded=confounded,
        npatterns=1, nslots=mom.P, timings=timings, model=obj, info=H, notes=notes, method="ADF",
        kernel="adf")
    res.adf = {"fmin": float(fmin), "chi2": float(chi2), "df": int(df), "p_value": chi2_pvalue(chi2, df),
               "nmom": mom.nmom, "moments": mom}
    return res


def _row_of(table, k):
    for e in table.entries:
        if e.full == k:
            op = e.op if e.op != "~1" else "~1"
            return (e.lhs, op, e.rhs, e.label)
    return ("", "", "", "")


def _sem_rows(table, full, Vfull):
    """Every user-facing row (fixed ones too), lavaan's parameter table order."""
    rows = []
    endo = set(table.observed) | {e.lhs for e in table.entries if e.op == "~" and e.lhs in table.latents}
    for e in table.entries:
        if e.lhs.endswith("*"):
            continue
        if e.full >= 0:
            est = float(full[e.full])
            se = float(math.sqrt(max(Vfull[e.full, e.full], 0.0))) if np.isfinite(Vfull[e.full, e.full]) else float("nan")
            free = True
        else:
            est, se, free = float(e.value), float("nan"), False
        if not free and not e.user and e.matrix in ("lambda",) and e.lhs == e.rhs:
            continue  # phantom
        rows.append({"lhs": e.lhs, "op": e.op, "rhs": e.rhs, "label": e.label, "est": est,
                     "se": se, "free": free, "matrix": e.matrix, "dot": e.lhs in endo})
    return rows


def _fixed_x_rows(names, X, ddof=0):
    """lavaan's fixed.x rows: the covariates' sample (co)variances and means, fixed
    (divisor N for ML, N - 1 for ADF: ``ddof``)."""
    rows = []
    q = len(names)
    if q == 0:
        return rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an all-empty covariate column
        mean = np.nanmean(X, axis=0)
        var = np.nanvar(X, axis=0, ddof=ddof)
    for a in range(q):
        for b in range(a, q if q <= 10 else a + 1):
            if a == b:
                c = float(var[a])
            else:
                ok = ~np.isnan(X[:, a]) & ~np.isnan(X[:, b])
                c = (float(np.sum((X[ok, a] - X[ok, a].mean()) * (X[ok, b] - X[ok, b].mean())))
                     / (ok.sum() - ddof)) if ok.sum() > ddof else float("nan")
            rows.append({"lhs": names[a], "op": "~~", "rhs": names[b], "label": "", "est": c,
                         "se": float("nan"), "free": False, "matrix": "x"})
    for a in range(q):
        rows.append({"lhs": names[a], "op": "~1", "rhs": "", "label": "", "est": float(mean[a]),
                     "se": float("nan"), "free": False, "matrix": "x"})
    return rows


def _defined(table, psi, cov):
    if not table.defined:
        return []
    out = []

    def values(p):
        full = table.full_values(p)
        vals = {lab: float(full[k]) for lab, k in table.labels.items()}
        res = []
        for d in table.defined:
            v = d.func(vals)
            vals[d.name] = v
            res.append(v)
        return np.array(res)
    v0 = values(psi)
    J = np.zeros((len(v0), len(psi)))
    for i in range(len(psi)):
        # relative to the parameter's size or standard error (not to 1: a path of
        # 1e-5 would be stepped by a tenth of itself)
        se_i = math.sqrt(cov[i, i]) if np.isfinite(cov[i, i]) and cov[i, i] > 0 else 0.0
        h = 1e-6 * (max(abs(psi[i]), se_i) or 1.0)
        up, dn = psi.copy(), psi.copy()
        up[i] += h
        dn[i] -= h
        J[:, i] = (values(up) - values(dn)) / (2 * h)
    V = J @ cov @ J.T
    for k, d in enumerate(table.defined):
        out.append({"lhs": d.name, "op": ":=", "rhs": d.expr, "label": d.name, "est": float(v0[k]),
                    "se": float(math.sqrt(max(V[k, k], 0.0)))})
    return out


def _refresh_sem_rows(res):
    """The lavaan-style rows and the := parameters from the result's (new) covariance."""
    table = res.model.table
    full = table.full_values(res.estimate)
    Vfull = table.T @ res.cov @ table.T.T
    keep_x = [r for r in res.sem_rows if r.get("matrix") == "x"]
    res.sem_rows = _sem_rows(table, full, Vfull) + keep_x
    res.defined = _defined(table, res.estimate, res.cov)
