"""Command line (``mlsem`` and ``python -m mlsem``).

    mlsem fit DATA (--formula F [RELAX] | --syntax MODEL.lav) [--vce mixed|oim|robust|cluster:COL]
              [--weights COL] [--method ml|reml|adf] [--dask ADDRESS [--partitions N]]
              [--index COL] [--by COL] --out RES.parquet [--json FIT.json]
              [--df satterthwaite|kenward-roger] [--ci profile|bootstrap] [--bootstrap N] [--seed S]
    mlsem simulate --counties N --schools A-B --pupils A-B [...] --out DATA.parquet
    mlsem ranef DATA --formula F [RELAX] --out EFFECTS.parquet
    mlsem predict DATA --formula F [RELAX] [--newdata FILE] [--population] [--se] --out PRED.parquet
    mlsem diagram [DATA] --formula F [RELAX] --out MODEL.dot|.svg|.png|.pdf
    mlsem wide DATA --formula F --out WIDE.parquet [--syntax-out MODEL.lav]

RELAX = [--effects LEVEL:KEY=VALUE[,...]]... [--residuals KEY=VALUE[,...]]
        [--coefficients COVARIATE=LEVEL]... (grammar: RELAX_HELP below)
    mlsem example

Exit codes: 0 success; 1 the fit ran but did not converge or is not
identified, or a ``--by`` group failed (results written and flagged); 2 bad
input or usage (message on stderr, nothing written, earlier outputs intact);
3 an internal error (a bug: traceback on stderr, nothing written); 130
interrupted (Ctrl-C; nothing written).
Outputs are written atomically (temporary file, then rename).  Progress goes
to stderr (``--quiet`` silences it); tables for humans go to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import warnings

from .. import __version__
from ..errors import ConvergenceWarning, MlsemError

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell convention 128 + SIGINT
STATUS_COLUMNS = ("name", "estimate", "std_err", "z", "p_value", "ci_low", "ci_high")


# ---- progress -----------------------------------------------------------------
class Progress:
    """Progress lines on stderr: stage messages always (unless quiet), the
    optimizer's iterations at most once a second."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.prefix = ""

    def say(self, msg: str) -> None:
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{el:7.1f}s] {self.prefix}{msg}", file=sys.stderr, flush=True)

    def prepared(self, prep) -> None:
        lv = ", ".join(f"{x.ngroups:,} {x.name}" for x in prep.levels)
        self.say(f"reshaped: {prep.nobs:,} observations, {lv}; {prep.nslots:,} slots, "
                 f"{prep.npatterns:,} missing patterns")
        self._last = time.perf_counter()

    def stage(self, what: str) -> None:
        self.say(what)

    def __call__(self, it: int, loglik: float) -> None:
        now = time.perf_counter()
        if now - self._last >= 1.0:
            self._last = now
            self.say(f"optimizer iteration {it}: loglik {loglik:.6f}")


# ---- helpers ------------------------------------------------------------------
def _check_out(path: str, option: str, suffixes=None) -> None:
    """Refuse an output path that cannot be written, before any work."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise MlsemError(f"{option} {path!r}: the file name must end with {' or '.join(suffixes)}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise MlsemError(f"{option} {path!r}: directory {d!r} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise MlsemError(f"{option} {path!r}: directory {d!r} is not writable")
    if os.path.isdir(path):
        raise MlsemError(f"{option} {path!r} is a directory")


# options that name files mlsem writes, and files or directories it reads
_OUTPUTS = (("out", "--out"), ("json", "--json"), ("syntax_out", "--syntax-out"))
_INPUTS = (("data", "DATA"), ("syntax", "--syntax"), ("newdata", "--newdata"))


def _input_files(spec: str) -> list:
    """The files an input argument reads: the file, a directory's files, a glob's matches."""
    import glob
    if os.path.isdir(spec):
        return [os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs]
    if any(ch in spec for ch in "*?["):
        return glob.glob(spec, recursive=True)
    return [spec]


def _check_outputs_not_inputs(args) -> None:
    """Refuse, before any work, an output path that is one of the inputs (or
    lies in an input directory, or matches an input glob): writing it would
    destroy the data being read."""
    import fnmatch
    outs = [(opt, getattr(args, a)) for a, opt in _OUTPUTS if getattr(args, a, None)]
    ins = [(opt, getattr(args, a)) for a, opt in _INPUTS if isinstance(getattr(args, a, None), str)]
    for opt, out in outs:
        real = os.path.realpath(out)
        for iopt, spec in ins:
            clash = (os.path.isdir(spec) and real.startswith(os.path.realpath(spec) + os.sep)) or \
                (any(ch in spec for ch in "*?[") and fnmatch.fnmatch(real, os.path.realpath(spec)))
            clash = clash or any(os.path.realpath(f) == real for f in _input_files(spec))
            if clash:
                raise MlsemError(f"{opt} {out!r} is the input {iopt} {spec!r} (or inside it): "
                                 "refusing to overwrite the data being read; choose another output path")
    seen = {}
    for opt, out in outs:
        real = os.path.realpath(out)
        if real in seen:
            raise MlsemError(f"{opt} {out!r} and {seen[real]} name the same file")
        seen[real] = opt


def _write(path: str, option: str, write) -> None:
    from ..results.fitresult import atomic_write
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise MlsemError(f"{option} {path!r}: cannot write: {exc.strerror or exc}") from None


def _write_parquet(df, path, option):
    _write(path, option, lambda tmp: df.write_parquet(tmp))


def _write_text(text, path, option):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _write(path, option, w)


def _command_line(argv) -> str:
    return shlex.join(["mlsem"] + list(argv if argv is not None else sys.argv[1:]))


def _status(res) -> str:
    if not res.converged:
        return f"not converged: {res.opt.message}"
    if not res.identified:
        return f"not identified: confounded {', '.join(res.confounded)}"
    return "ok"


def _json_default(o):
    from ..results.fitresult import _json_default as default
    return default(o)


def _fit_record(res) -> dict:
    d = res.to_dict()
    d["tests"] = {"lr_vs_linear_regression": d.get("lr_test_vs_linear_regression", {}),
                  "wald_fixed_effects": d.get("wald_fixed", {})}
    if res.method == "ADF":
        d["tests"]["adf_vs_saturated"] = res.fit_test()
    d["status"] = _status(res)
    return d



# ---- relaxation and inference options -------------------------------------------
# Grammar (labels are the id values of a level's slots, as relax names them):
#   --effects LEVEL:KEY=VALUE[,KEY=VALUE]         (repeatable; one LEVEL per use or merged)
#       variance=slot | common | GROUPS
#       covariance=none | unstructured | equal | PAIRS | GROUPS
#       PAIRS  = a-b[;c-d...]              e.g. 1-2;1-3
#       GROUPS = name=a+b[+c...][;name=...]  e.g. north=1+2+3;south=4+5
#   --residuals KEY=VALUE[,KEY=VALUE]    variance=LEVEL (or the --index column),
#                                        correlation=independent|ar1|exchangeable|unstructured
#   --coefficients COVARIATE=LEVEL       (repeatable)
# Labels may not contain , ; = + or - (those are the grammar's separators).
_EFFECT_WORDS = {"variance": ("slot", "common"), "covariance": ("none", "unstructured", "equal")}


def _bad(option, piece, why):
    return MlsemError(f"{option} {piece!r}: {why}")


def _label_list(text, option, piece, sep):
    labs = [v.strip() for v in text.split(sep)]
    if any(not v for v in labs):
        raise _bad(option, piece, f"empty slot label in {text!r}")
    return labs


def _groups_value(text, option, piece):
    out = {}
    for g in text.split(";"):
        name, eq, members = g.partition("=")
        name = name.strip()
        if not eq or not name or not members.strip():
            raise _bad(option, piece, f"group {g!r} is not NAME=LABEL+LABEL...")
        if name in out:
            raise _bad(option, piece, f"group {name!r} is given twice")
        out[name] = _label_list(members, option, piece, "+")
    return out


def _pairs_value(text, option, piece):
    pairs = []
    for pr in text.split(";"):
        ab = [v.strip() for v in pr.split("-")]
        if len(ab) != 2 or not all(ab):
            raise _bad(option, piece, f"pair {pr!r} is not LABEL-LABEL (e.g. 1-2)")
        pairs.append(tuple(ab))
    return pairs


def _key_values(text, option):
    """'a=1,b=2' -> [(a, '1'), (b, '2')], naming the bad piece."""
    out = []
    for piece in text.split(","):
        key, eq, val = piece.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or not key or not val:
            raise _bad(option, text, f"{piece!r} is not KEY=VALUE")
        if key in dict(out):
            raise _bad(option, text, f"{key!r} is given twice")
        out.append((key, val))
    return out


def parse_effects(items, levels=None):
    """The ``effects=`` dict of :func:`mlsem.fit` from the --effects values."""
    option = "--effects"
    if not items:
        return None
    out = {}
    for text in items:
        level, colon, rest = text.partition(":")
        level = level.strip()
        if not colon or not level or not rest.strip():
            raise _bad(option, text, "expected LEVEL:KEY=VALUE[,KEY=VALUE], e.g. j:variance=slot")
        if levels is not None and level not in levels:
            raise _bad(option, text, f"unknown level {level!r} (levels below the top: "
                                     f"{', '.join(map(repr, levels)) or 'none'})")
        spec = out.setdefault(level, {})
        for piece in rest.split(","):
            key, eq, val = piece.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not key or not val:
                raise _bad(option, text, f"{piece!r} is not KEY=VALUE")
            if key not in _EFFECT_WORDS:
                raise _bad(option, text, f"unknown key {key!r} (keys: variance, covariance)")
            if key in spec:
                raise _bad(option, text, f"{key!r} is given twice for level {level!r}")
            if val in _EFFECT_WORDS[key]:
                spec[key] = val
            elif "=" in val:
                spec[key] = _groups_value(val, option, piece)
            elif key == "covariance" and "-" in val:
                spec[key] = _pairs_value(val, option, piece)
            else:
                words = " | ".join(_EFFECT_WORDS[key])
                form = "LABEL-LABEL;... | " if key == "covariance" else ""
                raise _bad(option, text, f"{key}={val!r} is not {words} | {form}NAME=LABEL+LABEL;...")
    return out


def parse_residuals(text, levels=None, index=None):
    option = "--residuals"
    if not text:
        return None
    from ..spec.relax import CORRELATIONS
    out = {}
    for key, val in _key_values(text, option):
        if key == "variance":
            if levels is not None and val not in levels and val != index:
                raise _bad(option, text, f"variance={val!r}: not a level below the top "
                                         f"({', '.join(map(repr, levels)) or 'none'})"
                                         + (f" nor the --index column {index!r}" if index else ""))
        elif key == "correlation":
            if val not in CORRELATIONS:
                raise _bad(option, text, f"correlation={val!r} is not one of {', '.join(CORRELATIONS)}")
        else:
            raise _bad(option, text, f"unknown key {key!r} (keys: variance, correlation)")
        out[key] = val
    return out


def parse_coefficients(items, levels=None, terms=None):
    option = "--coefficients"
    if not items:
        return None
    out = {}
    for text in items:
        for cov, lev in _key_values(text, option):
            if terms is not None and cov not in terms:
                raise _bad(option, text, f"{cov!r} is not a fixed term of the formula "
                                         f"({', '.join(map(repr, terms))})")
            if levels is not None and lev not in levels:
                raise _bad(option, text, f"unknown level {lev!r} (levels below the top: "
                                         f"{', '.join(map(repr, levels)) or 'none'})")
            if cov in out:
                raise _bad(option, text, f"{cov!r} is given twice")
            out[cov] = lev
    return out


def parse_vce(text):
    """'mixed' | 'oim' | 'robust' | 'cluster:COL' -> what fit(vce=) takes."""
    if text in ("mixed", "oim", "robust"):
        return text
    kind, colon, col = text.partition(":")
    if kind == "cluster":
        if not col.strip():
            raise _bad("--vce", text, "name the cluster column: cluster:COLUMN")
        return ("cluster", col.strip())
    raise _bad("--vce", text, "expected mixed, oim, robust or cluster:COLUMN")


def _relax_options(args, F):
    """Parse --effects/--residuals/--coefficients against the formula's levels."""
    from ..spec.formula import nest_levels
    below = [lv[-1] for lv in nest_levels(F)][1:]
    # the design's column names are known once the data are encoded (mlsem.data.encode);
    # before that, fit() checks --coefficients against them
    terms = ((["Intercept"] if F.intercept else []) + list(F.fixed)) if F.encoded else None
    return (parse_effects(getattr(args, "effects", None), below),
            parse_residuals(getattr(args, "residuals", None), below, getattr(args, "index", None)),
            parse_coefficients(getattr(args, "coefficients", None), below, terms))


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
    from ..model.sem import sem_table
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
    extra = [c for c in (args.by, args.weights, vce[1] if isinstance(vce, tuple) else None)
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
    if args.syntax:
        given = [o for o, v in (("--effects", args.effects), ("--residuals", args.residuals),
                                ("--coefficients", args.coefficients),
                                ("--index", args.index), ("--dask", args.dask),
                                ("--df", args.df), ("--ci", args.ci),
                                ("--bootstrap", args.bootstrap)) if v]
        if args.method == "reml":
            given.append(f"--method {args.method}")
        if given:
            raise MlsemError(f"--syntax: {given[0]} applies to --formula models only (write the "
                             "structure into the syntax instead)")
        if vce == "mixed":
            raise MlsemError(f"--vce {args.vce}: --syntax models support --vce oim, robust or cluster:COL")
        cluster = vce[1] if isinstance(vce, tuple) else None
        for opt, col in (("--weights", args.weights), ("--vce cluster:", cluster)):
            if args.by and col == args.by:
                raise MlsemError(f"--by {args.by!r} is also the {opt} column; give another column")
        return {"vce": vce, "cluster": cluster}
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
    return {"F": F, "vce": vce, "cluster": cluster, **args.parsed}


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


def _table(res):
    """The parameter table with the chosen intervals (profile or bootstrap) in
    ci_low/ci_high, ``ci_kind`` saying which, bootstrap std. errors beside."""
    import polars as pl
    tab = res.params
    if res.ci_table is not None:
        ci = res.ci_table.rename({"lower": "ci_low", "upper": "ci_high"})
        tab = tab.drop("ci_low", "ci_high").join(ci, on="name", how="full", coalesce=True,
                                                   maintain_order="left")
    if res.ci_kind != "wald":
        listed = res.ci_table["name"] if res.ci_table is not None else tab["name"]
        tab = tab.with_columns(pl.when(pl.col("name").is_in(listed.implode()))
                               .then(pl.lit(res.ci_kind)).otherwise(pl.lit("wald")).alias("ci_kind"))
    if res.boot is not None:
        se = res.boot.std_err
        tab = tab.with_columns(pl.col("name").replace_strict(se, default=None,
                                                              return_dtype=pl.Float64).alias("boot_se"))
    return tab


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
            from ..api.bridge import sem
            text, df = _read_syntax(args, prog)

            def fitter(data):
                return sem(text, data, vce=o["vce"], method=args.method, weights=args.weights,
                           progress=prog)
        else:
            if args.dask:
                from ..backends.dask import connect
                prog.say(f"connecting to the Dask scheduler at {args.dask}")
                client = connect(args.dask)
            if args.dask and not args.by:
                df = None       # the workers read the data themselves
            else:
                _, df = _read(args, [args.index, args.by, args.weights, o["cluster"]], prog)

            def fitter(data):
                with _option_names():
                        return fit(data, args.formula, index=args.index, vce=o["vce"],
                               weights=args.weights, method=args.method, df=args.df,
                               effects=o["effects"],
                               residuals=o["residuals"], coefficients=o["coefficients"],
                               progress=prog,
                               **({"backend": "dask", "client": client, "npartitions": args.partitions}
                                  if client is not None else {}))
        return _fit_groups(args, argv, fitter, df, t0, prog)
    finally:
        if client is not None:
            client.close()


def _fit_groups(args, argv, fitter, df, t0, prog) -> int:
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
        gdf = groups[key].drop(args.by) if args.by else groups[key]
        val = key[0]
        if args.by:
            prog.prefix = f"{args.by}={val}: "
            prog.say(f"group {gi + 1}/{len(keys)}, {gdf.height:,} rows")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fitter(gdf)
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


# ---- simulate -------------------------------------------------------------------
def _int_range(text: str, option: str):
    parts = text.strip().split("-")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2):
        raise MlsemError(f"{option} {text!r}: expected a count such as 2 or a range such as 1-10")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _matrix(text: str, option: str):
    try:
        rows = [[float(v) for v in r.split(",")] for r in text.split(";")]
    except ValueError:
        raise MlsemError(f"{option} {text!r}: expected rows of numbers such as \"1.5,0.6;0.6,1.0\"") from None
    if any(len(r) != len(rows) for r in rows):
        raise MlsemError(f"{option} {text!r}: the matrix is not square ({len(rows)} rows)")
    return rows


def _cmd_simulate(args, argv) -> int:
    from ..data.simulate import simulate
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq", ".csv"))
    cov = _matrix(args.school_cov, "--school-cov") if args.school_cov else None
    df = simulate(args.counties, _int_range(args.schools, "--schools"), _int_range(args.pupils, "--pupils"),
                  intercept=args.intercept, slope=args.slope, sd_county=args.sd_county,
                  sd_school=args.sd_school, sd_resid=args.sd_resid, school_cov=cov, x=args.x,
                  seed=args.seed, regions=args.regions)
    prog.say(f"simulated {df.height:,} pupils in {df.select('k', 'j').n_unique():,} schools "
             f"in {args.counties:,} counties")
    if args.out.lower().endswith(".csv"):
        _write(args.out, "--out", lambda tmp: df.write_csv(tmp))
    else:
        _write_parquet(df, args.out, "--out")
    prog.say(f"wrote {args.out}")
    return EXIT_OK


# ---- ranef, predict ------------------------------------------------------------------
def _fit_for(args, prog):
    from ..api.fitting import fit
    from ..spec.formula import parse_formula
    _check_out(args.out, "--out", (".parquet", ".pq"))
    effects, residuals, coefficients = _relax_options(args, parse_formula(args.formula))
    F, df = _read(args, [args.index], prog)
    with warnings.catch_warnings(), _option_names():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit(df, args.formula, index=args.index, effects=effects, residuals=residuals,
                  coefficients=coefficients, progress=prog)
    return res


def _write_table(args, prog, res, table, what) -> int:
    _write_parquet(table, args.out, "--out")
    prog.say(f"wrote {args.out} ({table.height:,} rows)")
    if not args.quiet:
        print(table)
    st = _status(res)
    if st != "ok":
        print(f"mlsem {args.command}: the fit is {st}; {what} written but flagged", file=sys.stderr)
        return EXIT_FLAGGED
    return EXIT_OK


def _cmd_ranef(args, argv) -> int:
    from ..results.predict import random_effects
    prog = Progress(args.quiet)
    res = _fit_for(args, prog)
    prog.say(f"loglik {res.loglik:.6f}, {_status(res)}; predicting the random effects")
    return _write_table(args, prog, res, random_effects(res), "random effects")


def _cmd_predict(args, argv) -> int:
    from ..results.predict import predict
    prog = Progress(args.quiet)
    if args.newdata is not None:
        from ..data.prepare import scan
        scan(args.newdata)            # a missing or unreadable file fails before the fit
    res = _fit_for(args, prog)
    where = f"the rows of {args.newdata}" if args.newdata else "the estimation rows"
    prog.say(f"loglik {res.loglik:.6f}, {_status(res)}; predicting {args.formula.split('~')[0].strip()} "
             f"on {where}")
    table = predict(res, args.newdata, random=not args.population, se=args.se)
    return _write_table(args, prog, res, table, "predictions")


# ---- diagram ----------------------------------------------------------------------
def _cmd_diagram(args, argv) -> int:
    from ..results import diagram as dg  # the module (mlsem.diagram is also a function)
    prog = Progress(args.quiet)
    fmt = dg.format_of(args.out)
    _check_out(args.out, "--out")
    if fmt != "dot" and not dg.have_graphviz():
        raise MlsemError(dg.NO_GRAPHVIZ.format(out=args.out))
    from ..spec.formula import parse_formula
    effects, residuals, coefficients = _relax_options(args, parse_formula(args.formula))
    code = EXIT_OK
    if args.data:
        from ..api.fitting import fit
        F, df = _read(args, [args.index], prog)
        with warnings.catch_warnings(), _option_names():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = fit(df, args.formula, index=args.index, effects=effects, residuals=residuals,
                      coefficients=coefficients, progress=prog)
        if _status(res) != "ok":
            code = EXIT_FLAGGED
        src = dg.to_dot(dg.from_result(res), max_slots=args.max_slots)
    else:
        design = _design(args.design)
        with _option_names():
            dm = dg.from_formula(args.formula, design, effects=effects, residuals=residuals,
                                 coefficients=coefficients, index=args.index)
        src = dg.to_dot(dm, max_slots=args.max_slots)
    dg.write(src, args.out)
    prog.say(f"wrote {args.out}")
    return code


def _design(text: str):
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise MlsemError(f"--design {text!r}: expected group sizes such as 2x2 (schools x pupils)")
    return sizes


# ---- wide -----------------------------------------------------------------------------
def _cmd_wide(args, argv) -> int:
    from ..api.bridge import multilevel
    prog = Progress(args.quiet)
    _check_out(args.out, "--out", (".parquet", ".pq", ".csv"))
    if args.syntax_out:
        _check_out(args.syntax_out, "--syntax-out")
    prog.say(f"reading {args.data}")
    spec = multilevel(args.formula, args.data, index=args.index)
    prog.prepared(spec.prep)
    text = spec.to_syntax() if args.syntax_out else None   # refuses before anything is written
    w = spec.to_wide()
    if args.out.lower().endswith(".csv"):
        _write(args.out, "--out", lambda tmp: w.write_csv(tmp))
    else:
        _write_parquet(w, args.out, "--out")
    prog.say(f"wrote {args.out}: {w.height:,} rows x {w.width:,} columns")
    if text is not None:
        _write_text(text, args.syntax_out, "--syntax-out")
        prog.say(f"wrote {args.syntax_out}: the model in lavaan syntax on these columns "
                 f"(mlsem fit {args.out} --syntax {args.syntax_out})")
    return EXIT_OK


# ---- example ---------------------------------------------------------------------------
def _cmd_example(args, argv) -> int:
    from ..api.fitting import fit
    from ..data.simulate import example_data
    data = example_data()
    print("mlsem example: the seed's design, 100 counties x 2 schools x 2 pupils,")
    print("y = 2 x + U_k + V_jk + E_ijk (all sd 1); model y ~ x + (1 | k/j)\n")
    res = fit(data, "y ~ x + (1 | k/j)")
    print(res.summary())
    return EXIT_OK if res.converged else EXIT_FLAGGED


# ---- parser ----------------------------------------------------------------------------
RELAX_HELP = """relaxations (mlsem.relax; labels are the slot id values of a level):
  --effects LEVEL:KEY=VALUE[,KEY=VALUE]   repeatable
      variance=slot | common | NAME=LABEL+LABEL[;NAME=...]
      covariance=none | unstructured | equal | LABEL-LABEL[;LABEL-LABEL] | NAME=LABEL+LABEL[;...]
      e.g. --effects j:variance=slot,covariance=unstructured
           --effects "j:covariance=1-2;1-3"   --effects "j:variance=north=1+2+3;south=4+5"
  --residuals variance=LEVEL,correlation=independent|ar1|exchangeable|unstructured
      (ar1 and unstructured need --index)
  --coefficients COVARIATE=LEVEL          repeatable: one coefficient per slot label, e.g. x=j
  Labels cannot contain , ; = + or -."""


def relax_options(sp):
    sp.add_argument("--effects", action="append", metavar="LEVEL:KEY=VALUE[,...]",
                    help="free the random effects' equalities at LEVEL (see below; repeatable)")
    sp.add_argument("--residuals", metavar="KEY=VALUE[,...]",
                    help="residual variances by LEVEL and/or a residual correlation (see below)")
    sp.add_argument("--coefficients", action="append", metavar="COVARIATE=LEVEL",
                    help="one coefficient of COVARIATE per slot label of LEVEL (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlsem",
        description="Multilevel (nested) linear random-effects models fitted as structural equation models "
                    "by full-information ML. Parquet or CSV in; a parameter table (Parquet) and a fit record "
                    "(JSON) out. 'mlsem SUBCOMMAND --help' lists a subcommand's options.",
        epilog="exit codes: 0 success; 1 fitted but not converged or not identified, or a --by group failed "
               "(results written, each row flagged); 2 bad input or usage (message on stderr naming the "
               "column/option/value, nothing written); 3 internal error, a bug (traceback on stderr, nothing "
               "written); 130 interrupted (Ctrl-C, nothing written). Outputs are written atomically.")
    p.add_argument("--version", action="version", version=f"mlsem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True, formula=True):
        if data:
            sp.add_argument("data", metavar="DATA", help="Parquet file, directory or glob of Parquet files, or CSV")
        if formula:
            sp.add_argument("--formula", "-f", required=True, help='lme4 formula, e.g. "y ~ x + (1 | k/j)"')
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr, no tables on stdout")

    f = sub.add_parser("fit", help="fit a model; write the parameter table (Parquet) and the fit record (JSON)",
                       epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(f, formula=False)
    f.add_argument("--formula", "-f", help='lme4 formula, e.g. "y ~ x + (1 | k/j)" (or --syntax)')
    f.add_argument("--syntax", metavar="MODEL.lav",
                   help="a model in lavaan syntax on wide data, instead of --formula (mlsem.sem)")
    relax_options(f)
    f.add_argument("--vce", default=None, metavar="mixed|oim|robust|cluster:COL",
                   help="standard errors: mixed (lme4/xtmixed convention, default), oim (observed "
                        "information), robust (sandwich), cluster:COL (clusters of top-level units)")
    f.add_argument("--weights", metavar="COL", help="sampling weights of the top-level units (pseudo-ML)")
    f.add_argument("--method", choices=("ml", "reml", "adf", "gmm"), default="ml",
                   help="ml: maximum likelihood, FIML (default); reml: restricted ML, as lme4's REML = TRUE; "
                        "adf (= gmm): distribution-free weighted least squares, complete data only")
    f.add_argument("--df", choices=("satterthwaite", "kenward-roger"), default=None,
                   help="t tests of the fixed effects on small-sample df (kenward-roger: --method reml)")
    f.add_argument("--ci", choices=("profile", "bootstrap"), default=None,
                   help="confidence intervals: profile likelihood (ML) or bootstrap percentile "
                        "(with --bootstrap N); default Wald")
    f.add_argument("--bootstrap", type=int, metavar="N", default=None,
                   help="parametric bootstrap with N refits (bootstrap std. errors, boot_se)")
    f.add_argument("--seed", type=int, default=None, help="seed of the bootstrap")
    f.add_argument("--dask", metavar="ADDRESS", help="fit on a Dask cluster, e.g. tcp://host:8786")
    f.add_argument("--partitions", type=int, metavar="N",
                   help="with --dask: split the data into N partitions (default: one per worker)")
    f.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    f.add_argument("--by", metavar="COL", help="fit one model per value of COL and stack the tables")
    f.add_argument("--out", "-o", required=True, metavar="RESULTS.parquet",
                   help="the parameter table (name, estimate, std_err, z, p_value, ci_low, ci_high; with "
                        "--by: the group value first and a status per row)")
    f.add_argument("--json", metavar="FIT.json", help="fit record: loglik, convergence, groups, tests, timings")
    f.set_defaults(func=_cmd_fit)

    s = sub.add_parser("simulate", help="simulate the seed's design (pupils in schools in counties)")
    s.add_argument("--counties", type=int, default=100, help="number of counties (top-level units; default 100)")
    s.add_argument("--schools", default="2", help="schools per county: a count or a range such as 1-10")
    s.add_argument("--pupils", default="2", help="pupils per school: a count or a range such as 1-20")
    s.add_argument("--sd-county", type=float, default=1.0, help="standard deviation of the county effect U (default 1)")
    s.add_argument("--sd-school", type=float, default=1.0, help="standard deviation of the school effect V (default 1)")
    s.add_argument("--sd-resid", type=float, default=1.0, help="residual standard deviation (default 1)")
    s.add_argument("--school-cov", metavar='"1.5,0.6;0.6,1.0"',
                   help="covariance of the school effects by slot (replaces --sd-school)")
    s.add_argument("--intercept", type=float, default=0.0, help="intercept of y (default 0)")
    s.add_argument("--slope", type=float, default=2.0, help="coefficient of x (default 2)")
    s.add_argument("--x", choices=("uniform", "normal"), default="uniform",
                   help="distribution of x: uniform on (0, 1) (default) or standard normal")
    s.add_argument("--regions", type=int, help="add a column 'region' splitting the counties into N blocks")
    s.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the same data (default 1)")
    s.add_argument("--out", "-o", required=True, metavar="DATA.parquet",
                   help="the long data: columns k, j, i, x, y (and region)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    s.set_defaults(func=_cmd_simulate)

    re_ = sub.add_parser("ranef", help="empirical Bayes predictions (BLUP, conditional sd) of every random effect",
                         epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(re_)
    relax_options(re_)
    re_.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    re_.add_argument("--out", "-o", required=True, metavar="EFFECTS.parquet",
                     help="one row per unit and effect: level, effect, the unit's ids, latent, mean, sd")
    re_.set_defaults(func=_cmd_ranef)

    pr = sub.add_parser("predict", help="predicted outcome x'beta + z'b (BLUPs of known groups), on the "
                                        "estimation rows or on --newdata",
                        epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(pr)
    relax_options(pr)
    pr.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    pr.add_argument("--newdata", metavar="FILE", help="predict on the rows of FILE (Parquet or CSV)")
    pr.add_argument("--population", action="store_true",
                    help="population level x'beta (no random effects)")
    pr.add_argument("--se", action="store_true", help="add the standard error of x'beta")
    pr.add_argument("--out", "-o", required=True, metavar="PREDICTIONS.parquet",
                    help="the id columns, row (without --newdata), predicted (and se)")
    pr.set_defaults(func=_cmd_predict)

    d = sub.add_parser("diagram", help="path diagram of the model (DOT; SVG/PNG/PDF through Graphviz)",
                       epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("data", metavar="DATA", nargs="?",
                   help="optional: fit the model on DATA and put the estimates on the paths")
    d.add_argument("--formula", "-f", required=True, help='lme4 formula, e.g. "y ~ x + (1 | k/j)"')
    d.add_argument("--design", default="2x2",
                   help="without DATA: group sizes below the top level, e.g. 2x2 = 2 schools x 2 pupils")
    d.add_argument("--max-slots", type=int, default=8,
                   help="draw at most this many slots; more collapse into boxes with a count")
    relax_options(d)
    d.add_argument("--index", metavar="COL",
                   help="the observation order (with DATA: a column; without: the name the template "
                        "design gives its 1, 2, ... observation numbers, for --residuals correlation=ar1)")
    d.add_argument("--out", "-o", required=True, metavar="MODEL.dot|.gv|.svg|.png|.pdf",
                   help="the format from the extension: .dot/.gv (DOT text, needs nothing else); .svg, .png, "
                        ".pdf (need Graphviz's dot program)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    d.set_defaults(func=_cmd_diagram)

    w = sub.add_parser("wide", help="the wide form: one row per top-level unit, one column per slot")
    common(w)
    w.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    w.add_argument("--out", "-o", required=True, metavar="WIDE.parquet",
                   help="one row per top-level unit, columns y{slot} and x{slot} (the model's slots)")
    w.add_argument("--syntax-out", metavar="MODEL.lav",
                   help="also write the model in lavaan syntax on the wide columns (for fit --syntax)")
    w.set_defaults(func=_cmd_wide)

    ex = sub.add_parser("example", help="fit the embedded example data and print the tables")
    ex.set_defaults(func=_cmd_example)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_outputs_not_inputs(args)
        return args.func(args, argv)
    except MlsemError as exc:
        print(f"mlsem {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mlsem {args.command}: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed by the reader (mlsem example | head): not an error; point
        # stdout at /dev/null so that the interpreter's final flush stays quiet
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so, exit 3
        import traceback
        traceback.print_exc()
        print(f"mlsem {args.command}: internal error ({type(exc).__name__}: {exc}); nothing written. "
              "Please report it.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
