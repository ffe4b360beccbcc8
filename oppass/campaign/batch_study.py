"""Fig. 4: the spread of fault-free accuracy over random batches, per batch size.

The plain model of each format classifies every sample once; a batch's accuracy is then
the mean correctness of its samples, so many random batches cost no extra inference.
"""

from __future__ import annotations

import numpy as np

from oppass.campaign.config import UNPROTECTED, Variant
from oppass.campaign.seeds import stable_words
from oppass.campaign.worker import Workload, worker_cache
from oppass.errors import OppassError

BATCH_SIZES = (10, 20, 50, 100, 200, 400, 800, 1600, 3200)
RANDOM_BATCHES = 1000


def batch_size_study(workload: Workload, fmt: str) -> list[tuple[int, int, float, float, float]]:
    """(batch size, batches, min, max, mean accuracy) for every BATCH_SIZES entry up to the data size."""
    correct = _correct_per_sample(workload, fmt)
    rng = np.random.default_rng(np.random.SeedSequence([workload.seed, *stable_words(f"batch-study/{fmt}")]))
    rows = []
    for size in (size for size in BATCH_SIZES if size <= correct.size):
        batches = np.stack([rng.choice(correct.size, size=size, replace=False) for _ in range(RANDOM_BATCHES)])
        accuracy = correct[batches].mean(axis=1)
        rows.append((size, RANDOM_BATCHES, float(accuracy.min()), float(accuracy.max()), float(accuracy.mean())))
    return rows


def _correct_per_sample(workload: Workload, fmt: str) -> np.ndarray:
    """Bool per sample of the data set: correct under the workload's metric, fault-free, plain `fmt` storage."""
    cache = worker_cache(workload)
    session = cache.session(Variant(fmt, UNPROTECTED))
    dataset = cache.dataset
    if dataset.labels is None:
        raise OppassError("the batch-size study needs labels")
    chunks = []
    for start in range(0, dataset.size, workload.batch_size):
        indices = np.arange(start, min(start + workload.batch_size, dataset.size))
        outputs, _ = session.run(dataset.feeds(indices))
        chunks.append(workload.metric.correct(outputs[None], outputs[None], dataset.labels[indices][None])[0])
    return np.concatenate(chunks)
