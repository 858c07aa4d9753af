"""benchmarks/docs_tables.py: every measured table in the user guides is what its results files give.

The generator is run in-process in its --check mode; no model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


docs_tables = _load_generator()


def test_the_pages_tables_are_what_the_results_files_give(capsys):
    rc = docs_tables.main(["--check"])
    assert rc == 0, "a docs/ page differs from its results files; run python benchmarks/docs_tables.py\n" + (
        capsys.readouterr().err)


def test_every_page_has_its_tables_each_naming_its_sources():
    for page in docs_tables.PAGES:
        text = (ROOT / "docs" / page).read_text()
        blocks = {m["name"]: m["body"] for m in docs_tables.BLOCK.finditer(text)}
        assert set(blocks) == {n for n, t in docs_tables.TABLES.items() if t.page == page}
        for name, body in blocks.items():
            assert "Source: `" in body and "|---|" in body, f"{page}: table {name} lacks its source or its table"


@pytest.mark.parametrize("page", ["EXPLAIN.md", "RESULTS.md", "DIAGNOSE.md", "FLOW.md"])
def test_a_number_edited_by_hand_is_caught(page):
    text = (ROOT / "docs" / page).read_text()
    block = next(docs_tables.BLOCK.finditer(text))
    row = next(line for line in block["body"].splitlines() if line.startswith("| ") and re.search(r"\d\.\d", line))
    digit = re.search(r"\d\.(\d)", row)
    edited_row = row[:digit.start(1)] + str((int(digit[1]) + 1) % 10) + row[digit.end(1):]
    edited = text.replace(row, edited_row, 1)
    assert edited != text
    assert docs_tables.render(page, edited) == docs_tables.render(page, text) == text


def test_unknown_missing_and_unclosed_markers_are_errors():
    text = (ROOT / "docs" / "FLOW.md").read_text()
    with pytest.raises(ValueError, match="unknown table marker"):
        docs_tables.render("FLOW.md", text + "\n<!-- table:flow-typo -->\n<!-- /table:flow-typo -->\n")
    without = re.sub(r"<!-- table:flow-sources -->.*?<!-- /table:flow-sources -->", "", text, flags=re.DOTALL)
    with pytest.raises(ValueError, match="flow-sources"):
        docs_tables.render("FLOW.md", without)
    with pytest.raises(ValueError, match="closed by"):
        docs_tables.render("FLOW.md", text.replace("<!-- /table:flow-sources -->", "<!-- /table:flow-cv -->", 1))


def test_a_record_of_other_weights_than_the_shipped_ones_gives_no_figures(tmp_path):
    """After a retraining, the faithfulness record of the earlier weights is history: its table says so, with no
    number of it left, and every method reads `not measured`, as `leukoscope explain` then says."""
    rel = Path(docs_tables.WEIGHTS) / "leukemia-cell"
    (tmp_path / rel).mkdir(parents=True)
    shutil.copy(ROOT / rel / "model.json", tmp_path / rel / "model.json")
    record = json.loads((ROOT / rel / "faithfulness.json").read_text())
    record["weights_sha256"] = "0" * 64
    (tmp_path / rel / "faithfulness.json").write_text(json.dumps(record))
    shown = "\n".join(docs_tables.TABLES["explain-faithfulness"].render(tmp_path))
    assert "describes weights 000000000000" in shown and not re.search(r"[+-]0\.\d{3}", shown)
    verdicts = "\n".join(docs_tables.TABLES["explain-verdicts"].render(tmp_path))
    assert "not measured" in verdicts and "passes" not in verdicts
