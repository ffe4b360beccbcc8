"""A campaign's stored rows stay what they were: the trials table of a fixed small campaign, column types included.

The expected rows were drawn with the store format 1 sampler (numpy's `choice`, one stream per
condition); a store of that format must keep resuming to exactly those trials.

`tests/expected/campaign_trials.json` was first written by `python tests/test_campaign_store.py` on
main at commit 699b672 (before the structure refactor that moved `TrialRecord` and derived the SQL
column types from type hints), with onnxruntime 1.32 on x86-64, and rewritten on branch campaigns
(issue 11) when the columns `even_flip_words` and `sdc_samples` (replacing `top1_changed`) came:
every other value stayed as before but `correct` in the 26 trials with NaN outputs, now 0 (a
non-finite output is never correct), and `sdc_samples` equals the old `top1_changed` in every
trial with finite outputs. The timing columns differ between runs and are compared by type only.
The column `corrected_words` came later (issue 12): a store written before it gets it on opening,
NULL in the rows it held, so the expected table stays the one without it and the test checks the
column apart.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from oppass.campaign import CampaignConfig, run_campaign
from oppass.campaign.runner import make_plan
from oppass.campaign.store import FORMAT_VERSION, STORE_FILE, Store
from oppass.errors import OppassError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).resolve().parent / "expected" / "campaign_trials.json"
TIMING_COLUMNS = ("inject_seconds", "inference_seconds")
ADDED = "corrected_words"  # the column added since the expected table was written


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


def without_added(table: dict) -> dict:
    """`table` without the column ADDED: as the expected table holds it."""
    keep = [i for i, column in enumerate(table["columns"]) if column != ADDED]
    return {"columns": [table["columns"][i] for i in keep], "rows": [[row[i] for i in keep] for row in table["rows"]]}


def format_1_store(out: Path, rows: list[list]) -> None:
    """A store as oppass wrote it before format versions (no `format_version`) and before the column ADDED,
    holding `rows` of the expected table (timings set to 0)."""
    Store(out, make_plan(fixed_campaign(out)).identity).close()
    connection = sqlite3.connect(out / STORE_FILE)
    with connection:
        connection.execute("DELETE FROM meta WHERE key = 'format_version'")
        connection.execute(f"ALTER TABLE trials DROP COLUMN {ADDED}")
        values = [[0.0 if isinstance(cell, str) else cell[1] for cell in row] for row in rows]
        if values:
            connection.executemany(f"INSERT INTO trials VALUES ({', '.join('?' * len(values[0]))})", values)
    connection.close()


def test_a_format_1_store_resumes_to_the_trials_of_its_sampler(tmp_path: Path, custom_op_library: str) -> None:
    expected = json.loads(EXPECTED.read_text())
    format_1_store(tmp_path, expected["rows"][::2])  # every other trial done by the old code, the rest to resume
    connection = sqlite3.connect(tmp_path / STORE_FILE)
    (sql,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'trials'").fetchone()
    connection.close()
    assert sql == expected["sql"]  # the table as oppass wrote it then
    run_campaign(fixed_campaign(tmp_path))
    table = stored_table(tmp_path)
    actual = without_added(table)
    assert table["columns"] == [*expected["columns"], ADDED]
    assert len(actual["rows"]) == len(expected["rows"]) == 3 * 4 * 2 * 2 + (32 + 16 + 8) * 2 * 2
    for got, wanted in zip(actual["rows"], expected["rows"], strict=True):
        assert got == wanted
    # The added column: NULL in the rows the old store held and where nothing corrects, counted for ECC.
    old = {(row[0][1], row[1][1]) for row in expected["rows"][::2]}
    for row in table["rows"]:
        key, corrected = (row[0][1], row[1][1]), row[-1]
        if key in old or row[4][1] != "ecc":
            assert corrected == ["null", None]
        else:
            assert corrected[0] == "integer" and 0 <= corrected[1] <= row[8][1]  # at most one per flip
    assert any(row[-1][0] == "integer" and row[-1][1] > 0 for row in table["rows"])
    reopened = Store(tmp_path, make_plan(fixed_campaign(tmp_path)).identity)
    assert reopened.format_version == 1
    reopened.close()


def sampler_campaign(out: Path) -> CampaignConfig:
    """A campaign over every regime of the samplers of formats 2 and 3 (few flips, gaps, mask from 1e-1), with ECC
    and the bit study (whose targets take positions), small enough for a unit test."""
    return CampaignConfig(
        model=REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx", data="digits", out=out,
        formats=("fp32", "int8"), protections=("none", "64"), ecc=True, bit_positions=True,
        ber_min=1e-4, ber_max=1e-1, points_per_decade=1, experiments=2, batch_size=50, metric="top1",
        scheduler="serial", seed=5,
    )


def versioned_store(out: Path, version: int, rows: list[list]) -> None:
    """A store of `sampler_campaign` in store format `version`, holding `rows` of its expected table (timings 0)."""
    Store(out, make_plan(sampler_campaign(out)).identity).close()
    connection = sqlite3.connect(out / STORE_FILE)
    with connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(version),))
        values = [[0.0 if isinstance(cell, str) else cell[1] for cell in row] for row in rows]
        if values:
            connection.executemany(f"INSERT INTO trials VALUES ({', '.join('?' * len(values[0]))})", values)
    connection.close()


def expected_of_format(version: int) -> Path:
    """The expected trials of `sampler_campaign` in store format `version` (2: written by the format-2 code)."""
    return EXPECTED.with_name(f"sampler_trials_format{version}.json")


@pytest.mark.parametrize("version", [2, 3])
def test_a_store_resumes_to_the_trials_of_its_format(tmp_path: Path, version: int, custom_op_library: str) -> None:
    expected = json.loads(expected_of_format(version).read_text())
    versioned_store(tmp_path, version, expected["rows"][::2])  # every other trial stored, the rest to resume
    run_campaign(sampler_campaign(tmp_path))
    table = stored_table(tmp_path)
    assert table["columns"] == expected["columns"]
    assert len(table["rows"]) == len(expected["rows"]) == 2 * 3 * 4 * 2 + (32 + 8) * 4 * 2
    for got, wanted in zip(table["rows"], expected["rows"], strict=True):
        assert got == wanted
    reopened = Store(tmp_path, make_plan(sampler_campaign(tmp_path)).identity)
    assert reopened.format_version == version
    reopened.close()


def test_formats_2_and_3_draw_other_trials() -> None:
    rows = [{(row[0][1], row[1][1]): row[8][1] for row in json.loads(expected_of_format(version).read_text())["rows"]}
            for version in (2, 3)]
    assert rows[0].keys() == rows[1].keys() and sum(rows[0][key] != rows[1][key] for key in rows[0]) > 10  # flips


def test_a_new_store_draws_with_the_current_format(tmp_path: Path, custom_op_library: str) -> None:
    config = dataclasses.replace(fixed_campaign(tmp_path), formats=("fp32",), bit_positions=False, ecc=False)
    run_campaign(config)
    store = Store(tmp_path, make_plan(config).identity)
    assert store.format_version == FORMAT_VERSION == 3
    masked = {(r.condition_key, r.trial): r.masked_words for r in store.trials()}
    store.close()
    old = {(row[0][1], row[1][1]): row[9][1] for row in json.loads(EXPECTED.read_text())["rows"]}
    assert masked.keys() <= old.keys() and any(masked[key] != old[key] for key in masked)  # other positions



def test_a_store_of_a_newer_or_unreadable_format_is_refused_in_one_line(tmp_path: Path) -> None:
    identity = {"model_sha256": "0" * 64, "seed": 0}
    Store(tmp_path, identity).close()
    for version, message in (("4", "store format 4, newer than this oppass reads"), ("two", "is damaged")):
        connection = sqlite3.connect(tmp_path / STORE_FILE)
        with connection:
            connection.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (version,))
        connection.close()
        with pytest.raises(OppassError, match=message):
            Store(tmp_path, identity)


def write_expected(path: Path, table: dict) -> None:
    """Writes `table` (sql, columns, rows) as the expected-table JSON, one row a line."""
    rows = ",\n".join(json.dumps(row) for row in table["rows"])
    path.write_text(f'{{"sql": {json.dumps(table["sql"])},\n"columns": {json.dumps(table["columns"])},\n'
                    f'"rows": [\n{rows}\n]}}\n')


if __name__ == "__main__" and len(sys.argv) > 2:  # `FOLDER VERSION`: the sampler campaign's expected trials
    folder, version = Path(sys.argv[1]), int(sys.argv[2])
    versioned_store(folder, version, [])
    run_campaign(sampler_campaign(folder))
    write_expected(expected_of_format(version), stored_table(folder))
elif __name__ == "__main__":  # writes the expected table (run only on the reference code), in a format-1 store
    folder = Path(sys.argv[1])
    format_1_store(folder, [])
    sql = stored_table(folder)["sql"]  # the table as then written, before the column ADDED
    run_campaign(fixed_campaign(folder))
    write_expected(EXPECTED, {"sql": sql, **without_added(stored_table(folder))})
