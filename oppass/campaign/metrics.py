"""Per-sample correctness and the outcome class of a faulty run."""

from __future__ import annotations

import numpy as np

from oppass.errors import OppassError

MASKED, TOLERATED, SDC, NONFINITE = "masked", "tolerated", "sdc", "nonfinite"
OUTCOMES = (MASKED, TOLERATED, SDC, NONFINITE)


def correct(
    logits: np.ndarray, labels: np.ndarray | None, reference_top1: np.ndarray, metric: str, class_axis: int = 1
) -> np.ndarray:
    """Bool per sample: label in the top k (top1/top5), or top-1 equal to the fault-free top-1 (golden).
    `class_axis` is the class axis of `logits` (2 when several runs are stacked in front)."""
    if metric == "golden":
        return top1(logits, class_axis) == reference_top1
    if labels is None:
        raise OppassError(f"metric {metric} needs labels")
    if metric == "top5":
        best = np.take(np.argpartition(-logits, 4, axis=class_axis), range(5), axis=class_axis)
        return (best == np.expand_dims(labels, class_axis)).any(axis=class_axis)
    return top1(logits, class_axis) == labels


def top1(logits: np.ndarray, class_axis: int = 1) -> np.ndarray:
    """Index of the largest output per sample (NaN counts as largest, as numpy's argmax does)."""
    return logits.argmax(axis=class_axis)


def score(
    logits: np.ndarray, reference: np.ndarray, reference_top1: np.ndarray, labels: np.ndarray | None, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per faulty run: correct samples, samples whose top-1 changed, samples with a NaN/inf output, and outcome.

    `logits` stacks the runs' outputs along a new first axis ([runs, samples, classes, ...]);
    `reference`, `reference_top1` and `labels` stack their batches' fault-free outputs, its
    top-1 and the labels likewise. The outcome is NONFINITE if any output is NaN/inf, SDC if
    some top-1 changed, MASKED if the outputs equal the fault-free ones bit for bit,
    TOLERATED otherwise.
    """
    runs, samples = logits.shape[:2]
    predicted = top1(logits, class_axis=2)
    changed = np.count_nonzero(predicted != reference_top1, axis=1)
    finite = np.isfinite(logits)
    nonfinite = np.zeros(runs, dtype=np.int64)
    if not finite.all():  # reducing along the short class axis is slow: only when needed
        nonfinite = np.count_nonzero(~finite.reshape(runs, samples, -1).all(axis=2), axis=1)
    hits = np.count_nonzero(correct(logits, labels, reference_top1, metric, class_axis=2), axis=1)
    equal = (logits == reference).reshape(runs, -1).all(axis=1)
    outcomes = np.where(nonfinite > 0, NONFINITE, np.where(changed > 0, SDC, np.where(equal, MASKED, TOLERATED)))
    return hits, changed, nonfinite, outcomes.tolist()
