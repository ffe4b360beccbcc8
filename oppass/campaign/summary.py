"""Per-condition summaries, BERZAD and the Table II rows, computed from stored trials."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from oppass.campaign import metrics, stats
from oppass.campaign.config import BER_STUDY, BIT_STUDY, protection_label
from oppass.campaign.records import TrialRecord


@dataclass(frozen=True)
class ConditionSummary:
    """Statistics of one condition over its experiments (accuracies are fractions in [0, 1])."""

    condition_key: str
    study: str
    format: str
    protection: str
    ber: float
    bit: int | None
    experiments: int
    accuracy_mean: float
    accuracy_std: float
    accuracy_ci_low: float
    accuracy_ci_high: float
    fault_free_accuracy: float
    drop_ci_low: float
    drop_ci_high: float
    zero_loss: bool
    flips_mean: float
    even_flip_words_mean: float | None
    masked_words_mean: float
    sdc_samples_mean: float
    nonfinite_samples_mean: float
    no_fault: int
    masked: int
    tolerated: int
    sdc: int
    nonfinite: int
    inference_seconds_mean: float
    inject_seconds_mean: float
    corrected_words_mean: float | None = None  # over the trials that recorded it


@dataclass(frozen=True)
class BerzadRow:
    """BERZAD of one curve: a (format, protection) of the BER study or a (format, bit) of the bit study."""

    study: str
    format: str
    protection: str
    level: str
    bit: int | None
    fault_free_accuracy: float
    berzad: float
    max_ber: float

    @property
    def berzad_text(self) -> str:
        """The BERZAD as the paper prints it: 0, a value, or "> max" when nothing on the grid was lossy."""
        return f"> {self.max_ber:.3g}" if math.isinf(self.berzad) else f"{self.berzad:.3g}"


def summarize(records: Sequence[TrialRecord]) -> list[ConditionSummary]:
    """One summary per condition, in (study, format, protection, bit, BER) order."""
    grouped: dict[str, list[TrialRecord]] = defaultdict(list)
    for record in records:
        grouped[record.condition_key].append(record)
    summaries = [_summarize_condition(group) for group in grouped.values()]
    return sorted(summaries, key=lambda s: (s.study, s.format, s.protection, s.bit or 0, s.ber))


def berzad_rows(summaries: Sequence[ConditionSummary]) -> list[BerzadRow]:
    """BERZAD of every curve: conditions that differ only in BER."""
    curves: dict[tuple, list[ConditionSummary]] = defaultdict(list)
    for summary in summaries:
        curves[(summary.study, summary.format, summary.protection, summary.bit)].append(summary)
    return [_berzad_row(curve) for curve in curves.values()]


def table2(rows: Sequence[BerzadRow], formats: Sequence[str], protections: Sequence[str]) -> list[BerzadRow]:
    """The BER-study rows in Table II order: by format, then protection, each in the given order."""
    chosen = [row for row in rows if row.study == BER_STUDY]
    return sorted(chosen, key=lambda row: (formats.index(row.format), protections.index(row.protection)))


def bit_rows(rows: Sequence[BerzadRow]) -> list[BerzadRow]:
    """The bit-position study rows, by format and bit."""
    return sorted((row for row in rows if row.study == BIT_STUDY), key=lambda row: (row.format, row.bit))


def _summarize_condition(group: list[TrialRecord]) -> ConditionSummary:
    first = group[0]
    samples = np.array([r.samples for r in group], dtype=np.float64)
    accuracy = np.array([r.correct for r in group]) / samples
    fault_free = np.array([r.fault_free_correct for r in group]) / samples
    accuracy_interval = stats.t_interval(accuracy)
    drop_interval = stats.t_interval(fault_free - accuracy)
    outcomes = [r.outcome for r in group]
    corrected = [r.corrected_words for r in group if r.corrected_words is not None]
    return ConditionSummary(
        condition_key=first.condition_key,
        study=first.study,
        format=first.format,
        protection=first.protection,
        ber=first.ber,
        bit=first.bit,
        experiments=len(group),
        accuracy_mean=accuracy_interval.mean,
        accuracy_std=accuracy_interval.std,
        accuracy_ci_low=max(accuracy_interval.low, 0.0),  # an accuracy is a fraction: the t-interval is clipped
        accuracy_ci_high=min(accuracy_interval.high, 1.0),
        fault_free_accuracy=float(fault_free.mean()),
        drop_ci_low=drop_interval.low,
        drop_ci_high=drop_interval.high,
        zero_loss=stats.is_zero_loss(accuracy, fault_free, first.samples),
        flips_mean=float(np.mean([r.flips for r in group])),
        even_flip_words_mean=None if first.even_flip_words is None else
        float(np.mean([r.even_flip_words or 0 for r in group])),
        masked_words_mean=float(np.mean([r.masked_words for r in group])),
        sdc_samples_mean=float(np.mean([r.sdc_samples for r in group])),
        nonfinite_samples_mean=float(np.mean([r.nonfinite_samples for r in group])),
        no_fault=outcomes.count(metrics.NO_FAULT),
        masked=outcomes.count(metrics.MASKED),
        tolerated=outcomes.count(metrics.TOLERATED),
        sdc=outcomes.count(metrics.SDC),
        nonfinite=outcomes.count(metrics.NONFINITE),
        inference_seconds_mean=float(np.mean([r.inference_seconds for r in group])),
        inject_seconds_mean=float(np.mean([r.inject_seconds for r in group])),
        corrected_words_mean=None if not corrected else float(np.mean(corrected)),
    )


def _berzad_row(curve: list[ConditionSummary]) -> BerzadRow:
    first = curve[0]
    bers = [summary.ber for summary in curve]
    return BerzadRow(
        study=first.study,
        format=first.format,
        protection=first.protection,
        level=protection_label(first.format, first.protection),
        bit=first.bit,
        fault_free_accuracy=float(np.mean([summary.fault_free_accuracy for summary in curve])),
        berzad=stats.berzad(bers, [summary.zero_loss for summary in curve]),
        max_ber=max(bers),
    )


@dataclass(frozen=True)
class Setting:
    """What every table and figure of a campaign states: network, data set, metric, experiments x batch."""

    network: str
    data: str
    data_description: str
    metric: str
    metric_axis_label: str
    experiments: int
    batch_size: int

    @property
    def caption(self) -> str:
        """E.g. `digits_cnn on digits; top-1 accuracy (...); 20 experiments × 400 samples`."""
        return (f"{self.network} on {self.data}; {self.metric}; {self.experiments} "
                f"experiment{'s' if self.experiments != 1 else ''} × {self.batch_size} samples")
