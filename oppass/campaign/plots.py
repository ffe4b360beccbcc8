"""Figures in the paper's style (matplotlib, Agg), each saved as PNG and SVG.

- Fig. 6: accuracy vs BER per format, one curve per protection level, 95 % CI bands;
- Fig. 5: BERZAD vs bit position per format (0 drawn as a red down-arrow at the axis floor,
  "> max" as an up-arrow at the ceiling);
- Fig. 4: min..max fault-free accuracy over random batches vs batch size.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from oppass.campaign.config import BER_STUDY, ECC, protection_label  # noqa: E402
from oppass.campaign.protection import PLAIN  # noqa: E402
from oppass.campaign.protection import parse as parse_protection  # noqa: E402
from oppass.campaign.summary import BerzadRow, ConditionSummary  # noqa: E402
from oppass.formats import PARITY, SECDED  # noqa: E402

FIGURE_SIZE = (6.0, 4.0)


def write_figures(
    out: Path,
    network: str,
    summaries: Sequence[ConditionSummary],
    bits: Sequence[BerzadRow],
    batch_study: Sequence[tuple],
) -> list[Path]:
    """Draws every figure the data allows; returns the files written."""
    files: list[Path] = []
    curves = _ber_curves(summaries)
    for fmt in dict.fromkeys(fmt for fmt, _ in curves):
        files += _save(_accuracy_vs_ber(network, fmt, {p: c for (f, p), c in curves.items() if f == fmt}),
                       out / f"fig6_accuracy_vs_ber_{fmt}")
    if bits:
        files += _save(_berzad_vs_bit(network, bits), out / "fig5_berzad_vs_bit")
    if batch_study:
        files += _save(_accuracy_range_vs_batch(network, batch_study), out / "fig4_accuracy_vs_batch_size")
    return files


def _ber_curves(summaries: Sequence[ConditionSummary]) -> dict[tuple[str, str], list[ConditionSummary]]:
    curves: dict[tuple[str, str], list[ConditionSummary]] = defaultdict(list)
    for summary in summaries:
        if summary.study == BER_STUDY:
            curves[(summary.format, summary.protection)].append(summary)
    return {key: sorted(curve, key=lambda s: s.ber) for key, curve in curves.items()}


def _accuracy_vs_ber(network: str, fmt: str, curves: dict[str, list[ConditionSummary]]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    for protection in sorted(curves, key=lambda name: _protection_order(fmt, name)):
        curve = curves[protection]
        bers = [s.ber for s in curve]
        label = protection_label(fmt, protection)
        if parse_protection(protection).code == PARITY:
            label = f"OP {label}"
        (line,) = axes.plot(bers, [100 * s.accuracy_mean for s in curve], marker=".", label=label)
        axes.fill_between(bers, [100 * s.accuracy_ci_low for s in curve], [100 * s.accuracy_ci_high for s in curve],
                          color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set(xscale="log", xlabel="bit error rate", ylabel="accuracy (%)", ylim=(0, 100),
             title=f"{network}, {fmt}: accuracy vs BER (mean, 95 % CI)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    return figure


def _berzad_vs_bit(network: str, bits: Sequence[BerzadRow]) -> plt.Figure:
    formats = list(dict.fromkeys(row.format for row in bits))
    figure, all_axes = plt.subplots(len(formats), 1, figsize=(FIGURE_SIZE[0], 2.6 * len(formats)), squeeze=False)
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
        axes.set(yscale="log", ylim=(floor / 2, ceiling * 2), ylabel="BERZAD", title=f"{network}, {fmt}")
        axes.set_xticks(range(0, max(r.bit or 0 for r in rows) + 1, 4 if len(rows) > 16 else 1))
    all_axes[-1, 0].set_xlabel("bit position (0 = LSB)")
    figure.legend(*all_axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize="small")
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return figure


def _accuracy_range_vs_batch(network: str, batch_study: Sequence[tuple]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    by_format: dict[str, list[tuple]] = defaultdict(list)
    for row in batch_study:
        by_format[row[0]].append(row)
    for fmt, rows in by_format.items():
        sizes = [row[1] for row in rows]
        (line,) = axes.plot(sizes, [100 * row[5] for row in rows], marker=".", label=f"{fmt} mean")
        axes.fill_between(sizes, [100 * row[3] for row in rows], [100 * row[4] for row in rows],
                          color=line.get_color(), alpha=0.25, label=f"{fmt} min..max")
    axes.set(xscale="log", xlabel="batch size", ylabel="fault-free accuracy (%)",
             title=f"{network}: accuracy range over {batch_study[0][2]} random batches")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _protection_order(fmt: str, name: str) -> tuple[int, int, int]:
    """None and range first, then OP, then SEC-DED, each by word size (the range check after the code alone),
    ECC last."""
    chosen = parse_protection(name)
    rank = {PLAIN: 0, PARITY: 1, SECDED: 2, ECC: 3}[chosen.code]
    return (rank, chosen.word_bits(fmt), int(chosen.range_check))


def _save(figure: plt.Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return paths
