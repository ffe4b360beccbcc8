"""A campaign's stored rows stay what they were: the trials table of a fixed small campaign, column types included.

`tests/expected/campaign_trials.json` was first written by `python tests/test_campaign_store.py` on
main at commit 699b672 (before the structure refactor that moved `TrialRecord` and derived the SQL
column types from type hints), with onnxruntime 1.32 on x86-64, and rewritten on branch campaigns
(issue 11) when the columns `even_flip_words` and `sdc_samples` (replacing `top1_changed`) came:
every other value stayed as before but `correct` in the 26 trials with NaN outputs, now 0 (a
non-finite output is never correct), and `sdc_samples` equals the old `top1_changed` in every
trial with finite outputs. The timing columns differ between runs and are compared by type only.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from oppass.campaign import CampaignConfig, run_campaign
from oppass.campaign.store import STORE_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).resolve().parent / "expected" / "campaign_trials.json"
TIMING_COLUMNS = ("inject_seconds", "inference_seconds")


def fixed_campaign(out: Path) -> CampaignConfig:
    """Every study and protection of a campaign, in three formats, small enough for a unit test."""
    return CampaignConfig(
        model=REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx", data="digits", out=out,
        formats=("fp32", "bf16", "int8"), protections=("none", "weight", "64"), ecc=True, bit_positions=True,
        ber_min=1e-3, ber_max=1e-2, points_per_decade=1, experiments=2, batch_size=50, metric="top1",
        scheduler="serial", seed=3,
    )


def stored_table(out: Path) -> dict:
    """The trials table's SQL and its rows as stored: each value with its SQLite type, timings by type only."""
    connection = sqlite3.connect(out / STORE_FILE)
    try:
        (sql,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'trials'").fetchone()
        cursor = connection.execute("SELECT * FROM trials ORDER BY condition_key, trial")
        columns = [description[0] for description in cursor.description]
        rows = cursor.fetchall()
    finally:
        connection.close()
    return {
        "sql": sql,
        "columns": columns,
        "rows": [[_sqlite_type(value) if column in TIMING_COLUMNS else [_sqlite_type(value), value]
                  for column, value in zip(columns, row, strict=True)] for row in rows],
    }


def _sqlite_type(value: object) -> str:
    return {type(None): "null", int: "integer", float: "real", str: "text"}[type(value)]


def test_stored_trials_are_those_of_main(tmp_path: Path, custom_op_library: str) -> None:
    run_campaign(fixed_campaign(tmp_path))
    expected = json.loads(EXPECTED.read_text())
    actual = stored_table(tmp_path)
    assert actual["sql"] == expected["sql"]
    assert actual["columns"] == expected["columns"]
    assert len(actual["rows"]) == len(expected["rows"]) == 3 * 4 * 2 * 2 + (32 + 16 + 8) * 2 * 2
    for got, wanted in zip(actual["rows"], expected["rows"], strict=True):
        assert got == wanted


if __name__ == "__main__":  # writes the expected table (run only on the reference code)
    folder = Path(sys.argv[1])
    run_campaign(fixed_campaign(folder))
    table = stored_table(folder)
    rows = ",\n".join(json.dumps(row) for row in table["rows"])
    EXPECTED.write_text(f'{{"sql": {json.dumps(table["sql"])},\n"columns": {json.dumps(table["columns"])},\n'
                        f'"rows": [\n{rows}\n]}}\n')
