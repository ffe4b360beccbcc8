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


class TrialStreams:
    """The generators of many trials, each in the state `trial_rng` gives it, at a third of its cost: one
    Generator reseeded per trial (valid until the next one is asked for), SeedSequence's mixing of the words
    before the trial's cached per condition, and the hash constants of the rest (they do not depend on the
    words), numpy's algorithm in Python integers."""

    def __init__(self) -> None:
        self._generator = np.random.Generator(np.random.PCG64(0))

    def rng(self, campaign_seed: int, condition_key: str, trial: int) -> np.random.Generator:
        """The generator of trial `trial` of the condition named `condition_key` (this object's, reseeded)."""
        mixed_pool, constant = _condition_pool(campaign_seed, condition_key)
        mixing = _mixing_constants(constant, len(words := _uint32_words(trial)))
        pool = list(mixed_pool)
        for index, word in enumerate(words):  # entropy past the pool mixes into every pool word
            for i, (before, after) in enumerate(mixing[_POOL_SIZE * index : _POOL_SIZE * (index + 1)]):
                value = (word ^ before) * after & _MASK32
                mixed = (_MIX_MULT_L * pool[i] - _MIX_MULT_R * (value ^ value >> _XSHIFT)) & _MASK32
                pool[i] = mixed ^ mixed >> _XSHIFT
        w = []  # generate_state(4, uint64): eight 32-bit words
        for i, (before, after) in enumerate(_GENERATE_CONSTANTS):
            value = (pool[i % _POOL_SIZE] ^ before) * after & _MASK32
            w.append(value ^ value >> _XSHIFT)
        # Four uint64 (two words each, low first): PCG64 takes (high, low) pairs as its seed and its sequence,
        # then sets inc = 2 sequence + 1, state = inc, adds the seed and steps once.
        seed = w[1] << 96 | w[0] << 64 | w[3] << 32 | w[2]
        increment = ((w[5] << 96 | w[4] << 64 | w[7] << 32 | w[6]) << 1 | 1) & _MASK128
        state = ((increment + seed) * _PCG_MULTIPLIER + increment) & _MASK128
        self._generator.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": increment},
                                               "has_uint32": 0, "uinteger": 0}
        return self._generator


# numpy's SeedSequence (pool of 4 words of 32 bits) and PCG64 seeding.
_POOL_SIZE = 4
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_MASK32, _MASK128 = 2**32 - 1, 2**128 - 1
_PCG_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645


def _uint32_words(value: int) -> tuple[int, ...]:
    """SeedSequence's 32-bit words of a non-negative integer, least significant first (0 is one word)."""
    words = [value & _MASK32]
    while value > _MASK32:
        value >>= 32
        words.append(value & _MASK32)
    return tuple(words)


def _hashmix(value: int, constant: int) -> tuple[int, int]:
    value ^= constant
    constant = constant * _MULT_A & _MASK32
    value = value * constant & _MASK32
    return value ^ value >> _XSHIFT, constant


def _mix(x: int, y: int) -> int:
    result = (_MIX_MULT_L * x - _MIX_MULT_R * y) & _MASK32
    return result ^ result >> _XSHIFT


@functools.lru_cache(maxsize=4096)
def _mixed_pool(entropy: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """SeedSequence's pool after mixing `entropy` (at least 4 words), and the hash constant reached."""
    pool, constant = [], _INIT_A
    for word in entropy[:_POOL_SIZE]:
        value, constant = _hashmix(word, constant)
        pool.append(value)
    for source in range(_POOL_SIZE):
        for target in range(_POOL_SIZE):
            if source != target:
                value, constant = _hashmix(pool[source], constant)
                pool[target] = _mix(pool[target], value)
    for word in entropy[_POOL_SIZE:]:
        for target in range(_POOL_SIZE):
            value, constant = _hashmix(word, constant)
            pool[target] = _mix(pool[target], value)
    return tuple(pool), constant


@functools.lru_cache(maxsize=4096)
def _condition_pool(campaign_seed: int, condition_key: str) -> tuple[tuple[int, ...], int]:
    """The pool and hash constant after mixing the words of a campaign seed and a condition key."""
    return _mixed_pool((*_uint32_words(campaign_seed), *stable_words(condition_key)))


@functools.lru_cache(maxsize=64)
def _mixing_constants(constant: int, words: int) -> tuple[tuple[int, int], ...]:
    """The hash constant before and after each of the `words` * pool-size hash mixes that start at `constant`."""
    pairs = []
    for _ in range(words * _POOL_SIZE):
        after = constant * _MULT_A & _MASK32
        pairs.append((constant, after))
        constant = after
    return tuple(pairs)


def _generate_constants() -> tuple[tuple[int, int], ...]:
    pairs, constant = [], _INIT_B
    for _ in range(2 * _POOL_SIZE):
        after = constant * _MULT_B & _MASK32
        pairs.append((constant, after))
        constant = after
    return tuple(pairs)


_GENERATE_CONSTANTS = _generate_constants()  # generate_state's, before and after each word


def batch_indices(campaign_seed: int, experiment: int, n_samples: int, batch_size: int) -> np.ndarray:
    """Sample indices of the data batch of experiment `experiment` (sorted, without replacement)."""
    rng = np.random.default_rng(np.random.SeedSequence([campaign_seed, *stable_words(_BATCH_STREAM), experiment]))
    return np.sort(rng.choice(n_samples, size=batch_size, replace=False))
