"""Statistics over the experiments of a condition, and the BERZAD rule (docs/METHODS.md).

Confidence intervals are two-sided 95 % Student t-intervals over the experiments:
mean ± t(0.975, n-1) · s / √n with s the sample standard deviation (ddof = 1). With a
single experiment the interval is the point itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
# Accuracies are ratios of counts; a difference that is zero up to float rounding is zero.
_ROUNDING_SLACK = 1e-12


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and 95 % t-interval of a set of experiment values."""

    mean: float
    std: float
    low: float
    high: float


def t_interval(values: Sequence[float] | np.ndarray) -> Interval:
    """The 95 % Student t confidence interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if values.size == 1:
        return Interval(mean, 0.0, mean, mean)
    std = float(values.std(ddof=1))
    half_width = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, values.size - 1)) * std / math.sqrt(values.size)
    return Interval(mean, std, mean - half_width, mean + half_width)


def is_zero_loss(accuracy: np.ndarray, fault_free_accuracy: np.ndarray, samples: int) -> bool:
    """True when, at 95 % confidence, the faults cost less than one sample of accuracy per batch.

    The drop per experiment is `fault_free_accuracy - accuracy` on the same batch of
    `samples` inputs; the condition shows zero loss when the upper bound of the drop's
    t-interval is at most 1 / samples (the resolution of an accuracy measured on one batch).
    A noisy condition whose drop cannot be bounded that tightly is not zero-loss.
    """
    drop = np.asarray(fault_free_accuracy, dtype=np.float64) - np.asarray(accuracy, dtype=np.float64)
    return t_interval(drop).high <= 1.0 / samples + _ROUNDING_SLACK


def berzad(bers: Sequence[float], zero_loss: Sequence[bool]) -> float:
    """Highest grid BER such that it and every lower grid BER show zero loss.

    0.0 when the lowest BER is already lossy; +inf when no BER on the grid is lossy
    (reported as "> max BER").
    """
    order = np.argsort(np.asarray(bers, dtype=np.float64), kind="stable")
    sorted_bers = np.asarray(bers, dtype=np.float64)[order]
    lossy = ~np.asarray(zero_loss, dtype=bool)[order]
    if not lossy.any():
        return math.inf
    first_lossy = int(np.argmax(lossy))
    return float(sorted_bers[first_lossy - 1]) if first_lossy else 0.0

