"""lme4-style formula parsing (spec layer, first half).

``y ~ x + sex + (1 | k/j)`` becomes a :class:`Formula`: the outcome, the fixed
part, and the random terms with their grouping factors.  Grouping factors are
tuples of id columns, outermost first: ``k/j`` is ``(k,)`` and ``(k, j)``;
``k:j`` is ``(k, j)``.  The parser only reads the text; whether the columns
exist is checked against the data later (mlsem.data.prepare, mlsem.data.encode).

The fixed part is formulaic's grammar (factors, interactions ``a*b``, ``a:b``,
transforms ``log(x)``, ``I(x**2)``, ``poly(x, 2)``, ``center(x)``,
``scale(x)``, ``C(x, contr.treatment(base=...))``, ``0 +`` / ``- 1``): it is
kept as text (``fixed_text``) and encoded into design columns by
:mod:`mlsem.data.encode`, which returns the Formula with ``fixed`` (the design
column names, formulaic's: ``sex[T.M]``), ``intercept`` and the random
slopes' names filled in (``encoded=True``).  The random part is mlsem's own
grammar; a random slope is a numeric column or a transform of one
(``(1 + log(x) | k)``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MlsemError

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class RandomTerm:
    """One ``(effects | group)`` term after expanding ``/``."""
    effects: tuple          # "Intercept" and/or covariate names
    group: tuple            # id columns, outermost first
    correlated: bool        # False for ``||``
    text: str               # the term as written, for messages


@dataclass(frozen=True)
class Formula:
    outcome: str
    intercept: bool         # the design has an intercept column (known before encoding
    fixed: tuple            # for plain column names only); the design column names
    random: tuple           # RandomTerm, in order
    text: str = field(default="", compare=False)
    fixed_text: str = "1"   # the fixed part in formulaic's grammar
    variables: tuple = ()   # data columns the fixed part and the random slopes read
    encoded: bool = False   # fixed/intercept/slope names are the design's (mlsem.data.encode)
    outcome_vars: tuple = ()  # a transformed outcome (log(y) ~ ...): the columns it reads

    @property
    def columns(self) -> list:
        """The data columns the model reads: outcome, covariates, ids."""
        cols = [*(self.outcome_vars or (self.outcome,)), *self.variables]
        for rt in self.random:
            cols += list(rt.group)
        out = []
        for c in cols:
            if c not in out:
                out.append(c)
        return out


def _split_top(s: str, sep: str = "+") -> list:
    """Split on ``sep`` outside parentheses, keeping a leading '-' with its term."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise MlsemError(f"formula: unbalanced ')' in {s!r}")
        if depth == 0 and ch in "+-" and sep == "+":
            if cur.strip():
                parts.append(cur.strip())
            cur = "-" if ch == "-" else ""
            continue
        cur += ch
    if depth != 0:
        raise MlsemError(f"formula: unbalanced '(' in {s!r}")
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise MlsemError(f"formula: {name!r} in {where!r} is not a column name")
    return name


def _outcome(lhs: str, where: str):
    """(outcome, columns read): a column name, or a transform of columns such as
    ``log(Reaction)`` or ``I(y / 1000)`` (mlsem.data.encode computes it as a column of
    that name; the columns it reads are then the second item, else empty)."""
    lhs = lhs.strip()
    if _NAME.match(lhs):
        return lhs, []
    if not lhs or "|" in lhs or "~" in lhs or not re.fullmatch(r"[A-Za-z_.][A-Za-z0-9_.]*\(.*\)", lhs):
        raise MlsemError(f"formula: {lhs!r} in {where!r} is not a column name or a transform of one "
                         "such as log(y)")
    cols = _variables(formulaic_text(lhs), where)
    if not cols:
        raise MlsemError(f"formula: the outcome {lhs!r} in {where!r} reads no column")
    return lhs, cols


def _expand_group(g: str, term: str) -> list:
    """``k/j`` -> [(k,), (k, j)];  ``k:j`` -> [(k, j)];  ``k`` -> [(k,)]."""
    g = g.strip()
    if "/" in g:
        parts = [p.strip() for p in g.split("/")]
        out = []
        prefix = ()
        for p in parts:
            prefix = prefix + tuple(_check_name(x, term) for x in p.split(":"))
            out.append(prefix)
        return out
    return [tuple(_check_name(x, term) for x in g.split(":"))]


_BUILTIN_NAMES = {"True", "False", "None"}


def _names_read(expr: str) -> list:
    """The variables a Python expression reads: names that are neither called
    (``log`` in ``log(x)``) nor the base of an attribute (``contr`` in
    ``contr.treatment(...)``)."""
    import ast
    tree = ast.parse(expr, mode="eval")
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            skip.add(id(node.func))
        if isinstance(node, ast.Attribute):
            skip.add(id(node.value))
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and id(node) not in skip and node.id not in _BUILTIN_NAMES
                and node.id not in out):
            out.append(node.id)
    return out


def _variables(expr: str, where: str) -> list:
    """The data columns a formulaic expression reads, in order of appearance.
    (formulaic's own ``required_variables`` leaves out the arguments of stateful
    transforms such as ``poly(x, 2)``.)"""
    from formulaic import Formula as _FFormula
    try:
        terms = list(_FFormula(expr))
        out = []
        for t in terms:
            for fa in t.factors:
                if fa.eval_method.value == "lookup":
                    names = [fa.expr]
                elif fa.eval_method.value == "literal":
                    names = []
                else:
                    names = _names_read(fa.expr)
                out += [n for n in names if n not in out]
        return out
    except Exception as exc:  # formulaic's (or Python's) parse errors
        raise MlsemError(f"formula: cannot read {expr!r} in {where!r}: {exc}") from None


def _plain_terms(parts):
    """(intercept, column names) when the fixed terms are plain column names,
    ``1``, ``0`` or ``- 1``; else None (formulaic reads them)."""
    intercept, names = True, []
    for t in parts:
        body = t.lstrip("-").strip()
        if body in ("1", "0"):
            intercept = (body == "1") != t.startswith("-")
        elif _NAME.match(body) and not t.startswith("-"):
            if body not in names:
                names.append(body)
        else:
            return None
    return intercept, names


def formulaic_text(text: str) -> str:
    """R's spellings that formulaic would read otherwise: ``^`` inside a call's
    parentheses (``I(x^2)``, ``log(x^2)``) is R's power, Python's ``**`` (in
    Python it is a bitwise xor: ``I(Days^2)`` of an integer column would be a
    silent wrong column); ``as.factor(x)`` is ``factor(x)`` (mlsem.data.encode evaluates ``factor`` as formulaic's ``C``)."""
    text = re.sub(r"(?<![A-Za-z0-9_.])as\.factor\(", "factor(", text)
    if "^" not in text:
        return text
    out, stack, prev = [], [], ""
    for ch in text:
        if ch == "(":
            stack.append(bool(re.match(r"[A-Za-z0-9_.]", prev)))   # a call's parenthesis
        elif ch == ")" and stack:
            stack.pop()
        if ch == "^" and any(stack):
            out.append("**")
        else:
            out.append(ch)
        if not ch.isspace():
            prev = ch
    return "".join(out)


def _merge_same_level(random: list) -> list:
    """lme4's ``(1 | g) + (0 + x | g)``: terms of one grouping level whose effects
    are uncorrelated with each other are one ``(1 + x || g)`` term.  Terms whose
    union would need a block-diagonal covariance (``(1 + x | g) + (0 + z | g)``)
    or that repeat an effect are refused with the reason."""
    by_group: dict = {}
    for rt in random:
        by_group.setdefault(rt.group, []).append(rt)
    out, done = [], set()
    for rt in random:
        terms = by_group[rt.group]
        if len(terms) == 1:
            out.append(rt)
            continue
        if rt.group in done:
            continue
        done.add(rt.group)
        texts = " + ".join(t.text for t in terms)
        level = ":".join(rt.group)
        effects = []
        for t in terms:
            if t.correlated and len(t.effects) > 1:
                raise MlsemError(
                    f"formula: {texts}: several random terms for the level {level!r} are read as one "
                    f"term with uncorrelated effects, which {t.text!r} (correlated effects) is not; "
                    "write the effects in one term, correlated ((1 + x + z | g)) or not ((1 + x + z || g))")
            for e in t.effects:
                if e in effects:
                    raise MlsemError(f"formula: {texts}: the random effect {e!r} of the level {level!r} "
                                     "is given twice")
                effects.append(e)
        out.append(RandomTerm(tuple(effects), rt.group, False, texts))
    return out


def parse_formula(text: str) -> Formula:
    if not isinstance(text, str) or "~" not in text:
        raise MlsemError(f"formula: expected 'outcome ~ terms', got {text!r}")
    lhs, _, rhs = text.partition("~")
    if "~" in rhs:
        raise MlsemError(f"formula: more than one '~' in {text!r}")
    outcome, outcome_vars = _outcome(lhs, text)
    m = re.search(r"(?<![A-Za-z0-9_.])offset\(", rhs)
    if m:
        raise MlsemError(
            f"formula: offset() is not supported in {text!r}; in a linear mixed model an "
            f"offset o is the outcome less o: write 'I(y - o) ~ ...' (o may also be a "
            f"covariate; the log-likelihood is lme4's with offset(o); fitted values are "
            f"then of y - o)")
    rhs = formulaic_text(rhs)
    fixed_parts, random = [], []
    variables = []
    for term in _split_top(rhs):
        neg = term.startswith("-")
        body = term[1:].strip() if neg else term
        if body.startswith("(") and body.endswith(")") and "|" in body:
            if neg:
                raise MlsemError(f"formula: cannot remove the random term {term!r}")
            inner = body[1:-1]
            if "||" in inner:
                eff, _, grp = inner.partition("||")
                correlated = False
            elif "|" in inner:
                eff, _, grp = inner.partition("|")
                correlated = True
            else:  # pragma: no cover - guarded above
                raise MlsemError(f"formula: parenthesised term {term!r} has no '|'")
            effects, eff_int = [], True
            for e in _split_top(eff):
                if e in ("1", "+1"):
                    eff_int = True
                elif e in ("0", "-1"):
                    eff_int = False
                elif e.startswith("-"):
                    raise MlsemError(f"formula: cannot remove {e!r} in the random term {term!r}")
                else:
                    e = e.strip()
                    if not _NAME.match(e):
                        for v in _variables(e, term):
                            if v not in variables:
                                variables.append(v)
                    elif e not in variables:
                        variables.append(e)
                    if e not in effects:
                        effects.append(e)
            if eff_int:
                effects.insert(0, "Intercept")
            if not effects:
                raise MlsemError(f"formula: random term {term!r} has no effects")
            for grp_cols in _expand_group(grp, term):
                random.append(RandomTerm(tuple(effects), grp_cols, correlated, term))
            continue
        if "|" in body:
            raise MlsemError(f"formula: cannot read the term {term!r} (a random term is "
                             "written '(effects | group)')")
        fixed_parts.append(term)
    if not random:
        raise MlsemError(f"formula: {text!r} has no random term such as (1 | k/j)")
    random = _merge_same_level(random)
    fixed_text = ""
    for t in fixed_parts:
        if t.startswith("-"):
            fixed_text += (" - " if fixed_text else "-") + t[1:].strip()
        else:
            fixed_text += (" + " if fixed_text else "") + t
    fixed_text = fixed_text or "1"
    plain = _plain_terms(fixed_parts)
    fixed_vars = plain[1] if plain is not None else _variables(fixed_text, text)
    variables = list(dict.fromkeys(fixed_vars + variables))
    # a transformed outcome may read a covariate beside another column (I(y - x) ~ x:
    # an offset, as R allows), not only covariates (log(y) ~ y)
    read = list(outcome_vars or (outcome,))
    if all(o in variables for o in read):
        o = next(o for o in read if o in variables)
        raise MlsemError(f"formula: the outcome {o!r} is also a covariate in {text!r}")
    # a fixed part of plain column names (the grammar before formulaic) is known
    # without the data: fill it in for callers that prepare numeric columns themselves
    intercept, names = plain if plain is not None else (True, [])
    return Formula(outcome, intercept, tuple(names), tuple(random), text, fixed_text, tuple(variables),
                   outcome_vars=tuple(outcome_vars))


def effects_of(formula: Formula) -> dict:
    """{level position: random effect names} ("Intercept" or a slope's design column)."""
    effects = {}
    for rt in formula.random:
        d = len(rt.group) - 1
        if d in effects:
            raise MlsemError(f"formula: two random terms for the level {':'.join(rt.group)!r}")
        effects[d] = list(rt.effects)
    return effects


def nest_levels(formula: Formula) -> list:
    """The chain of nested grouping factors, outermost first.

    Every grouping factor must extend the previous one by one column (k, k:j,
    k:j:i ...); crossed factors are refused, naming the term."""
    groups = sorted({rt.group for rt in formula.random}, key=len)
    chain = []
    # every prefix of the longest group is a level, whether it has effects or not
    longest = groups[-1]
    for g in groups:
        if g != longest[:len(g)]:
            term = next(rt.text for rt in formula.random if rt.group == g)
            raise MlsemError(
                f"formula: the random term {term!r} is crossed with "
                f"{':'.join(longest)}: only nested grouping factors are supported")
    for i in range(1, len(longest) + 1):
        chain.append(longest[:i])
    return chain
