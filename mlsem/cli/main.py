"""Command line (``mlsem`` and ``python -m mlsem``).

    mlsem fit DATA (--formula F [RELAX] | --syntax MODEL.lav) [--vce mixed|oim|robust|cluster:COL]
              [--weights COL] [--method ml|reml|adf] [--dask ADDRESS [--partitions N]]
              [--index COL] [--by COL] --out RES.parquet [--json FIT.json]
              [--df satterthwaite|kenward-roger] [--ci profile|bootstrap] [--bootstrap N] [--seed S]
              [--weight LEVEL=COL ...] [--scale none|size|effective] [--strata COL] [--psu COL]
              [--fpc COL|NUMBER] [--singleton fail|certainty|scaled|centered] [--subpop COL|EXPR]
              [--outcomes LEVEL=independent ...]   (--formula once per outcome: several outcomes)
    mlsem simulate --counties N --schools A-B --pupils A-B [...] --out DATA.parquet
    mlsem ranef DATA --formula F [RELAX] --out EFFECTS.parquet   (--formula once per outcome: several)
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

This module holds the other subcommands, the parser and main(); ``mlsem fit``
is mlsem.cli.fit, option values are parsed in mlsem.cli.options, progress,
outputs and the exit codes live in mlsem.cli.output.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import __version__
from ..errors import ConvergenceWarning, MlsemError
from .fit import _cmd_fit, _option_names, _read, refuse_outcomes_one_formula
from .survey_args import cli_wording, survey_requested
from .options import _design, _int_range, _matrix, _relax_options, parse_outcomes
from .survey_args import add_survey_arguments
from .output import (EXIT_FLAGGED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Progress,
                     _check_out, _check_outputs_not_inputs, _status, _write, _write_parquet, _write_text)


# ---- simulate -------------------------------------------------------------------
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
    if isinstance(args.formula, list):          # several outcomes (ranef, predict)
        given = [o for o, v in (("--effects", args.effects), ("--residuals", args.residuals),
                                ("--coefficients", args.coefficients)) if v]
        if given:
            raise MlsemError(f"{given[0]}: not supported with several outcomes (--formula given "
                             f"{len(args.formula)} times) yet")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return fit(args.data, args.formula, index=args.index,
                       outcomes=parse_outcomes(args.outcomes), progress=prog)
    refuse_outcomes_one_formula(args)
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
    what = res.outcome if isinstance(args.formula, list) else args.formula.split('~')[0].strip()
    prog.say(f"loglik {res.loglik:.6f}, {_status(res)}; predicting {what} on {where}")
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


def outcomes_option(sp):
    sp.add_argument("--outcomes", action="append", metavar="LEVEL=independent",
                    help="with --formula given once per outcome: the covariance across outcomes of "
                         "LEVEL (a grouping column, or 'residual' for the residuals of one unit) is "
                         "'unstructured' (the default) or 'independent' (0); repeatable, or "
                         "LEVEL=...,LEVEL=... (mlsem.fit's outcomes=)")


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
            sp.add_argument("--formula", "-f", required=True, action="append",
                            help='lme4 formula, e.g. "y ~ x + (1 | k/j)"')
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr, no tables on stdout")

    f = sub.add_parser("fit", help="fit a model; write the parameter table (Parquet) and the fit record (JSON)",
                       epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(f, formula=False)
    outcomes_option(f)
    f.add_argument("--formula", "-f", action="append",
                   help='lme4 formula, e.g. "y ~ x + (1 | k/j)" (or --syntax); given once per outcome '
                        'for several outcomes fitted jointly (mlsem.fit with a list of formulas)')
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
    add_survey_arguments(f)
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
    re_.set_defaults(several_formulas=True)
    outcomes_option(re_)
    re_.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    re_.add_argument("--out", "-o", required=True, metavar="EFFECTS.parquet",
                     help="one row per unit and effect: level, effect, the unit's ids, latent, mean, sd")
    re_.set_defaults(func=_cmd_ranef)

    pr = sub.add_parser("predict", help="predicted outcome x'beta + z'b (BLUPs of known groups), on the "
                                        "estimation rows or on --newdata",
                        epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(pr)
    relax_options(pr)
    pr.set_defaults(several_formulas=True)
    outcomes_option(pr)
    pr.add_argument("--index", metavar="COL", help="column ordering observations within the innermost group")
    pr.add_argument("--newdata", metavar="FILE", help="predict on the rows of FILE (Parquet or CSV)")
    pr.add_argument("--population", action="store_true",
                    help="population level x'beta (no random effects)")
    pr.add_argument("--se", action="store_true", help="add the standard error of x'beta")
    pr.add_argument("--out", "-o", required=True, metavar="PREDICTIONS.parquet",
                    help="the id columns, row (without --newdata), predicted (and se); with "
                         "several --formula, one row per (row, outcome)")
    pr.set_defaults(func=_cmd_predict)

    d = sub.add_parser("diagram", help="path diagram of the model (DOT; SVG/PNG/PDF through Graphviz)",
                       epilog=RELAX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("data", metavar="DATA", nargs="?",
                   help="optional: fit the model on DATA and put the estimates on the paths")
    d.add_argument("--formula", "-f", required=True, action="append", help='lme4 formula, e.g. "y ~ x + (1 | k/j)"')
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


def _formulas(args):
    """--formula is repeatable: one formula stays a string; several (one per outcome) are a
    list, which only ``mlsem fit`` accepts."""
    f = getattr(args, "formula", None)
    if isinstance(f, list):
        if len(f) == 1:
            args.formula = f[0]
        elif not getattr(args, "several_formulas", False) and args.command != "fit":
            raise MlsemError(f"--formula given {len(f)} times: several outcomes are supported by "
                             f"`mlsem fit`, `mlsem ranef` and `mlsem predict` only, not by "
                             f"`mlsem {args.command}`")


def _warning_printer(command: str):
    """Warnings on stderr as the command's own lines ("mlsem fit: warning: ..."),
    not Python's file:line form."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"mlsem {command}: warning: {message}", file=sys.stderr if file is None else file)
    return show


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command)
            _formulas(args)
            _check_outputs_not_inputs(args)
            return args.func(args, argv)
    except MlsemError as exc:
        msg = str(exc)
        if survey_requested(args):
            msg = cli_wording(msg)
        print(f"mlsem {args.command}: error: {msg}", file=sys.stderr)
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
