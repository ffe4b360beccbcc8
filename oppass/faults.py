"""Bit-flip fault injection into stored (packed) weight memory.

A set of unsigned arrays is seen as one little-endian bit stream: their bytes are
concatenated in order and stream bit `p` is bit `p % 8` of byte `p // 8`, as in
docs/FORMAT.md.

Positions at a bit error rate are drawn by a *sampler*: SAMPLER_CHOICE (a Binomial count, then
numpy's `choice(replace=False)`, whose time and memory grow with the number of bits above n/50
flips; campaign stores of format 1 replay with it) or SAMPLER_GAPS (the default: the gaps
between flipped bits drawn from a geometric law, which is each bit flipping independently,
in time and memory proportional to the flips). `distinct_positions` draws an exact count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from oppass.errors import OppassError

SAMPLER_CHOICE = 1
SAMPLER_GAPS = 2
SAMPLERS = (SAMPLER_CHOICE, SAMPLER_GAPS)
# numpy's geometric sampler searches its CDF from this p on and inverts an exponential below it.
_GEOMETRIC_SEARCH = 0.333333333333333333333333


def draw_flip_positions(rng: np.random.Generator, n_bits: int, ber: float, *, sort: bool = True,
                        sampler: int = SAMPLER_GAPS) -> np.ndarray:
    """Distinct int64 bit positions in [0, n_bits), each bit in with probability `ber` independently (so
    Binomial(n_bits, ber) of them, every set of a size equally likely), drawn by `sampler`; sorted unless
    `sort` is False (the same set either way: sorting draws nothing from `rng`; SAMPLER_GAPS is always sorted)."""
    if n_bits < 0:
        raise OppassError(f"number of bits must be non-negative, got {n_bits}")
    if not 0.0 <= ber <= 1.0:
        raise OppassError(f"bit error rate must be between 0 and 1, got {ber}")
    if sampler not in SAMPLERS:
        raise OppassError(f"unknown flip sampler {sampler}: expected one of {', '.join(map(str, SAMPLERS))}")
    if sampler == SAMPLER_GAPS:
        return _gap_positions(rng, n_bits, ber)
    count = int(rng.binomial(n_bits, ber))
    positions = rng.choice(n_bits, size=count, replace=False) if count else np.empty(0, dtype=np.int64)
    positions = positions.astype(np.int64, copy=False)
    return np.sort(positions) if sort else positions


def _gap_positions(rng: np.random.Generator, n: int, ber: float) -> np.ndarray:
    """Bits of [0, n) each kept with probability `ber`: the first at Geometric(ber) - 1, each next one a
    Geometric(ber) gap further; gaps drawn in chunks of the expected count plus 5 standard deviations."""
    if n == 0 or ber == 0.0:
        return np.empty(0, dtype=np.int64)
    if ber == 1.0:
        return np.arange(n, dtype=np.int64)
    expected = n * ber
    chunk = int(expected + 5 * np.sqrt(expected) + 16)
    parts, last = [], -1
    while last < n:
        part = _geometric_gaps(rng, ber, chunk, n + 1)
        part[0] += last
        np.cumsum(part, out=part)
        parts.append(part)
        last = int(part[-1])
        chunk = max(16, int((n - last) * ber * 1.2) + 16)
    positions = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return positions[: np.searchsorted(positions, n)]


def _geometric_gaps(rng: np.random.Generator, p: float, size: int, cap: int) -> np.ndarray:
    """`np.minimum(rng.geometric(p, size), cap)` as int64, the same values from the same stream.

    Below p = 1/3 numpy's geometric is ceil(-E / log1p(-p)) per draw, E its standard exponential
    (with int64's maximum beyond it, where the cap applies); vectorised here, it costs half as much.
    Capped at n + 1, a gap past the end ends the draw and the running sum cannot overflow int64. A test
    compares it with `rng.geometric`, so a numpy that draws otherwise is caught.
    """
    if p >= _GEOMETRIC_SEARCH:
        return np.minimum(rng.geometric(p, size=size), cap)
    gaps = rng.standard_exponential(size=size)
    with np.errstate(over="ignore"):  # inf at tiny p: capped below
        np.divide(gaps, -math.log1p(-p), out=gaps)  # libm's log1p, as numpy's C code calls it
    np.ceil(gaps, out=gaps)
    np.minimum(gaps, cap, out=gaps)
    return gaps.astype(np.int64)


def distinct_positions(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` distinct int64 positions of [0, n), sorted, every such set equally likely.

    Uniform draws, duplicates dropped and redrawn until `count` remain (the set is the distinct
    values of a prefix of an i.i.d. uniform sequence, whose law no permutation of [0, n) changes:
    uniform); above n/2 the complement is drawn instead. Time O(count log count), memory O(count).
    """
    if not 0 <= count <= n:
        raise OppassError(f"cannot draw {count} distinct positions out of {n}")
    if count > n // 2:
        left_out = distinct_positions(rng, n, n - count)
        keep = np.ones(n, dtype=bool)  # count > n/2: this is O(count)
        keep[left_out] = False
        return np.flatnonzero(keep).astype(np.int64, copy=False)
    drawn = distinct_sorted(rng.integers(0, n, size=count, dtype=np.int64))
    while drawn.size < count:
        drawn = distinct_sorted(np.concatenate([drawn, rng.integers(0, n, size=count - drawn.size, dtype=np.int64)]))
    return drawn


def distinct_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (a sort and a mask: numpy 2's hash-based `np.unique` is 100x slower here)."""
    ordered = np.sort(values)
    keep = np.empty(ordered.size, dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def group(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, index of each value's among them): `np.unique(values, return_inverse=True)`."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.empty(ordered.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    slots = np.empty(values.size, dtype=np.int64)
    slots[order] = np.cumsum(first) - 1
    return ordered[first], slots


def first_occurrences(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value, ascending (so in the order first seen)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.empty(ordered.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return np.sort(order[first])


def flip_bits(buffers: Sequence[np.ndarray], positions: np.ndarray) -> None:
    """Inverts the given bits of the concatenated little-endian bit stream of `buffers`, in place."""
    byte_views = [_byte_view(buffer) for buffer in buffers]
    sizes = np.array([view.size for view in byte_views], dtype=np.int64)
    ends = np.cumsum(sizes)
    positions = np.asarray(positions, dtype=np.int64)
    total_bits = int(ends[-1]) * 8 if sizes.size else 0
    if positions.size and (positions.min() < 0 or positions.max() >= total_bits):
        raise OppassError(f"bit positions must lie in [0, {total_bits}), got {positions.min()}..{positions.max()}")
    stream_bytes = positions // 8
    masks = np.left_shift(1, positions % 8).astype(np.uint8)
    owners = np.searchsorted(ends, stream_bytes, side="right")
    for index, view in enumerate(byte_views):
        mine = owners == index
        np.bitwise_xor.at(view, stream_bytes[mine] - (ends[index] - sizes[index]), masks[mine])


def _byte_view(buffer: np.ndarray) -> np.ndarray:
    """A writable flat uint8 view sharing memory with an unsigned little-endian array."""
    if not isinstance(buffer, np.ndarray) or buffer.dtype.kind != "u":
        raise OppassError("fault injection needs unsigned integer numpy arrays")
    if buffer.dtype.byteorder == ">" or (buffer.dtype.byteorder == "=" and np.little_endian is False):
        raise OppassError("fault injection needs little-endian arrays")
    if not buffer.flags.c_contiguous or not buffer.flags.writeable:
        raise OppassError("fault injection needs writable C-contiguous arrays")
    return buffer.reshape(-1).view(np.uint8)
