"""The self-contained HTML report: setting, definitions, Table II, per-condition and study tables, figures.

Figures are inlined (base64 PNG), so the file reads alone; the layout wraps long lines and
scales images, so it fits a page without horizontal scrolling.
"""

from __future__ import annotations

import base64
import html
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

import oppass
from oppass.campaign import metrics
from oppass.campaign.config import BER_STUDY, CampaignConfig, protection_label, protection_order
from oppass.campaign.plots import Figure
from oppass.campaign.summary import BerzadRow, ConditionSummary, Setting

if TYPE_CHECKING:
    from oppass.campaign.runner import Plan

STYLE = (
    "body{font-family:sans-serif;max-width:64em;margin:auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;font-size:.8em;margin:.5em 0}"
    "td,th{border:1px solid #999;padding:2px 4px}th{background:#eee;font-weight:600}"
    "td.n{text-align:right;white-space:nowrap}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.5em}"
    "img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.9em}"
    "caption{text-align:left;font-size:.95em;padding:.3em 0}dt{font-weight:bold}dd{margin:0 0 .4em 1.5em}"
)


def render(
    config: CampaignConfig,
    plan: Plan,
    setting: Setting,
    table_rows: Sequence[dict],
    summaries: Sequence[ConditionSummary],
    bits: Sequence[BerzadRow],
    batch_study: Sequence[dict],
    figures: Sequence[Figure],
    trials: int,
) -> str:
    """The report's HTML."""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in plan.notes) or "<li>none</li>"
    max_ber = max((s.ber for s in summaries), default=config.ber_max)
    sections = [
        f"<h1>Fault-injection campaign: {html.escape(setting.network)}</h1>",
        f"<p>{html.escape(setting.caption)}; {trials} trials, seed {config.seed}.</p>",
        "<h2>Command</h2>",
        f"<pre>{html.escape(config.command or _api_call(config))}</pre>",
        "<h2>Data</h2>",
        f"<p>{html.escape(setting.data_description)}. Scored output {html.escape(repr(plan.workload.output))}; "
        f"metric: {html.escape(setting.metric)}.</p>",
        f"<h2>Notes</h2><ul>{notes}</ul>",
        "<h2>Definitions</h2>",
        _definitions(setting, max_ber),
        "<h2>Table II</h2>",
        _table(f"Table II: {setting.caption}.", ["Network", "Weights", "Protection", "Fault-free accuracy (%)",
                                                "BERZAD"],
               [[r["network"], r["format"], r["protection"], f"{r['fault_free_accuracy_percent']:.1f}", r["berzad"]]
                for r in table_rows], numeric=(3, 4)) if table_rows else "<p>no BER study in this campaign</p>",
        "<h2>Per condition</h2>",
        _conditions_table(setting, summaries),
    ]
    if bits:
        sections += ["<h2>Bit-position study</h2>", _bits_table(setting, bits)]
    if batch_study:
        sections += ["<h2>Batch-size study</h2>", _batch_table(setting, batch_study)]
    sections += ["<h2>Figures</h2>", *(_figure(figure) for figure in figures)]
    sections += ["<h2>Environment</h2>", _definition_list(_environment())]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>oppass campaign: {html.escape(setting.network)}</title><style>{STYLE}</style></head><body>"
            + "".join(sections) + "</body></html>")


def _definitions(setting: Setting, max_ber: float) -> str:
    outcomes = {
        metrics.NO_FAULT: "no bit flipped in the trial",
        metrics.MASKED: "bits flipped, but the scored output is bit-identical to the fault-free one",
        metrics.TOLERATED: "the output changed, but no sample is corrupted",
        metrics.SDC: "silent data corruption: some finite sample is corrupted (its top-1 changed at some position; "
                     "for allclose, outside tolerance; for a user metric, correct without faults but not now)",
        metrics.NONFINITE: "some output is NaN or infinite (such a sample is never correct)",
    }
    items = {
        "BERZAD": "bit error rate at zero accuracy drop: the highest BER of the grid such that it and every lower "
                  "BER are zero-loss, i.e. the upper end of the 95 % t-interval of the paired accuracy drop "
                  f"(fault-free minus faulty, same batch) is at most one sample per batch (1/{setting.batch_size}). "
                  "BERZAD 0: the lowest BER of the grid is already lossy. "
                  f"BERZAD > {max_ber:.3g} (> max BER): no BER of the grid is lossy.",
        "Accuracy": f"{setting.metric}, in % of the samples of a batch; a sample with a NaN or infinite output is "
                    "never correct.",
        "Protection": "none (plain storage); OP per weight: Opportunistic Parity over each weight; OP per N bits: "
                      "over words of N bits; SEC-DED per N bits: a zero-overhead SEC-DED code over words of N bits, "
                      "its check bits in the weights' lowest bits (one flip corrected, two zeroed); range check: a "
                      "weight beyond its tensor's fault-free maximum magnitude is zeroed (\"+ range\": after the "
                      "code); ECC (72,64): SEC-DED over 64-bit words (12.5 % extra storage).",
        "Even-flip words": "words hit by an even, non-zero number of flips: invisible to a parity check over the "
                           "word (for plain storage, the word is one weight; for SEC-DED, the code's word).",
        **{f"Outcome: {metrics.OUTCOME_NAMES[name]}": text for name, text in outcomes.items()},
    }
    return _definition_list(items)


def _conditions_table(setting: Setting, summaries: Sequence[ConditionSummary]) -> str:
    chosen = sorted((s for s in summaries if s.study == BER_STUDY),
                    key=lambda s: (s.format, protection_order(s.format, s.protection), s.ber))
    if not chosen:
        return "<p>no BER study in this campaign</p>"
    header = ["Weights", "Protection", "BER", "Accuracy % [95 % CI]", "Zero loss", "Flips",
              "Even-flip words", "Masked words", *(f"{metrics.OUTCOME_NAMES[o]}" for o in metrics.OUTCOMES)]
    rows = [[s.format, protection_label(s.format, s.protection), f"{s.ber:.3g}",
             f"{100 * s.accuracy_mean:.1f} [{100 * s.accuracy_ci_low:.1f}, {100 * s.accuracy_ci_high:.1f}]",
             "yes" if s.zero_loss else "no", _number(s.flips_mean), _number(s.even_flip_words_mean),
             _number(s.masked_words_mean), *(str(getattr(s, o)) for o in metrics.OUTCOMES)] for s in chosen]
    caption = (f"Each condition over {setting.experiments} experiments × {setting.batch_size} samples: accuracy, "
               "zero-loss verdict, mean flips, even-flip words and masked words per trial, and the trials of each "
               f"outcome class. {setting.caption}.")
    return _table(caption, header, rows, numeric=tuple(range(2, len(header))))


def _bits_table(setting: Setting, bits: Sequence[BerzadRow]) -> str:
    caption = f"BERZAD per bit position of the plain stored weights (0 = least significant). {setting.caption}."
    return _table(caption, ["Weights", "Bit", "BERZAD"], [[r.format, str(r.bit), r.berzad_text] for r in bits],
                  numeric=(1, 2))


def _batch_table(setting: Setting, rows: Sequence[dict]) -> str:
    caption = (f"Fault-free accuracy over random batches per batch size (min, max, mean, %). {setting.network} on "
               f"{setting.data}; {setting.metric}.")
    return _table(caption, ["Weights", "Batch size", "Batches", "Min", "Max", "Mean"],
                  [[r["format"], str(r["batch_size"]), str(r["batches"]), f"{100 * r['min_accuracy']:.1f}",
                    f"{100 * r['max_accuracy']:.1f}", f"{100 * r['mean_accuracy']:.1f}"] for r in rows],
                  numeric=(1, 2, 3, 4, 5))


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(figure.png.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(figure.png.stem)}: {html.escape(figure.caption)}</figcaption></figure>")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


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


def _table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]], numeric: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{html.escape(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"
