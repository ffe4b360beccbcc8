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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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
    _check_rate(n_bits, ber)
    if sampler not in SAMPLERS:
        raise OppassError(f"unknown flip sampler {sampler}: expected one of {', '.join(map(str, SAMPLERS))}")
    if sampler == SAMPLER_GAPS:
        parts = [part for _, _, part in _gap_chunks(rng, n_bits, ber)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, dtype=np.int64)
    count = int(rng.binomial(n_bits, ber))
    positions = rng.choice(n_bits, size=count, replace=False) if count else np.empty(0, dtype=np.int64)
    positions = positions.astype(np.int64, copy=False)
    return np.sort(positions) if sort else positions


class SegmentFlips:
    """The bits `draw_flip_positions(rng, n_bits, ber)` draws over the concatenated bit stream of segments of
    `sizes` bytes, flipped in one segment at a time, in any order, holding at most `chunk` positions whatever
    the rate (a whole draw at BER 0.5 holds 8 bytes per bit of the stream).

    The stream is drawn once, chunk by chunk, as the segments ask for it; each chunk drawn is noted (each
    segment's flip count, `counts`, and the generator's state where its draws start), so a segment whose
    draws were passed (asked for out of order) is drawn again from there.
    """

    def __init__(self, rng: np.random.Generator, sizes: Sequence[int], ber: float, chunk: int = 2**18) -> None:
        self._ber, self._chunk, self._kind = ber, chunk, type(rng.bit_generator)
        offsets = np.cumsum([0, *sizes], dtype=np.int64)[:-1].tolist()
        self._bounds = [(8 * start, 8 * (start + int(size))) for start, size in zip(offsets, sizes, strict=True)]
        self._n = 8 * int(sum(sizes))
        _check_rate(self._n, ber)
        self._starts: list[tuple[int, Mapping[str, Any], int, int] | None] = [None] * len(self._bounds)
        self.counts = [0] * len(self._bounds)
        self._frontier = self._drawn(rng)
        self._current: tuple[int, np.ndarray] | None = None  # the last chunk drawn, and its number

    @property
    def count(self) -> int:
        """Flips over all segments (the rest of the stream drawn if no segment asked for it)."""
        while self._advance():
            pass
        return sum(self.counts)

    def flip(self, index: int, buffer: np.ndarray) -> None:
        """Flips segment `index`'s bits in `buffer` (that segment's bytes, in place)."""
        start, end = self._bounds[index]
        view = _byte_view(buffer)
        if view.size * 8 != end - start:
            raise OppassError(f"segment {index} has {(end - start) // 8} bytes, got a buffer of {buffer.nbytes}")
        while self._starts[index] is None:  # the stream not drawn up to the segment's first flip yet
            if self._current is not None and self._current[1].size and self._current[1][-1] >= end:
                return  # drawn past it: no flip in this segment
            if not self._advance():
                return
        number, state, last, expected = self._starts[index]  # type: ignore[misc]  # the loop above set it
        if self._current is not None and number == self._current[0]:
            parts = self._from_frontier()
        else:
            rng = np.random.Generator(self._kind())
            rng.bit_generator.state = state
            parts = (part for _, _, part in _gap_chunks(rng, self._n, self._ber, self._chunk, last, expected))
        for part in parts:
            low, high = np.searchsorted(part, (start, end))
            flip_bits([view], part[low:high] - start)
            if high < part.size:
                return

    def _drawn(self, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
        """The stream's chunks, numbered, each noted as it is drawn."""
        edges = np.array([bound for pair in self._bounds for bound in pair], dtype=np.int64)
        state = rng.bit_generator.state
        for number, (last, expected, part) in enumerate(_gap_chunks(rng, self._n, self._ber, self._chunk)):
            if part.size:
                found = np.searchsorted(part, edges).reshape(-1, 2)
                for index in np.flatnonzero(found[:, 1] > found[:, 0]).tolist():
                    self.counts[index] += int(found[index, 1] - found[index, 0])
                    if self._starts[index] is None:
                        self._starts[index] = (number, state, last, expected)
            yield number, part
            state = rng.bit_generator.state

    def _advance(self) -> bool:
        """Draws the next chunk of the stream; False at its end."""
        drawn = next(self._frontier, None)
        if drawn is None:
            return False
        self._current = drawn
        return True

    def _from_frontier(self) -> Iterator[np.ndarray]:
        """The last chunk drawn, then each next one as it is drawn."""
        while self._current is not None:
            yield self._current[1]
            if not self._advance():
                return


def _check_rate(n_bits: int, ber: float) -> None:
    if n_bits < 0:
        raise OppassError(f"number of bits must be non-negative, got {n_bits}")
    if not 0.0 <= ber <= 1.0:
        raise OppassError(f"bit error rate must be between 0 and 1, got {ber}")


def _gap_chunks(rng: np.random.Generator, n: int, ber: float, limit: int | None = None, last: int = -1,
                expected: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Bits of [0, n) each kept with probability `ber`, ascending, in chunks of at most `limit` positions: the
    first at Geometric(ber) - 1, each next one a Geometric(ber) gap further; gaps drawn in chunks of the expected
    count plus 5 standard deviations. Each gap is one draw, in order, so the limit changes no position.

    Yields (last, expected, positions): the position before the chunk and the unlimited chunk size it was drawn
    with, from which the draw resumes (`last`, `expected`) with `rng` in the state it had before the chunk.
    """
    if n == 0 or ber == 0.0:
        return
    if expected is None:
        expected = int(n * ber + 5 * np.sqrt(n * ber) + 16)
    if ber == 1.0:
        while last < n - 1:
            part = np.arange(last + 1, n if limit is None else min(last + 1 + limit, n), dtype=np.int64)
            yield last, expected, part
            last = int(part[-1])
        return
    while last < n:
        # A gap past the end ends the draw: capped at n + 1, the sum cannot overflow int64 (numpy returns
        # int64's maximum for gaps beyond it, at tiny rates); the positions below n are the same.
        part = _geometric_gaps(rng, ber, expected if limit is None else min(expected, limit), n + 1)
        part[0] += last
        np.cumsum(part, out=part)
        before, last = last, int(part[-1])
        yield before, expected, part[: np.searchsorted(part, n)] if last >= n else part
        expected = max(16, int((n - last) * ber * 1.2) + 16)


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
    """Inverts the given bits of the concatenated little-endian bit stream of `buffers`, in place (a position
    given twice is inverted twice). The bits of each byte are combined first, so every byte is XORed once."""
    byte_views = [_byte_view(buffer) for buffer in buffers]
    sizes = np.array([view.size for view in byte_views], dtype=np.int64)
    ends = np.cumsum(sizes)
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size > 1 and not (positions[1:] >= positions[:-1]).all():
        positions = np.sort(positions)
    total_bits = int(ends[-1]) * 8 if sizes.size else 0
    if positions.size and (positions[0] < 0 or positions[-1] >= total_bits):
        raise OppassError(f"bit positions must lie in [0, {total_bits}), got {positions[0]}..{positions[-1]}")
    stream_bytes = positions >> 3
    firsts = np.flatnonzero(np.diff(stream_bytes, prepend=-1))
    touched = stream_bytes[firsts]
    masks = np.bitwise_xor.reduceat(np.left_shift(1, positions & 7).astype(np.uint8), firsts) if firsts.size \
        else np.empty(0, np.uint8)
    bounds = np.searchsorted(touched, np.concatenate([[0], ends]))
    for index, view in enumerate(byte_views):
        low, high = bounds[index], bounds[index + 1]
        view[touched[low:high] - (ends[index] - sizes[index])] ^= masks[low:high]


def _byte_view(buffer: np.ndarray) -> np.ndarray:
    """A writable flat uint8 view sharing memory with an unsigned little-endian array."""
    if not isinstance(buffer, np.ndarray) or buffer.dtype.kind != "u":
        raise OppassError("fault injection needs unsigned integer numpy arrays")
    if buffer.dtype.byteorder == ">" or (buffer.dtype.byteorder == "=" and np.little_endian is False):
        raise OppassError("fault injection needs little-endian arrays")
    if not buffer.flags.c_contiguous or not buffer.flags.writeable:
        raise OppassError("fault injection needs writable C-contiguous arrays")
    return buffer.reshape(-1).view(np.uint8)
