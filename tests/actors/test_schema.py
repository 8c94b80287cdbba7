"""README.md's "Output schema" table lists exactly the columns of actors/schema.py, in order."""
from __future__ import annotations

import re
from pathlib import Path

from dcam.actors.schema import COLUMN_NAMES

ROOT = Path(__file__).resolve().parents[2]


def _readme_schema_columns() -> list[str]:
    """Column names of the first cell of every row of README's output-schema table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Output schema", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # skip the header row
    names = []
    for row in rows:
        first = row.split("|")[1]
        names.extend(n.strip() for n in first.split(",") if n.strip())
    return names


def test_readme_schema_lists_every_column_in_order():
    documented = _readme_schema_columns()
    assert documented == list(COLUMN_NAMES)


def test_func_iou_is_documented():
    """Issue 13 defect 11: func_iou is an output column but was missing from README."""
    assert "func_iou" in COLUMN_NAMES
    assert "func_iou" in _readme_schema_columns()


def test_table_rows_are_well_formed():
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in _readme_schema_columns())
