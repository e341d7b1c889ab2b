import json
import pathlib

import pytest

# the test files live in one folder per layer (tests/api, tests/spec, ...); these are
# the places they read from, whatever their depth
ROOT = pathlib.Path(__file__).resolve().parent.parent      # the repository
REF = ROOT / "tests" / "reference"


def load_case(name):
    with open(REF / f"{name}.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def ref_dir():
    return REF


def pytest_terminal_summary(terminalreporter):
    """The count of executed documentation blocks (README and docs/), in the test output."""
    import sys
    mod = sys.modules.get("test_docs")
    if mod is not None and mod.COUNTS["pages"]:
        c = mod.COUNTS
        terminalreporter.write_line(
            f"documentation: {c['executed']} code blocks executed on {c['pages']} pages, "
            f"{c['compared']} outputs compared, {c['skipped']} blocks skipped (marked with a reason)")


def lme4_name(name, factors):
    """lme4's coefficient name -> formulaic's ("sexM" -> "sex[T.M]")."""
    if name == "(Intercept)":
        return "Intercept"
    parts = []
    for p in name.split(":"):
        for col in factors:
            if p.startswith(col) and p != col:
                p = f"{col}[T.{p[len(col):]}]"
                break
        parts.append(p)
    return ":".join(parts).replace("^", " ** ")
