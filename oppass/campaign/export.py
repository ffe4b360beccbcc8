"""Exports of a campaign: CSV and JSON of trials and summaries, Table II, figures, HTML report.

Each file is written atomically (`oppass.files`): a full disk leaves the previous export, never a
truncated one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from oppass import files
from oppass.campaign import plots, report
from oppass.campaign.config import CampaignConfig
from oppass.campaign.store import Store
from oppass.campaign.summary import BerzadRow, ConditionSummary, bit_rows

TABLE_COLUMNS = ("network", "format", "op_level", "fault_free_accuracy_percent", "berzad")


def write_all(
    config: CampaignConfig,
    notes: list[str],
    store: Store,
    summaries: Sequence[ConditionSummary],
    rows: Sequence[BerzadRow],
    table: Sequence[BerzadRow],
) -> list[Path]:
    """Writes every export into `config.out` and returns the files written."""
    out = config.out
    network = Path(config.model).stem
    trials = [dataclasses.asdict(record) for record in store.trials()]
    summary_rows = [dataclasses.asdict(summary) for summary in summaries]
    table_rows = [_table_row(network, row) for row in table]
    bits = [_bit_row(row) for row in bit_rows(rows)]
    columns = ("format", "batch_size", "batches", "min_accuracy", "max_accuracy", "mean_accuracy")
    batch_study = [dict(zip(columns, r, strict=True)) for r in store.batch_study()]
    files = [
        _write_csv(out / "trials.csv", trials),
        _write_json(out / "trials.json", trials),
        _write_csv(out / "summary.csv", summary_rows),
        _write_json(out / "summary.json", summary_rows),
        _write_csv(out / "table2.csv", table_rows),
        _write_text(out / "table2.md", table_markdown(table_rows)),
    ]
    if bits:
        files.append(_write_csv(out / "berzad_bits.csv", bits))
    if batch_study:
        files.append(_write_csv(out / "batch_study.csv", batch_study))
    figures = plots.write_figures(out, network, summaries, bit_rows(rows), store.batch_study())
    files += figures
    files.append(report.write_report(out / "report.html", config, notes, table_rows, figures, len(trials)))
    return files


def table_markdown(table_rows: Sequence[dict]) -> str:
    """Table II as a Markdown table."""
    header = "| Network | Num. format | Level of OP | No-fault accuracy (%) | BERZAD |\n|---|---|---|---:|---:|\n"
    return header + "".join(
        f"| {r['network']} | {r['format']} | {r['op_level']} | {r['fault_free_accuracy_percent']:.1f} "
        f"| {r['berzad']} |\n"
        for r in table_rows
    )


def _table_row(network: str, row: BerzadRow) -> dict:
    return {
        "network": network,
        "format": row.format,
        "op_level": row.level,
        "fault_free_accuracy_percent": round(100 * row.fault_free_accuracy, 2),
        "berzad": row.berzad_text,
    }


def _bit_row(row: BerzadRow) -> dict:
    return {"format": row.format, "bit": row.bit, "berzad": row.berzad_text,
            "fault_free_accuracy": row.fault_free_accuracy}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    def write(handle: io.TextIOWrapper) -> None:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    files.write_atomically(path, files.text_writer(write))
    return path


def _write_json(path: Path, rows: list[dict]) -> Path:
    return files.write_text_atomically(path, json.dumps([_json_safe(row) for row in rows], indent=1))


def _write_text(path: Path, text: str) -> Path:
    return files.write_text_atomically(path, text)


def _json_safe(row: dict) -> dict:
    """NaN and infinities as strings, since JSON has no such numbers."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
