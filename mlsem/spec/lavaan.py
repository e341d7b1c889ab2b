"""Spec layer: lavaan model syntax -> statements.

A small tokenizer and a recursive-descent parser for the subset of lavaan's
syntax that mlsem fits (semopy writes the same):

    f =~ x1 + NA*x2 + a*x3 + start(0.5)*x4      latent definition (loadings)
    y ~ x + f                                   regression
    y ~ 1    y ~ c*1                             intercept
    x1 ~~ x2    f ~~ 1*f                         (residual) variance / covariance
    a == b    a == 2*b                           linear equality constraints
    d := a*b                                     defined parameter (delta-method SE)
    # comments, statements separated by newlines or ';'

A line that ends in ``+`` (or an operator) continues on the next.  Every token
keeps its line and column so that errors point at it.  The parser only checks
syntax; what the names mean (latent, observed, covariate) is decided by
:mod:`mlsem.sem` from the statements and the data's columns.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

from ..errors import MlsemError

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+)
  | (?P<comment>[#!][^\n]*)
  | (?P<newline>\n)
  | (?P<op>=~|~~|~\*~|<~|~|==|:=|<|>|\+|\*|\(|\)|,|;|-|/|\^)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_.][A-Za-z0-9_.]*)
  | (?P<string>"[^"\n]*"|'[^'\n]*')
""", re.VERBOSE)

# the same tokens without the whitespace alternative (tokenize skips it)
_TOKEN_FAST = re.compile(_TOKEN.pattern.replace("(?P<ws>[ \\t\\r]+)\n  | ", ""), re.VERBOSE)

OPERATORS = ("=~", "~", "~~", "==", ":=")
_REFUSED = {"<": "inequality constraints ('<') are not supported",
            ">": "inequality constraints ('>') are not supported",
            "<~": "formative indicators ('<~') are not supported",
            "~*~": "scaling factors ('~*~') are not supported"}


@dataclass(slots=True)
class Token:
    kind: str      # "op" | "number" | "name" | "string" | "end"
    text: str
    line: int
    col: int
    pos: int       # character offset in the source


@dataclass
class Term:
    """One right-hand-side term: a variable (or "1" for the intercept) with its modifiers."""
    var: str
    line: int
    col: int
    fixed: float | None = None     # 2*x
    label: str | None = None       # a*x
    free: bool = False             # NA*x
    start: float | None = None     # start(0.5)*x


@dataclass
class Statement:
    lhs: str
    op: str
    terms: list = field(default_factory=list)
    line: int = 0
    col: int = 0
    expr: str = ""                 # ==, := : the right-hand side as text
    lhs_expr: str = ""             # ==     : the left-hand side as text


def _where(src_line: str, line: int, col: int) -> str:
    return f"line {line}, column {col}:\n    {src_line}\n    {' ' * (col - 1)}^"


class SyntaxErrorAt(MlsemError):
    pass


def _error(source: str, tok: Token, msg: str):
    lines = source.split("\n")
    src_line = lines[tok.line - 1] if 0 < tok.line <= len(lines) else ""
    shown = "end of statement" if tok.kind == "end" else repr(tok.text)
    raise SyntaxErrorAt(f"model syntax: {msg} at {shown}, {_where(src_line, tok.line, tok.col)}")


# a statement continues over a newline after one of these
_CONTINUE = frozenset(("+", "*", "=~", "~", "~~", "==", ":=", "(", ",", "-", "/", "^"))


def tokenize(source: str) -> list:
    """Tokens, with statements separated by an "end" token (newline or ';').

    One ``finditer`` pass over the tokens themselves (whitespace and comments,
    skipped, are not materialised; a character no token starts with is an
    error), so that a model of hundreds of statements tokenizes in about a
    millisecond."""
    out = []
    append = out.append
    line, lstart = 1, 0
    expect = 0                       # where the next token must start (after whitespace)
    for m in _TOKEN_FAST.finditer(source):
        pos = m.start()
        if pos != expect and source[expect:pos].strip(" \t\r"):
            bad = expect + len(source[expect:pos]) - len(source[expect:pos].lstrip(" \t\r"))
            _error(source, Token("bad", source[bad], line, bad - lstart + 1, bad), "unexpected character")
        expect = m.end()
        kind = m.lastgroup
        if kind == "comment":
            continue
        text = m.group()
        if kind == "newline":
            # a statement continues over a newline after '+', '*' or an operator
            if not (out and out[-1].kind == "op" and out[-1].text in _CONTINUE):
                append(Token("end", "\n", line, pos - lstart + 1, pos))
            line += 1
            lstart = expect
        elif kind == "op" and text == ";":
            append(Token("end", ";", line, pos - lstart + 1, pos))
        else:
            append(Token(kind, text, line, pos - lstart + 1, pos))
    n = len(source)
    if expect != n and source[expect:].strip(" \t\r"):
        bad = expect + len(source[expect:]) - len(source[expect:].lstrip(" \t\r"))
        _error(source, Token("bad", source[bad], line, bad - lstart + 1, bad), "unexpected character")
    append(Token("end", "", line, n - lstart + 1, n))
    return out


def _split(tokens: list) -> list:
    stmts, cur = [], []
    for t in tokens:
        if t.kind == "end":
            if cur:
                stmts.append((cur, t))
            cur = []
        else:
            cur.append(t)
    return stmts


def _number(tok: Token, sign: float = 1.0) -> float:
    return sign * float(tok.text)


def _parse_terms(source, toks, end_tok, op_tok) -> list:
    terms = []
    i = 0
    n = len(toks)

    def peek(k=0):
        return toks[i + k] if i + k < n else end_tok

    if n == 0:
        _error(source, end_tok, f"nothing after {op_tok.text!r}")
    while True:
        term_mods = {"fixed": None, "label": None, "free": False, "start": None}
        # modifiers: (number | NA | name | start(number) | -number) '*'
        while True:
            t = peek()
            if t.kind == "name" and t.text == "start" and peek(1).text == "(":
                sign = 1.0
                k = 2
                if peek(k).text == "-":
                    sign, k = -1.0, 3
                if peek(k).kind != "number" or peek(k + 1).text != ")" or peek(k + 2).text != "*":
                    _error(source, peek(k), "expected start(<number>)*")
                term_mods["start"] = _number(peek(k), sign)
                i += k + 3
                continue
            if t.kind == "name" and t.text in ("c", "equal", "label", "lower", "upper") and peek(1).text == "(":
                _error(source, t, f"the modifier {t.text}(...) is not supported")
            if t.text == "-" and peek(1).kind == "number" and peek(2).text == "*":
                term_mods["fixed"] = _number(peek(1), -1.0)
                i += 3
                continue
            if t.kind == "number" and peek(1).text == "*":
                term_mods["fixed"] = _number(t)
                i += 2
                continue
            if t.kind == "name" and peek(1).text == "*":
                if t.text == "NA":
                    term_mods["free"] = True
                else:
                    term_mods["label"] = t.text
                i += 2
                continue
            if t.kind == "string" and peek(1).text == "*":
                term_mods["label"] = t.text[1:-1]
                i += 2
                continue
            break
        t = peek()
        if t.kind == "name":
            var = t.text
        elif t.kind == "number" and op_tok.text == "~" and float(t.text) == 1.0:
            var = "1"
        else:
            _error(source, t, "expected a variable name")
        if term_mods["fixed"] is not None and term_mods["free"]:
            _error(source, t, "a term cannot be both fixed and NA (free)")
        terms.append(Term(var, t.line, t.col, **term_mods))
        i += 1
        t = peek()
        if t.kind == "end" or i >= n:
            break
        if t.text in _REFUSED:
            _error(source, t, _REFUSED[t.text])
        if t.text != "+":
            _error(source, t, "expected '+' or the end of the statement")
        i += 1
        if i >= n:
            _error(source, end_tok, "a term is missing after '+'")
    return terms


def parse(source: str) -> list:
    """The statements of a lavaan model, in order.  Raises :class:`MlsemError`
    with the line and column of the offending token."""
    if not isinstance(source, str):
        raise MlsemError(f"model syntax must be a string, not {type(source).__name__}")
    toks = tokenize(source)
    out = []
    for stmt, end_tok in _split(toks):
        op_i = next((k for k, t in enumerate(stmt) if t.kind == "op" and t.text in OPERATORS + tuple(_REFUSED)), None)
        if op_i is None:
            _error(source, stmt[0] if len(stmt) == 1 else stmt[1] if len(stmt) > 1 else end_tok,
                   "expected an operator (=~, ~, ~~, ==, :=)")
        op = stmt[op_i]
        if op.text in _REFUSED:
            _error(source, op, _REFUSED[op.text])
        lhs_toks = stmt[:op_i]
        rhs_toks = stmt[op_i + 1:]
        if op.text in ("==", ":="):
            if not lhs_toks:
                _error(source, op, f"nothing before {op.text!r}")
            if not rhs_toks:
                _error(source, end_tok, f"nothing after {op.text!r}")
            lhs_text = source[lhs_toks[0].pos: lhs_toks[-1].pos + len(lhs_toks[-1].text)]
            rhs_text = source[rhs_toks[0].pos: rhs_toks[-1].pos + len(rhs_toks[-1].text)]
            if op.text == ":=" and (len(lhs_toks) != 1 or lhs_toks[0].kind != "name"):
                _error(source, lhs_toks[min(1, len(lhs_toks) - 1)], "a defined parameter needs a single name before ':='")
            for e, ts in ((lhs_text, lhs_toks), (rhs_text, rhs_toks)):
                try:
                    expression_names(e)
                except MlsemError as exc:
                    _error(source, ts[0], str(exc))
            out.append(Statement(lhs_toks[0].text if len(lhs_toks) == 1 else lhs_text, op.text, [],
                                 op.line, op.col, expr=rhs_text, lhs_expr=lhs_text))
            continue
        if len(lhs_toks) != 1 or lhs_toks[0].kind != "name":
            bad = lhs_toks[1] if len(lhs_toks) > 1 else (lhs_toks[0] if lhs_toks else op)
            _error(source, bad, f"expected one variable name before {op.text!r}")
        terms = _parse_terms(source, rhs_toks, end_tok, op)
        if op.text != "~" and any(t.var == "1" for t in terms):
            _error(source, op, "an intercept '1' is only allowed with '~'")
        out.append(Statement(lhs_toks[0].text, op.text, terms, lhs_toks[0].line, lhs_toks[0].col))
    if not out:
        raise MlsemError("model syntax: the model is empty")
    return out


# ---- expressions of labels (==, :=) -------------------------------------------
_FUNCS = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt, "abs": abs,
          "sin": math.sin, "cos": math.cos, "tanh": math.tanh}
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call,
            ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)


def _expr_ast(text: str):
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise MlsemError(f"cannot read the expression {text!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise MlsemError(f"the expression {text!r} uses {type(node).__name__}, which is not allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
            raise MlsemError(f"the expression {text!r} calls an unknown function")
    return tree


def expression_names(text: str) -> list:
    """Parameter labels an expression uses."""
    tree = _expr_ast(text)
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    names = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and id(n) not in calls and n.id not in names:
            names.append(n.id)
    return names


def compile_expression(text: str):
    """A function of a {label: value} mapping."""
    code = compile(_expr_ast(text), "<mlsem expression>", "eval")

    def f(values: dict) -> float:
        return float(eval(code, {"__builtins__": {}}, {**_FUNCS, **values}))
    return f
