"""Every Python and shell block of the README and of docs/ runs, and where a
page shows the output, it is what the block prints (tests/doccheck.py)."""
from pathlib import Path

import pytest

from doccheck import blocks, compare, run_page

ROOT = Path(__file__).resolve().parent.parent
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


def test_blocks_read_marks_and_outputs():
    page = ("<!-- doc: skip (needs R) -->\n```bash\nRscript x.R\n```\n\n"
            "```python\nprint(1)\n```\n```output\n1\n```\n")
    b = blocks(page)
    assert [x.kind for x in b] == ["shell", "python"]
    assert b[0].mark == "skip" and b[0].reason == "needs R"
    assert b[1].expected == "1\n"
    with pytest.raises(ValueError, match="needs a reason"):
        blocks("<!-- doc: skip -->\n```python\npass\n```\n")
