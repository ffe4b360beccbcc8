"""Deterministic randomness: every trial and every data batch has its own seed.

Seeds come from numpy SeedSequence over (campaign seed, a stable hash of what is being
seeded, index), never from Python's salted hash(), so a trial replays alone, in any
process, and results do not depend on how trials are spread over workers.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

_BATCH_STREAM = "data-batch"


@functools.lru_cache(maxsize=4096)
def stable_words(text: str) -> tuple[int, ...]:
    """Four 32-bit words of a BLAKE2b digest of `text`: stable across runs and machines (memoised)."""
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


def trial_rng(campaign_seed: int, condition_key: str, trial: int) -> np.random.Generator:
    """The random generator of trial `trial` of the condition named `condition_key`."""
    return np.random.default_rng(np.random.SeedSequence([campaign_seed, *stable_words(condition_key), trial]))


def batch_indices(campaign_seed: int, experiment: int, n_samples: int, batch_size: int) -> np.ndarray:
    """Sample indices of the data batch of experiment `experiment` (sorted, without replacement)."""
    rng = np.random.default_rng(np.random.SeedSequence([campaign_seed, *stable_words(_BATCH_STREAM), experiment]))
    return np.sort(rng.choice(n_samples, size=batch_size, replace=False))
