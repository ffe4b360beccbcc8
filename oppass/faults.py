"""Bit-flip fault injection into stored (packed) weight memory.

A set of unsigned arrays is seen as one little-endian bit stream: their bytes are
concatenated in order and stream bit `p` is bit `p % 8` of byte `p // 8`, as in
docs/FORMAT.md.

Positions at a bit error rate are drawn by a *sampler*, each bit flipping independently with
probability BER whichever: SAMPLER_CHOICE (a Binomial count, then numpy's `choice(replace=False)`,
whose time and memory grow with the number of bits above n/50 flips; campaign stores of format 1
replay with it), SAMPLER_GAPS (the default, stores of format 2 and `SegmentFlips`: the gaps between
flipped bits drawn from a geometric law, one standard exponential per flip) or SAMPLER_WORDS
(stores of format 3: up to FEW_FLIPS expected flips a Binomial(n, BER) count, then that
many distinct uniform positions; from WORD_RATE a bit mask built from random 64-bit words,
`draw_flip_mask`; between them SAMPLER_GAPS's draws).
`distinct_positions` draws an exact count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from oppass.errors import OppassError

SAMPLER_CHOICE = 1
SAMPLER_GAPS = 2
SAMPLER_WORDS = 3
SAMPLERS = (SAMPLER_CHOICE, SAMPLER_GAPS, SAMPLER_WORDS)
# SAMPLER_WORDS: a count and positions up to FEW_FLIPS expected flips; a mask from WORD_RATE on (the dyadic rate
# floor(BER 2^WORD_LEVELS) / 2^WORD_LEVELS from at most WORD_LEVELS random words per 64 bits, the rest of the rate
# as geometric gaps), in blocks of WORD_BLOCK words. Chosen on this machine's costs: a random word ~3.8 ns, a gap
# ~9 ns, sorting ~14 ns per position.
FEW_FLIPS = 256
WORD_RATE = 1 / 32
WORD_LEVELS = 6
WORD_BLOCK = 2**16
# numpy's geometric sampler searches its CDF from this p on and inverts an exponential below it.
_GEOMETRIC_SEARCH = 0.333333333333333333333333


def draw_flip_positions(rng: np.random.Generator, n_bits: int, ber: float, *, sort: bool = True,
                        sampler: int = SAMPLER_GAPS) -> np.ndarray:
    """Distinct int64 bit positions in [0, n_bits), each bit in with probability `ber` independently (so
    Binomial(n_bits, ber) of them, every set of a size equally likely), drawn by `sampler`; sorted unless
    `sort` is False (the same set either way: sorting draws nothing from `rng`; SAMPLER_GAPS and SAMPLER_WORDS are
    always sorted)."""
    _check_rate(n_bits, ber)
    if sampler not in SAMPLERS:
        raise OppassError(f"unknown flip sampler {sampler}: expected one of {', '.join(map(str, SAMPLERS))}")
    if sampler == SAMPLER_GAPS:
        parts = [part for _, _, part in _gap_chunks(rng, n_bits, ber)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, dtype=np.int64)
    if sampler == SAMPLER_WORDS:
        if n_bits * ber <= FEW_FLIPS:
            return distinct_positions(rng, n_bits, int(rng.binomial(n_bits, ber)), raw=True)
        if ber < WORD_RATE:
            return draw_flip_positions(rng, n_bits, ber, sampler=SAMPLER_GAPS)
        parts = [_mask_positions(words) + 64 * start for start, words in _word_blocks(rng, n_bits, ber)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    count = int(rng.binomial(n_bits, ber))
    positions = rng.choice(n_bits, size=count, replace=False) if count else np.empty(0, dtype=np.int64)
    positions = positions.astype(np.int64, copy=False)
    return np.sort(positions) if sort else positions


def draw_flip_mask(rng: np.random.Generator, n_bits: int, ber: float) -> np.ndarray:
    """The bits `draw_flip_positions(rng, n_bits, ber, sampler=SAMPLER_WORDS)` draws when `uses_mask(n_bits, ber)`,
    as a little-endian uint64 mask of ceil(n_bits / 64) words (zero past `n_bits`), from the same draws."""
    _check_rate(n_bits, ber)
    if not uses_mask(n_bits, ber):
        raise OppassError(f"flip masks are drawn from BER {WORD_RATE:g} on, got {ber:g}")
    mask = np.empty(-(-n_bits // 64), dtype=np.uint64)
    for start, words in _word_blocks(rng, n_bits, ber):
        mask[start : start + words.size] = words
    return mask


def uses_mask(n_bits: int, ber: float) -> bool:
    """Whether SAMPLER_WORDS draws `n_bits` bits at `ber` as a mask (`draw_flip_mask`)."""
    return ber >= WORD_RATE and n_bits * ber > FEW_FLIPS


def _word_blocks(rng: np.random.Generator, n: int, ber: float) -> Iterator[tuple[int, np.ndarray]]:
    """SAMPLER_WORDS from WORD_RATE on: (first word, uint64 mask words) of each block of WORD_BLOCK words in turn.

    Each bit is in with probability `ber`, independently: it is in A (probability the dyadic d = m / 2^L, m =
    floor(ber 2^L), L = WORD_LEVELS) or in C (probability (ber - d) / (1 - d), independent of A), so with
    probability d + (1 - d)(ber - d) / (1 - d) = ber. C is drawn first over all n bits, as SAMPLER_GAPS's
    geometric gaps (ber - d < 2^-L: sparse). A is drawn word-parallel, block by block: from the
    lowest set bit of m up to bit L - 1, x = u for the first, then x = u | x where m's bit is 1, u & x where
    it is 0, u a fresh random word each time; a bit of x is then 1 with probability 0.b(L-1)...b0 (binary) = d.
    """
    if ber == 1.0:
        dyadic, rest = 2**WORD_LEVELS, 0.0
    else:
        dyadic = math.floor(ber * 2**WORD_LEVELS)
        low = dyadic / 2**WORD_LEVELS
        rest = (ber - low) / (1 - low)
    sparse = draw_flip_positions(rng, n, rest, sampler=SAMPLER_GAPS)
    levels = [(dyadic >> level) & 1 for level in range((dyadic & -dyadic).bit_length() - 1, WORD_LEVELS)]
    n_words = -(-n // 64)
    bounds = np.searchsorted(sparse, np.arange(0, n_words + WORD_BLOCK, WORD_BLOCK, dtype=np.int64) * 64)
    for block, start in enumerate(range(0, n_words, WORD_BLOCK)):
        size = min(WORD_BLOCK, n_words - start)
        if dyadic == 2**WORD_LEVELS:
            words = np.full(size, np.uint64(2**64 - 1))
        else:
            words = rng.bit_generator.random_raw(size)
            for level in levels[1:]:
                (np.bitwise_or if level else np.bitwise_and)(words, rng.bit_generator.random_raw(size), out=words)
        extra = sparse[bounds[block] : bounds[block + 1]] - 64 * start
        if extra.size:
            bits = np.left_shift(np.uint64(1), (extra & 63).astype(np.uint64))
            firsts = np.flatnonzero(np.diff(extra >> 6, prepend=-1))
            words[extra[firsts] >> 6] |= np.bitwise_or.reduceat(bits, firsts)
        if start + size == n_words and n % 64:
            words[-1] &= np.uint64(2 ** (n % 64) - 1)
        yield start, words


def _mask_positions(words: np.ndarray) -> np.ndarray:
    """The set bits of a little-endian uint64 mask, ascending int64."""
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).astype(np.int64, copy=False)


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


def distinct_positions(rng: np.random.Generator, n: int, count: int, raw: bool = False) -> np.ndarray:
    """`count` distinct int64 positions of [0, n), sorted, every such set equally likely.

    Uniform draws, duplicates dropped and redrawn until `count` remain (the set is the distinct
    values of a prefix of an i.i.d. uniform sequence, whose law no permutation of [0, n) changes:
    uniform); above n/2 the complement is drawn instead. The draws are `rng.integers`, or with `raw`
    (SAMPLER_WORDS) the generator's raw 64-bit words masked to the bits of n - 1, those >= n dropped, the
    first still needed kept.
    Time O(count log count), memory O(count).
    """
    if not 0 <= count <= n:
        raise OppassError(f"cannot draw {count} distinct positions out of {n}")
    if count > n // 2:
        left_out = distinct_positions(rng, n, n - count, raw)
        keep = np.ones(n, dtype=bool)  # count > n/2: this is O(count)
        keep[left_out] = False
        return np.flatnonzero(keep).astype(np.int64, copy=False)
    drawn = np.empty(0, dtype=np.int64)
    while drawn.size < count:
        need = count - drawn.size
        if raw:  # enough words for `need` below n with 5 standard deviations to spare; the first `need` kept
            span = 2 ** (n - 1).bit_length()
            words = int(need * span / n + 5 * math.sqrt(need * span / n) + 8)
            values = (rng.bit_generator.random_raw(words) & np.uint64(span - 1)).view(np.int64)
            values = values[values < n][:need]
        else:
            values = rng.integers(0, n, size=need, dtype=np.int64)
        drawn = _merged(drawn, distinct_sorted(values))
    return drawn


def _merged(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The distinct values of two ascending distinct int64 arrays, ascending (in time linear in their sizes)."""
    if not ordered.size:
        return values
    places = np.searchsorted(ordered, values)
    new = ordered[np.minimum(places, ordered.size - 1)] != values
    return np.insert(ordered, places[new], values[new])


def distinct_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (a sort and a mask: numpy 2's hash-based `np.unique` is 100x slower here)."""
    if values.size < 2:
        return values.copy()
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
