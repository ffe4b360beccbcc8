"""Exports of a campaign: CSV and JSON of trials and summaries, Table II, figures, HTML report.

Every file is written to a temporary name and renamed into place (`oppass.files`), so an interrupted
export leaves the previous version (or nothing), never half a file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oppass.campaign import metrics, plots, report
from oppass.campaign.config import CampaignConfig
from oppass.campaign.store import Store
from oppass.campaign.summary import BerzadRow, ConditionSummary, Setting, bit_rows
from oppass.files import write_text_atomically

if TYPE_CHECKING:
    from oppass.campaign.runner import Plan

TABLE_COLUMNS = ("network", "format", "protection", "fault_free_accuracy_percent", "berzad", "metric", "data",
                 "experiments", "batch_size")
BATCH_STUDY_COLUMNS = ("format", "batch_size", "batches", "min_accuracy", "max_accuracy", "mean_accuracy")


def setting(config: CampaignConfig, plan: Plan) -> Setting:
    """What the campaign's tables and figures state about it."""
    metric = plan.workload.metric
    data = "the digits test split" if config.data == "digits" else Path(config.data).name
    return Setting(Path(config.model).stem, data, plan.data_description, metric.describe(),
                   metrics.axis_label(metric.name, metric.rtol, metric.atol), plan.experiments,
                   plan.workload.batch_size)


def write_all(
    config: CampaignConfig,
    plan: Plan,
    store: Store,
    summaries: Sequence[ConditionSummary],
    rows: Sequence[BerzadRow],
    table: Sequence[BerzadRow],
) -> list[Path]:
    """Writes every export into `config.out` and returns the files written."""
    out = config.out
    context = setting(config, plan)
    keys = {summary.condition_key for summary in summaries}
    trials = [dataclasses.asdict(record) for record in store.trials() if record.condition_key in keys
              and record.trial < plan.experiments]
    summary_rows = [dataclasses.asdict(summary) for summary in summaries]
    table_rows = [table_row(context, row) for row in table]
    bits = [_bit_row(row) for row in bit_rows(rows)]
    batch_study = [dict(zip(BATCH_STUDY_COLUMNS, r, strict=True)) for r in store.batch_study()
                   if r[0] in plan.formats]
    files = [
        _write_csv(out / "trials.csv", trials),
        _write_json(out / "trials.json", trials),
        _write_csv(out / "summary.csv", summary_rows),
        _write_json(out / "summary.json", summary_rows),
        _write_csv(out / "table2.csv", table_rows),
        write_text_atomically(out / "table2.md", table_markdown(table_rows, context.caption)),
    ]
    if bits:
        files.append(_write_csv(out / "berzad_bits.csv", bits))
    if batch_study:
        files.append(_write_csv(out / "batch_study.csv", batch_study))
    figures = plots.write_figures(out, context, summaries, bit_rows(rows),
                                  [tuple(row.values()) for row in batch_study])
    files += [path for figure in figures for path in figure.files]
    html = report.render(config, plan, context, table_rows, summaries, bit_rows(rows), batch_study, figures,
                         len(trials))
    files.append(write_text_atomically(out / "report.html", html))
    return files


def table_markdown(table_rows: Sequence[dict], caption: str = "") -> str:
    """Table II as a Markdown table, after its caption (when given)."""
    header = ("| Network | Weights | Protection | Fault-free accuracy (%) | BERZAD |\n"
              "|---|---|---|---:|---:|\n")
    lead = f"Table II: {caption}. BERZAD: the highest BER up to which every BER shows zero loss " \
           "(0: the lowest BER is already lossy; > max: no BER of the grid is).\n\n" if caption else ""
    return lead + header + "".join(
        f"| {r['network']} | {r['format']} | {r['protection']} | {float(r['fault_free_accuracy_percent']):.1f} "
        f"| {r['berzad']} |\n"
        for r in table_rows
    )


def table_row(context: Setting, row: BerzadRow) -> dict:
    """A Table II row with the setting it was measured in."""
    return {
        "network": context.network,
        "format": row.format,
        "protection": row.level,
        "fault_free_accuracy_percent": round(100 * row.fault_free_accuracy, 2),
        "berzad": row.berzad_text,
        "metric": context.metric,
        "data": context.data,
        "experiments": context.experiments,
        "batch_size": context.batch_size,
    }


def _bit_row(row: BerzadRow) -> dict:
    return {"format": row.format, "bit": row.bit, "berzad": row.berzad_text,
            "fault_free_accuracy": row.fault_free_accuracy}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    handle = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_text_atomically(path, handle.getvalue())


def _write_json(path: Path, rows: list[dict]) -> Path:
    return write_text_atomically(path, json.dumps([_json_safe(row) for row in rows], indent=1))


def _json_safe(row: dict) -> dict:
    """NaN and infinities as strings, since JSON has no such numbers."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
