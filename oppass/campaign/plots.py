"""Figures in the paper's style (matplotlib, Agg), each saved as PNG and SVG with a caption for the report.

- Fig. 6: accuracy vs BER per format, one curve per protection level, 95 % CI bands;
- Fig. 5: BERZAD vs bit position per format (0 drawn as a red down-arrow at the axis floor,
  "> max" as an up-arrow at the ceiling);
- Fig. 4: min..max fault-free accuracy over random batches vs batch size.

Every figure's title states the network, data set, metric and experiments × batch.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from oppass.campaign.config import BER_STUDY, protection_label, protection_order  # noqa: E402
from oppass.campaign.summary import BerzadRow, ConditionSummary, Setting  # noqa: E402
from oppass.files import write_bytes_atomically  # noqa: E402

FIGURE_SIZE = (7.0, 4.6)
# Percent axes run a little past 0 and 100 so that a curve along either edge stays visible.
HEADROOM = 3.0
BAND_ALPHA = 0.12
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)))
# Curves of one figure are shifted apart along the log BER axis by this many decades, so their markers and
# error bands do not sit on top of each other.
DODGE_DECADES = 0.04


@dataclass(frozen=True)
class Figure:
    """A written figure: its PNG (inlined in the report) and SVG, and its caption."""

    png: Path
    caption: str

    @property
    def files(self) -> list[Path]:
        """The PNG and SVG files."""
        return [self.png, self.png.with_suffix(".svg")]


def write_figures(
    out: Path,
    setting: Setting,
    summaries: Sequence[ConditionSummary],
    bits: Sequence[BerzadRow],
    batch_study: Sequence[tuple],
) -> list[Figure]:
    """Draws every figure the data allows; returns them."""
    figures: list[Figure] = []
    curves = _ber_curves(summaries)
    for fmt in dict.fromkeys(fmt for fmt, _ in curves):
        figure = _accuracy_vs_ber(setting, fmt, {p: c for (f, p), c in curves.items() if f == fmt})
        caption = (f"{setting.metric_axis_label.removesuffix(' (%)')} vs bit error rate with the weights stored as "
                   f"{fmt}, one curve per protection: mean over {setting.experiments} experiments of "
                   f"{setting.batch_size} samples of {setting.data}, shaded: 95 % t-interval of the mean. Metric: "
                   f"{setting.metric}.")
        figures.append(_save(figure, out / f"fig6_accuracy_vs_ber_{fmt}", caption))
    if bits:
        caption = ("BERZAD when flips hit only one bit position of every plain stored weight (0 = least "
                   "significant bit); a red down-arrow marks BERZAD 0 (lossy at the lowest BER), a green up-arrow "
                   f"> max BER (no loss on the grid). {setting.caption}.")
        figures.append(_save(_berzad_vs_bit(setting, bits), out / "fig5_berzad_vs_bit", caption))
    if batch_study:
        caption = (f"Fault-free accuracy over {batch_study[0][2]} random batches per batch size: mean and min..max. "
                   f"{setting.network} on {setting.data}; {setting.metric}.")
        figures.append(_save(_accuracy_range_vs_batch(setting, batch_study), out / "fig4_accuracy_vs_batch_size",
                             caption))
    return figures


def _ber_curves(summaries: Sequence[ConditionSummary]) -> dict[tuple[str, str], list[ConditionSummary]]:
    curves: dict[tuple[str, str], list[ConditionSummary]] = defaultdict(list)
    for summary in summaries:
        if summary.study == BER_STUDY:
            curves[(summary.format, summary.protection)].append(summary)
    return {key: sorted(curve, key=lambda s: s.ber) for key, curve in curves.items()}


def _accuracy_vs_ber(setting: Setting, fmt: str, curves: dict[str, list[ConditionSummary]]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    ordered = sorted(curves, key=lambda name: protection_order(fmt, name))
    for index, protection in enumerate(ordered):
        curve = curves[protection]
        shift = 10 ** (DODGE_DECADES * (index - (len(ordered) - 1) / 2))
        bers = [s.ber * shift for s in curve]
        (line,) = axes.plot(bers, [100 * s.accuracy_mean for s in curve], marker=MARKERS[index % len(MARKERS)],
                            linestyle=LINESTYLES[index % len(LINESTYLES)], markersize=4, linewidth=1.4,
                            label=protection_label(fmt, protection))
        low, high = [100 * s.accuracy_ci_low for s in curve], [100 * s.accuracy_ci_high for s in curve]
        axes.fill_between(bers, low, high, color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)
        for edge in (low, high):
            axes.plot(bers, edge, color=line.get_color(), linewidth=0.5, alpha=0.6)
    axes.set(xscale="log", xlabel="bit error rate", ylabel=setting.metric_axis_label, ylim=(-HEADROOM, 100 + HEADROOM))
    axes.set_title(f"{setting.network} on {setting.data}, {fmt} weights\n"
                   f"{setting.experiments} experiments × {setting.batch_size} samples; mean and 95 % CI",
                   fontsize="medium")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower left", fontsize="small", framealpha=0.9)
    figure.tight_layout()
    return figure


def _berzad_vs_bit(setting: Setting, bits: Sequence[BerzadRow]) -> plt.Figure:
    formats = list(dict.fromkeys(row.format for row in bits))
    figure, all_axes = plt.subplots(len(formats), 1, figsize=(FIGURE_SIZE[0], 2.6 * len(formats) + 0.8),
                                    squeeze=False)
    finite = [row.berzad for row in bits if 0 < row.berzad < math.inf]
    floor = min(finite, default=1e-9) / 10
    ceiling = max(row.max_ber for row in bits)
    for axes, fmt in zip(all_axes[:, 0], formats, strict=True):
        rows = [row for row in bits if row.format == fmt]
        measured = [row for row in rows if 0 < row.berzad < math.inf]
        axes.bar([r.bit for r in measured], [r.berzad for r in measured], color="tab:blue")
        zero = [r.bit for r in rows if r.berzad == 0]
        axes.scatter(zero, [floor] * len(zero), marker="v", color="red", zorder=3, label="BERZAD = 0")
        above = [r.bit for r in rows if math.isinf(r.berzad)]
        axes.scatter(above, [ceiling] * len(above), marker="^", color="green", zorder=3, label="> max BER")
        axes.set(yscale="log", ylim=(floor / 2, ceiling * 2), ylabel="BERZAD", title=f"{fmt} weights")
        axes.set_xticks(range(0, max(r.bit or 0 for r in rows) + 1, 4 if len(rows) > 16 else 1))
    all_axes[-1, 0].set_xlabel("bit position (0 = LSB)")
    figure.suptitle(f"{setting.network} on {setting.data}: BERZAD per bit position\n"
                    f"{setting.metric}; {setting.experiments} experiments × {setting.batch_size} samples",
                    fontsize="medium")
    figure.legend(*all_axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize="small")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


def _accuracy_range_vs_batch(setting: Setting, batch_study: Sequence[tuple]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    by_format: dict[str, list[tuple]] = defaultdict(list)
    for row in batch_study:
        by_format[row[0]].append(row)
    for fmt, rows in by_format.items():
        sizes = [row[1] for row in rows]
        (line,) = axes.plot(sizes, [100 * row[5] for row in rows], marker=".", label=f"{fmt} mean")
        axes.fill_between(sizes, [100 * row[3] for row in rows], [100 * row[4] for row in rows],
                          color=line.get_color(), alpha=0.2, label=f"{fmt} min..max")
    axes.set(xscale="log", xlabel="batch size", ylabel=f"fault-free {setting.metric_axis_label}",
             ylim=(-HEADROOM, 100 + HEADROOM))
    axes.set_title(f"{setting.network} on {setting.data}: spread over {batch_study[0][2]} random batches\n"
                   f"{setting.metric}", fontsize="medium")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _save(figure: plt.Figure, stem: Path, caption: str) -> Figure:
    for suffix in (".png", ".svg"):
        content = io.BytesIO()
        figure.savefig(content, format=suffix[1:], dpi=120)
        write_bytes_atomically(stem.with_suffix(suffix), content.getvalue())
    plt.close(figure)
    return Figure(stem.with_suffix(".png"), caption)
