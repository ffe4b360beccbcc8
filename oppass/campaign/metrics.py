"""Per-sample correctness and the outcome class of a faulty run."""

from __future__ import annotations

import numpy as np

MASKED, TOLERATED, SDC, NONFINITE = "masked", "tolerated", "sdc", "nonfinite"
OUTCOMES = (MASKED, TOLERATED, SDC, NONFINITE)


def correct(logits: np.ndarray, labels: np.ndarray | None, reference_top1: np.ndarray, metric: str) -> np.ndarray:
    """Bool per sample: label in the top k (top1/top5), or top-1 equal to the fault-free top-1 (golden)."""
    if metric == "golden":
        return top1(logits) == reference_top1
    k = 5 if metric == "top5" else 1
    best = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k > 1 else top1(logits)[:, None]
    return (best == labels[:, None]).any(axis=1)


def top1(logits: np.ndarray) -> np.ndarray:
    """Index of the largest output per sample (NaN counts as largest, as numpy's argmax does)."""
    return logits.argmax(axis=1)


def outcome(logits: np.ndarray, reference: np.ndarray) -> str:
    """NONFINITE if any output is NaN/inf, SDC if some top-1 changed, MASKED if the outputs equal
    the fault-free ones bit for bit, TOLERATED otherwise."""
    if not np.isfinite(logits).all():
        return NONFINITE
    if (top1(logits) != top1(reference)).any():
        return SDC
    return MASKED if np.array_equal(logits, reference) else TOLERATED
