"""Every Python and shell block of the README and of docs/ runs, and where a
page shows the output, it is what the block prints (tests/doccheck.py)."""
import pytest

from doccheck import blocks, compare, run_page
from conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
COUNTS = {"executed": 0, "compared": 0, "skipped": 0, "pages": 0}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page, tmp_path):
    c = run_page(str(page), str(tmp_path))
    for k, v in c.items():
        COUNTS[k] += v
    COUNTS["pages"] += 1


def test_compare_reads_digits_shown():
    assert compare("loglik -720.344", "loglik -720.3441") is None
    assert compare("loglik -720.344", "loglik -720.346") is not None
    assert compare("a | 1.5e-03", "a | 0.0015") is None
    assert compare("x 10", "y 10") is not None
    assert compare("1\n2", "1") is not None
    assert compare("head\n...\ntail 2.0", "head\na\nb\ntail 2.01") is None
    assert compare("head\n...\ntail 2.0", "head\na\nb\ntail 2.3") is not None
    assert compare("head\n...\nmid\n...\nend", "head\nx\nmid\ny\nend") is None
    assert compare("head\n...\nmid\n...\nend", "head\nx\ny\nend") is not None


def test_compare_whole_numbers_exactly():
    """A count, a degree of freedom or an exit code is not rounded: 'exit 2'
    must not match a printed 'exit 1' (the one-unit slack is for rounded
    decimals only)."""
    assert compare("exit 2", "exit 1") is not None
    assert compare("chi2(1) = 8.0164", "chi2(2) = 8.0164") is not None
    assert compare("Number of obs = 400", "Number of obs = 401") is not None
    assert compare("1,761 rows", "1,761 rows") is None
    assert compare("p = 0.0046", "p = 0.0047") is None        # rounding in the last decimal shown
    assert compare("2e-10", "3e-10") is None                  # an exponent is a rounded value


def test_blocks_read_marks_and_outputs():
    page = ("<!-- doc: skip (needs R) -->\n```bash\nRscript x.R\n```\n\n"
            "```python\nprint(1)\n```\n```output\n1\n```\n")
    b = blocks(page)
    assert [x.kind for x in b] == ["shell", "python"]
    assert b[0].mark == "skip" and b[0].reason == "needs R"
    assert b[1].expected == "1\n"
    with pytest.raises(ValueError, match="needs a reason"):
        blocks("<!-- doc: skip -->\n```python\npass\n```\n")


def test_api_reference_covers_every_public_name():
    """docs/api.md has a mkdocstrings entry (`::: module.name`) for every name in
    mlsem.__all__, so a new public function cannot go undocumented."""
    import importlib
    import re
    import mlsem
    documented = []
    for path in re.findall(r"^::: ([\w.]+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M):
        mod, _, name = path.rpartition(".")
        documented.append(getattr(importlib.import_module(mod), name))
    missing = [n for n in mlsem.__all__ if n != "__version__"
               and not any(getattr(mlsem, n) is obj for obj in documented)]
    assert not missing, f"docs/api.md has no '::: ...' entry for {missing}"


def test_design_page_names_every_module():
    """docs/design.md has one line per module of mlsem/ (its path relative to
    mlsem/, in backticks), so the layout written down stays the real one."""
    pkg = ROOT / "mlsem"
    text = (ROOT / "docs" / "design.md").read_text()
    modules = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.suffix in (".py", ".pyx"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert modules and not missing, f"docs/design.md does not name {missing}"
