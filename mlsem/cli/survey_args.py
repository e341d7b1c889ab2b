"""cli layer: the survey options of ``mlsem fit`` (issue 17) -> an
mlsem.SurveyDesign.

    --weight LEVEL=COLUMN   (repeated; LEVEL a grouping column of the formula or obs)
    --scale none|size|effective
    --strata COL  --psu COL  --fpc COL|NUMBER
    --singleton fail|certainty|scaled|centered
    --subpop COL|"SQL EXPRESSION"
"""
from __future__ import annotations

import re

from ..errors import MlsemError
from ..spec.survey import SCALES, SINGLETONS, SurveyDesign

SURVEY_OPTS = ("weight", "scale", "strata", "psu", "fpc", "singleton", "subpop")


def add_survey_arguments(parser) -> None:
    g = parser.add_argument_group("survey design (pseudo-ML with weights at every level, "
                                  "design-based standard errors; docs/survey.md)")
    g.add_argument("--weight", action="append", metavar="LEVEL=COLUMN", default=None,
                   help="conditional sampling weight of a level: LEVEL is a grouping column of the "
                        "formula (e.g. k) or obs; repeat for several levels")
    g.add_argument("--scale", choices=SCALES, default=None,
                   help="scaling of the weights below the top level within their parent unit "
                        "(default none)")
    g.add_argument("--strata", metavar="COL", help="stratum of each top-level unit")
    g.add_argument("--psu", metavar="COL",
                   help="primary sampling unit (default: the top-level units; else a column nesting them)")
    g.add_argument("--fpc", metavar="COL|NUMBER",
                   help="finite-population correction: population number of PSUs per stratum, or a "
                        "sampling fraction <= 1 (a column or one number)")
    g.add_argument("--singleton", choices=SINGLETONS, default=None,
                   help="strata with one PSU: fail (default), certainty, scaled, centered")
    g.add_argument("--subpop", metavar="COL|EXPR",
                   help='subpopulation: a boolean or 0/1 column, or an SQL expression such as "x1 > 0"')


def survey_requested(args) -> bool:
    return any(getattr(args, o, None) is not None for o in SURVEY_OPTS)


def survey_from_args(args) -> SurveyDesign | None:
    """The SurveyDesign the options describe, or None when none is given."""
    if not survey_requested(args):
        return None
    weights = {}
    for item in args.weight or []:
        level, sep, col = item.partition("=")
        level, col = level.strip(), col.strip()
        if not sep or not level or not col:
            raise MlsemError(f"--weight {item!r}: expected LEVEL=COLUMN, e.g. --weight k=w_k or "
                             "--weight obs=w_i")
        if level in weights:
            raise MlsemError(f"--weight: level {level!r} is given twice")
        weights[level] = col
    fpc = args.fpc
    if fpc is not None:
        try:
            fpc = float(fpc)
        except ValueError:
            pass
    return SurveyDesign(weights=weights, scale=args.scale or "none", strata=args.strata,
                        psu=args.psu, fpc=fpc, singleton=args.singleton or "fail",
                        subpop=args.subpop)


def survey_data_columns(design) -> list:
    """The data columns a design reads (to read them with the model's)."""
    if design is None:
        return []
    from ..data.weights import subpop_columns
    cols = list(design.weights.values())
    cols += [c for c in (design.strata, design.psu) if c]
    if isinstance(design.fpc, str):
        cols.append(design.fpc)
    cols += subpop_columns(design.subpop)
    return list(dict.fromkeys(cols))


def check_survey_cli(args, design) -> None:
    """Options the command line refuses with a survey design, before any work."""
    if design is None:
        return
    for opt, given in (("--dask", args.dask), ("--ci", args.ci), ("--bootstrap", args.bootstrap)):
        if given:
            why = {"--dask": "survey designs are fitted in one process",
                   "--ci": "profile and bootstrap intervals are not valid under the design (Wald "
                           "intervals on the design df are)",
                   "--bootstrap": "the parametric bootstrap simulates from the model, not the design"}[opt]
            raise MlsemError(f"{opt} with the survey options (--weight, --strata, --psu, --fpc, "
                             f"--subpop, ...): {why}")


_PY_OPT = re.compile(r"\b(singleton|scale|strata|psu|fpc|subpop)=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;:)]+))")


def cli_wording(msg: str) -> str:
    """A survey message of the Python API in command-line terms:
    ``singleton='certainty'`` -> ``--singleton certainty``, ``SurveyDesign:`` ->
    ``survey options:``."""
    msg = msg.replace("singleton='certainty', 'scaled' or 'centered'",
                      "--singleton certainty, scaled or centered")

    def opt(m):
        val = next(g for g in m.groups()[1:] if g is not None)
        if m.group(1) == "subpop" and (" " in val or not val):
            val = f'"{val}"'
        return f"--{m.group(1)} {val}"
    msg = _PY_OPT.sub(opt, msg)
    msg = re.sub(r"SurveyDesign\(weights=\{'?([\w]+)'?: (?:'?([\w]+)'?|column)\}\)",
                 lambda m: f"--weight {m.group(1)}={m.group(2) or 'COLUMN'}", msg)
    return msg.replace("SurveyDesign: ", "survey options: ")
