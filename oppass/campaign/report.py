"""The self-contained HTML report: command, versions, machine, notes, Table II and inline figures."""

from __future__ import annotations

import base64
import html
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort

import oppass
from oppass import files
from oppass.campaign.config import CampaignConfig


def write_report(
    path: Path,
    config: CampaignConfig,
    notes: list[str],
    table_rows: Sequence[dict],
    figures: Sequence[Path],
    trials: int,
) -> Path:
    """Writes report.html with every PNG figure inlined as base64."""
    images = "".join(
        f'<figure><img alt="{html.escape(f.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(f.read_bytes()).decode()}"><figcaption>{html.escape(f.stem)}</figcaption></figure>'
        for f in figures if f.suffix == ".png"
    )
    files.write_text_atomically(
        path,
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>oppass campaign</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:2px 8px}img{max-width:100%}</style></head><body>"
        f"<h1>oppass fault-injection campaign: {html.escape(Path(config.model).name)}</h1>"
        f"<h2>Command</h2><pre>{html.escape(config.command or _api_call(config))}</pre>"
        f"<h2>Environment</h2>{_definition_list(_environment())}"
        f"<h2>Notes</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes) or '<li>none</li>'}</ul>"
        f"<p>{trials} trials stored; {config.experiments} experiments per condition, seed {config.seed}.</p>"
        f"<h2>Table II</h2>{_table(table_rows)}<h2>Figures</h2>{images}</body></html>",
    )
    return path


def _environment() -> dict[str, str]:
    return {
        "date (UTC)": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "oppass": oppass.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} cores",
    }


def _api_call(config: CampaignConfig) -> str:
    return f"run_campaign({config!r})"


def _definition_list(items: dict[str, str]) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items.items()) + "</dl>"


def _table(rows: Sequence[dict]) -> str:
    if not rows:
        return "<p>no BER study in this campaign</p>"
    header = "".join(f"<th>{html.escape(column)}</th>" for column in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"
