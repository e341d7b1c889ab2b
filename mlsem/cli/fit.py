"""``mlsem fit``: read the data (formula or --syntax), check and freeze the
options, fit once or per --by group, and write the table and the fit record.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings

from .. import __version__
from ..errors import ConvergenceWarning, MlsemError
from .options import _relax_options, parse_outcomes, parse_vce
from .survey_args import check_survey_cli, survey_data_columns, survey_from_args
from .output import (EXIT_FLAGGED, EXIT_OK, STATUS_COLUMNS, Progress, _check_out, _command_line, _fit_record,
                     _json_default, _status, _table, _write_parquet, _write_text)


# ---- fit --------------------------------------------------------------------------
def _read(args, extra_cols, prog, formula=None):
    """Read the formula's columns (and ``extra_cols``) once, checking names."""
    from ..data.encode import load
    from ..spec.formula import parse_formula
    F = parse_formula(formula or args.formula)
    cols = list(F.columns)
    for c in extra_cols:
        if c and c not in cols:
            cols.append(c)
    prog.say(f"reading {args.data}")
    # types, null ids and infinite values are checked once on the whole data; the
    # fixed part is encoded (mlsem.data.encode) to check it, and fit() encodes again
    df, F, _ = load(args.data, F, extra_cols)
    df = df.select(cols)
    prog.say(f"read {df.height:,} rows, columns {', '.join(cols)}")
    return F, df


def _read_syntax(args, prog):
    """The --syntax file's text and the data's columns it uses (plus --by)."""
    from ..data.prepare import collect_columns, scan
    from ..spec.semtable import sem_table
    try:
        with open(args.syntax) as f:
            text = f.read()
    except OSError as exc:
        raise MlsemError(f"--syntax {args.syntax!r}: cannot read: {exc.strerror or exc}") from None
    lf = scan(args.data)
    try:
        columns = list(lf.collect_schema().names())
    except Exception as exc:  # noqa: BLE001 - unreadable file
        raise MlsemError(f"data: cannot read {args.data!r}: {exc}") from None
    table = sem_table(text, columns)       # syntax errors name the line and token
    used = list(table.observed) + list(table.covariates)
    if args.by and args.by in used:
        raise MlsemError(f"--by {args.by!r} is a variable of the --syntax model; give another column")
    prog.say(f"reading {args.data}")
    vce = parse_vce(args.vce) if args.vce is not None else None
    extra = [c for c in (args.by, args.weights, vce[1] if isinstance(vce, tuple) else None,
                         *survey_data_columns(survey_from_args(args)))
             if c and c not in used]
    df = collect_columns(args.data, used + list(dict.fromkeys(extra)), used, [])
    prog.say(f"read {df.height:,} rows, {len(used)} columns of the model")
    return text, df


def _fit_options(args):
    """Check the fit command's options before any work; return the parsed ones."""
    if (args.formula is None) == (args.syntax is None):
        raise MlsemError("give exactly one of --formula and --syntax")
    if args.partitions is not None and not args.dask:
        raise MlsemError(f"--partitions {args.partitions}: needs --dask ADDRESS")
    if args.partitions is not None and args.partitions < 1:
        raise MlsemError(f"--partitions {args.partitions}: must be a positive integer")
    vce = parse_vce(args.vce) if args.vce is not None else None
    survey = survey_from_args(args)
    check_survey_cli(args, survey)
    if args.syntax:
        given = [o for o, v in (("--effects", args.effects), ("--residuals", args.residuals),
                                ("--coefficients", args.coefficients),
                                ("--index", args.index), ("--dask", args.dask),
                                ("--df", args.df), ("--ci", args.ci),
                                ("--bootstrap", args.bootstrap)) if v]
        if args.method == "reml":
            given.append(f"--method {args.method}")
        if args.outcomes:
            given.append("--outcomes")
        if given:
            raise MlsemError(f"--syntax: {given[0]} applies to --formula models only (write the "
                             "structure into the syntax instead)")
        if vce == "mixed":
            raise MlsemError(f"--vce {args.vce}: --syntax models support --vce oim, robust or cluster:COL")
        cluster = vce[1] if isinstance(vce, tuple) else None
        for opt, col in (("--weights", args.weights), ("--vce cluster:", cluster)):
            if args.by and col == args.by:
                raise MlsemError(f"--by {args.by!r} is also the {opt} column; give another column")
        return {"vce": vce, "cluster": cluster, "survey": survey}
    if isinstance(args.formula, list):      # several outcomes
        if survey is not None:
            raise MlsemError("the survey options (--weight, --strata, --psu, --fpc, --subpop, ...) "
                             f"are not supported with several outcomes (--formula given "
                             f"{len(args.formula)} times)")
        given = [o for o, v in (("--effects", args.effects), ("--residuals", args.residuals),
                                ("--coefficients", args.coefficients), ("--by", args.by),
                                ("--dask", args.dask),
                                ("--df", args.df), ("--ci", args.ci),
                                ("--bootstrap", args.bootstrap)) if v]
        if args.method != "ml":
            given.append(f"--method {args.method}")
        if given:
            raise MlsemError(f"{given[0]}: not supported with several outcomes (--formula given "
                             f"{len(args.formula)} times) yet")
        from ..spec.multivariate import parse_formulas
        parse_formulas(args.formula)
        args.parsed = {"effects": None, "residuals": None, "coefficients": None}
        return {"vce": vce or "mixed", "cluster": vce[1] if isinstance(vce, tuple) else None,
                "effects": None, "residuals": None,
                "coefficients": None, "survey": None, "outcomes": parse_outcomes(args.outcomes)}
    refuse_outcomes_one_formula(args)
    from ..spec.formula import parse_formula
    F = parse_formula(args.formula)
    effects, residuals, coefficients = _relax_options(args, F)
    vce = vce or "mixed"
    cluster = vce[1] if isinstance(vce, tuple) else None
    if args.by and args.by in F.columns:
        raise MlsemError(f"--by {args.by!r} is a column of the formula; give another column")
    for opt, col in (("--index", args.index), ("--weights", args.weights), ("--vce cluster:", cluster)):
        if args.by and col == args.by:
            raise MlsemError(f"--by {args.by!r} is also the {opt} column; give another column")
    args.parsed = {"effects": effects, "residuals": residuals, "coefficients": coefficients}
    _check_small_sample(args)
    return {"F": F, "vce": vce, "cluster": cluster, "survey": survey, **args.parsed}


def refuse_outcomes_one_formula(args):
    if getattr(args, "outcomes", None):
        raise MlsemError(f"--outcomes {args.outcomes[0]}: needs several outcomes (give --formula "
                         "once per outcome)")


def _check_small_sample(args):
    """--df, --ci, --bootstrap, --seed: combinations refused before any work."""
    ci, nb = getattr(args, "ci", None), getattr(args, "bootstrap", None)
    if nb is not None and nb < 2:
        raise MlsemError(f"--bootstrap {nb}: the number of bootstrap refits must be at least 2")
    if ci == "bootstrap" and nb is None:
        raise MlsemError("--ci bootstrap needs --bootstrap N (the number of refits)")
    if args.df == "kenward-roger" and args.method != "reml":
        raise MlsemError("--df kenward-roger needs --method reml")
    if (ci or nb) and args.dask:
        raise MlsemError("--ci/--bootstrap refit the model many times: not with --dask")
    if args.df and (args.dask or args.weights):
        raise MlsemError("--df: not with --dask or --weights")


def _intervals(args, res, prog):
    """The bootstrap and the interval kind asked for, into the fit (and its table)."""
    if getattr(args, "bootstrap", None):
        prog.say(f"parametric bootstrap: {args.bootstrap} refits")
        res.bootstrap(n=args.bootstrap, seed=args.seed, progress=not args.quiet)
    if getattr(args, "ci", None):
        prog.say(f"confidence intervals: {args.ci}")
        res.confint(method=args.ci)


def _parsed(args, name):
    return getattr(args, "parsed", {}).get(name)


@contextlib.contextmanager
def _option_names():
    """The relaxation layer names its arguments (``effects['j']: ...``); on the
    command line they are options (``--effects['j']: ...``)."""
    try:
        yield
    except MlsemError as exc:
        msg = str(exc)
        if msg.startswith(("effects", "residuals", "coefficients")):
            raise MlsemError("--" + msg) from None
        raise


def _cmd_fit(args, argv) -> int:
    from ..api.fitting import fit
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq"))
    if args.json:
        _check_out(args.json, "--json", (".json",))
    if args.by in STATUS_COLUMNS + ("status",):
        raise MlsemError(f"--by {args.by!r} clashes with a column of the results table; rename it")
    o = _fit_options(args)
    t0 = time.perf_counter()
    client = None
    try:
        if args.syntax:
            from ..api.semfit import sem
            text, df = _read_syntax(args, prog)

            def fitter(data, survey=o["survey"]):
                return sem(text, data, vce=o["vce"], method=args.method, weights=args.weights,
                           progress=prog, **({"survey": survey} if survey else {}))
        else:
            if args.dask:
                from ..backends.dask import connect
                prog.say(f"connecting to the Dask scheduler at {args.dask}")
                client = connect(args.dask)
            if (args.dask and not args.by) or isinstance(args.formula, list):
                df = None       # the workers (or fit, for several outcomes) read the data
            else:
                _, df = _read(args, [args.index, args.by, args.weights, o["cluster"],
                                     *survey_data_columns(o["survey"])], prog)

            def fitter(data, survey=o["survey"]):
                with _option_names():
                    return fit(data, args.formula, index=args.index, vce=o["vce"],
                               weights=args.weights, method=args.method, df=args.df,
                               effects=o["effects"],
                               residuals=o["residuals"], coefficients=o["coefficients"],
                               progress=prog,
                               **({"survey": survey} if survey else {}),
                               **({"outcomes": o["outcomes"]} if o.get("outcomes") else {}),
                               **({"backend": "dask", "client": client, "npartitions": args.partitions}
                                  if client is not None else {}))
        return _fit_groups(args, argv, fitter, df, t0, prog, survey=o["survey"])
    finally:
        if client is not None:
            client.close()


def _by_subpop(df, by, val, survey):
    """With survey options, a --by group is a subpopulation of the whole design
    (its rows' estimates, standard errors from all PSUs): the data with a 0/1
    column marking the group (within --subpop, if given) and the design."""
    import polars as pl
    from dataclasses import replace
    from ..data.weights import subpop_mask
    col = df[by]
    ing = (col.is_null() if val is None else (col == val).fill_null(False)).to_numpy()
    if survey.subpop is not None:
        ing = ing & subpop_mask(df, survey.subpop)
    return (df.with_columns(pl.Series(BY_SUBPOP, ing)), replace(survey, subpop=BY_SUBPOP),
            int(ing.sum()))


BY_SUBPOP = "__mlsem_by_group"


def _fit_groups(args, argv, fitter, df, t0, prog, survey=None) -> int:
    import polars as pl
    t_read = time.perf_counter() - t0
    schema = {"name": pl.String, "estimate": pl.Float64, "std_err": pl.Float64, "z": pl.Float64,
              "p_value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
    if args.by:
        groups = df.partition_by(args.by, as_dict=True, maintain_order=True)
        keys = sorted(groups, key=lambda k: (k[0] is None, k[0]))
    else:
        groups = {(None,): df if df is not None else args.data}
        keys = [(None,)]
    tables, fits, any_bad, errors = [], [], False, []
    for gi, key in enumerate(keys):
        val = key[0]
        gsurvey = None
        if args.by and survey is not None:
            gdf, gsurvey, nrows = _by_subpop(df, args.by, val, survey)
        else:
            gdf = groups[key].drop(args.by) if args.by else groups[key]
            nrows = gdf.height if args.by else 0
        if args.by:
            prog.prefix = f"{args.by}={val}: "
            prog.say(f"group {gi + 1}/{len(keys)}, {nrows:,} rows"
                     + (" (a subpopulation of the whole design)" if gsurvey is not None else ""))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                if args.by:     # a warning names its group, as an error does
                    warnings.showwarning = (lambda message, *a, _p=f"{args.by}={val}: ", **k: print(
                        f"mlsem fit: {_p}warning: {message}", file=sys.stderr))
                res = fitter(gdf, gsurvey) if gsurvey is not None else fitter(gdf)
                if not args.syntax:
                    _intervals(args, res, prog)
        except Exception as exc:  # noqa: BLE001 - one failing group must not lose the others
            if not args.by:
                raise
            any_bad = True
            if isinstance(exc, MlsemError):
                errors.append(exc)
            msg = f"error: {exc}" if isinstance(exc, MlsemError) else f"error: internal: {type(exc).__name__}: {exc}"
            prog.say(msg)
            # one row saying why, in the columns of a parameter table
            tables.append(pl.DataFrame({**{c: [None] for c in schema}, "status": [msg]},
                                       schema={**schema, "status": pl.String}))
            fits.append({args.by: val, "status": msg})
            continue
        st = _status(res)
        any_bad |= st != "ok"
        prog.say(f"loglik {res.loglik:.6f}, {res.opt.iterations} iterations, {st} "
                 f"({sum(res.timings.values()):.2f}s)")
        tab = (_table(res) if not args.syntax else res.params).with_columns(pl.lit(st).alias("status"))
        tables.append(tab)
        rec = _fit_record(res)
        if args.by:
            rec = {args.by: val, **rec}
        fits.append(rec)
        if not args.quiet and not args.by:
            print(res.summary())
        if not args.quiet and args.by:
            print(f"\n== {args.by} = {val} ==")
            print(res.summary())
    prog.prefix = ""
    if args.by and errors and len(errors) == len(keys):
        # every group refused the same way: bad input, not a partial result
        raise errors[0]
    out = pl.concat(tables, how="diagonal_relaxed")
    if args.by:
        byvals = [k[0] for k in keys]
        lens = [t.height for t in tables]
        bycol = pl.Series(args.by, [v for v, n in zip(byvals, lens) for _ in range(n)],
                          dtype=df.schema[args.by])
        out = out.with_columns(bycol).select([args.by, *out.columns])
    code = EXIT_FLAGGED if any_bad else EXIT_OK
    timings = {"read": t_read, "total": time.perf_counter() - t0}
    record = {"mlsem_version": __version__, "command": _command_line(argv),
              "data": args.data, "formula": args.formula, "syntax": args.syntax,
              "effects": _parsed(args, "effects"), "residuals": _parsed(args, "residuals"),
              "coefficients": _parsed(args, "coefficients"),
              "vce": args.vce or (("robust" if args.weights else "oim") if args.syntax else "mixed"), "weights": args.weights,
              "method": args.method, "df": args.df, "ci": args.ci, "bootstrap": args.bootstrap,
              "seed": args.seed, "index": args.index, "dask": args.dask,
              "partitions": args.partitions, "exit_code": code}
    if args.by:
        record.update({"by": args.by, "ngroups": len(keys),
                       "failed": [f[args.by] for f in fits if f["status"] != "ok"], "fits": fits})
    else:
        fr = dict(fits[0])
        fr["timings"] = dict(fr.get("timings", {}), **timings)
        record.update({k: v for k, v in fr.items() if k not in record})
    record["timings_total"] = timings
    text = json.dumps(record, indent=2, default=_json_default)
    _write_parquet(out, args.out, "--out")
    prog.say(f"wrote {args.out} ({out.height} rows)")
    if args.json:
        _write_text(text, args.json, "--json")
        prog.say(f"wrote {args.json}")
    if code:
        bad = [f for f in fits if f["status"] != "ok"]
        for f in bad:
            who = f"{args.by}={f[args.by]}: " if args.by else ""
            print(f"mlsem fit: {who}{f['status']}", file=sys.stderr)
    return code
