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
    predicted = logits.argmax(axis=2)
    changed = np.count_nonzero(predicted != reference_top1, axis=1)
    finite = np.isfinite(logits)
    nonfinite = np.zeros(runs, dtype=np.int64)
    if not finite.all():  # reducing along the short class axis is slow: only when needed
        nonfinite = np.count_nonzero(~finite.reshape(runs, samples, -1).all(axis=2), axis=1)
    if metric == "top5":
        best = np.argpartition(-logits, 4, axis=2)[:, :, :5]
        hits = np.count_nonzero((best == labels[:, :, None]).any(axis=2), axis=1)
    else:
        hits = np.count_nonzero(predicted == (reference_top1 if metric == "golden" else labels), axis=1)
    equal = (logits == reference).reshape(runs, -1).all(axis=1)
    outcomes = np.where(nonfinite > 0, NONFINITE, np.where(changed > 0, SDC, np.where(equal, MASKED, TOLERATED)))
    return hits, changed, nonfinite, outcomes.tolist()
