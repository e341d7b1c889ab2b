"""Parsing of the command line's option values: the relaxations (--effects,
--residuals, --coefficients; grammar below and in RELAX_HELP of
mlsem.cli.main), --vce, and the values of simulate and diagram options.
"""
from __future__ import annotations

from ..errors import MlsemError


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


# ---- simulate and diagram option values ------------------------------------------
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


def _design(text: str):
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise MlsemError(f"--design {text!r}: expected group sizes such as 2x2 (schools x pupils)")
    return sizes


def parse_outcomes(items):
    """--outcomes LEVEL=STRUCTURE (repeatable; LEVEL a grouping column or 'residual',
    STRUCTURE unstructured | independent) -> the ``outcomes=`` dict of mlsem.fit, or None."""
    if not items:
        return None
    out = {}
    for text in items:
        for key, val in _key_values(text, "--outcomes"):
            if key in out:
                raise _bad("--outcomes", text, f"{key!r} is given twice")
            out[key] = val
    return out

