"""Run the code blocks of a Markdown page (the README and docs/*.md).

Conventions (docs/contributing.md):

* ```python blocks run in order in one namespace per page, in an empty
  temporary directory; ```bash (or ```sh / ```shell) blocks run there too,
  with this interpreter's scripts (``mlsem``) first on PATH.
* A code block followed directly by an ```output block: the block's stdout is
  compared with it, numbers to the digits shown (one unit in the last digit
  shown of slack, for rounding; whole numbers such as counts and exit codes
  exactly), everything else token by token.
* A line that is just ``...`` in an output block stands for any number of
  printed lines.
* ``<!-- doc: skip (reason) -->`` on the line before a block: not run (it
  needs R, Graphviz, a cluster, or installs the package); the reason is
  required.  ``<!-- doc: nondeterministic -->``: run, output not compared
  (timings).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass

FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = re.compile(r"<!--\s*doc:\s*(skip|nondeterministic)\s*(?:\((.*?)\))?\s*-->\s*$")
NUM = re.compile(r"^[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?$")
RUN = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}


@dataclass
class Block:
    kind: str            # "python" or "shell"
    code: str
    line: int            # 1-based line of the opening fence
    expected: str | None  # the ```output block after it, if any
    mark: str | None     # "skip" or "nondeterministic"
    reason: str | None


def blocks(text: str) -> list:
    """The runnable blocks of a page, with their expected output and marks."""
    found = list(FENCE.finditer(text))
    out = []
    for n, m in enumerate(found):
        lang = m.group(1).lower()
        if lang not in RUN:
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mk = MARK.search(before)
        mark, reason = (mk.group(1), mk.group(2)) if mk else (None, None)
        if mark == "skip" and not reason:
            raise ValueError(f"line {line}: '<!-- doc: skip -->' needs a reason in parentheses")
        expected = None
        if n + 1 < len(found):
            nxt = found[n + 1]
            if nxt.group(1).lower() == "output" and text[m.end():nxt.start()].strip() == "":
                expected = nxt.group(2)
        out.append(Block(RUN[lang], m.group(2), line, expected, mark, reason))
    return out


def _num(tok: str):
    t = tok.rstrip("%").replace(",", "")
    try:
        return float(t)
    except ValueError:
        return None


def _decimals(tok: str) -> float:
    """One unit in the last digit shown: the slack for a rounded number.  A
    whole number without an exponent (a count, a degree of freedom, an exit
    code) is not a rounded value: it gets no slack."""
    t = tok.rstrip("%").replace(",", "")
    mant, _, exp = t.lower().partition("e")
    if "." not in mant and not exp:
        return 0.0
    d = len(mant.split(".")[1]) if "." in mant else 0
    return 10.0 ** (-d + (int(exp) if exp else 0))


_SPLIT = re.compile(r"([\s|:=(),\[\]]+)")


def _tokens(s: str) -> list:
    return [t for t in _SPLIT.split(s) if t and not t.isspace()]


def _line_ok(el: str, al: str) -> bool:
    et, at = _tokens(el), _tokens(al)
    if len(et) != len(at):
        return False
    for a, b in zip(et, at):
        if a == b:
            continue
        x, y = (_num(a) if NUM.match(a) else None), (_num(b) if NUM.match(b) else None)
        if x is None or y is None or abs(x - y) > 1.0001 * _decimals(a):
            return False
    return True


def compare(expected: str, actual: str) -> str | None:
    """None if the outputs agree, else a message naming the first difference.
    A line that is just ``...`` in the expected output stands for any number
    of printed lines (a long table shown in part)."""
    e_lines = [ln.rstrip() for ln in expected.strip("\n").splitlines()]
    a_lines = [ln.rstrip() for ln in actual.strip("\n").splitlines()]
    # segments of expected lines between '...' lines, matched in order
    segs, cur = [], []
    for ln in e_lines:
        if ln.strip() == "...":
            segs.append(cur)
            cur = []
        else:
            cur.append(ln)
    segs.append(cur)
    pos = 0
    for n, seg in enumerate(segs):
        if n == 0:
            starts = [0]                                  # the first segment opens the output
        else:
            starts = range(pos, len(a_lines) - len(seg) + 1)
        if n == len(segs) - 1 and n > 0:
            starts = [len(a_lines) - len(seg)] if len(a_lines) - len(seg) >= pos else []
        found = None
        for st in starts:
            if st + len(seg) <= len(a_lines) and all(_line_ok(e, a) for e, a in zip(seg, a_lines[st:st + len(seg)])):
                found = st
                break
        if found is None:
            # say where: the first line of the segment that does not match
            st = list(starts)[0] if list(starts) else pos
            for i, e in enumerate(seg):
                a = a_lines[st + i] if st + i < len(a_lines) else "<no more output>"
                if not _line_ok(e, a):
                    return (f"output line {st + i + 1} differs:\n  shown:   {e}\n  printed: {a}\n"
                            "--- printed output:\n" + "\n".join(a_lines))
            return "the printed output has a different number of lines:\n" + "\n".join(a_lines)
        pos = found + len(seg)
    if len(segs) == 1 and pos != len(a_lines):
        return (f"{len(a_lines)} output lines, the page shows {len(e_lines)}\n--- printed:\n"
                + "\n".join(a_lines))
    return None


def run_page(path: str, workdir: str) -> dict:
    """Run every block of one page; raise AssertionError at the first failure.
    Returns counts: executed, compared, skipped."""
    text = open(path, encoding="utf-8").read()
    ns = {"__name__": "__doc__"}
    counts = {"executed": 0, "compared": 0, "skipped": 0}
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    old = os.getcwd()
    os.chdir(workdir)
    try:
        for b in blocks(text):
            where = f"{os.path.basename(path)}:{b.line}"
            if b.mark == "skip":
                counts["skipped"] += 1
                continue
            if b.kind == "python":
                buf = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buf):
                        exec(compile(b.code, where, "exec"), ns)
                except Exception as exc:
                    raise AssertionError(f"{where}: the python block failed: {type(exc).__name__}: {exc}") from exc
                printed = buf.getvalue()
            else:
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.code], capture_output=True,
                                   text=True, env=env, timeout=600)
                if r.returncode != 0:
                    raise AssertionError(f"{where}: the shell block exited {r.returncode}:\n{r.stderr[-2000:]}")
                printed = r.stdout
            counts["executed"] += 1
            if b.expected is not None and b.mark != "nondeterministic":
                msg = compare(b.expected, printed)
                if msg:
                    raise AssertionError(f"{where}: {msg}")
                counts["compared"] += 1
    finally:
        os.chdir(old)
    return counts
