"""docs/speed.md's current figures are the ones results/speed/ records (scripts/speed_table.py)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import speed_table  # noqa: E402


def test_the_speed_figures_in_the_docs_are_generated_from_the_records():
    assert speed_table.block(speed_table.DOC.read_text()) == speed_table.rendered(), (
        "docs/speed.md's figures were edited by hand or results/speed/ changed: run python scripts/speed_table.py"
    )


def test_every_speed_record_says_when_where_and_how_it_was_measured():
    records = sorted(speed_table.RECORDS.glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert {"date", "machine", "command", "code", "tables", "text"} <= set(record), path.name
        assert path.name.startswith(f"{record['date']}_" if record["date"] else "undated_"), path.name
        for each in record["tables"]:
            assert all(set(row) == set(each["columns"]) for row in each["rows"]), path.name
