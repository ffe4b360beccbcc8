"""Fault models: which stored bits a trial's faults change (docs/METHODS.md, "Fault models").

Every model turns a trial's random stream into the distinct positions of the stored bits whose
value its faults change, over a *space*: the stored bits of one protection (or of chosen
tensors of it), seen as a little-endian bit stream of `n_bits` bits cut into rows of
`row_bits` bits (the memory's words: 64 bits, or a 72-bit ECC codeword), whose fault-free
values `bits(positions)` returns. Drawing costs time and memory in the number of faults.

- `flip`: each bit flips independently with probability BER (or exactly K distinct bits flip).
- `stuck:V`: each cell is stuck at V with probability BER (or K distinct cells); a stuck cell
  reads V whatever was written, so only cells holding the other value change. The map is the
  trial's: every inference of the trial reads the same stuck cells.
- `mbu:K`: multi-bit upsets: each run of K adjacent bits inside one row is upset with
  probability BER/K (about BER of the bits flip), or exactly N distinct upsets happen; the bits of
  overlapping upsets flip once.
- `asym:R`: asymmetric flips: each 0 bit becomes 1 with probability BER, each 1 bit becomes 0 with
  probability R x BER.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from oppass import faults
from oppass.errors import OppassError

FLIP, STUCK, MBU, ASYMMETRIC = "flip", "stuck", "mbu", "asym"
KINDS = (FLIP, STUCK, MBU, ASYMMETRIC)
# Above this share of drawn positions holding the wrong value, asymmetric draws list the bits of the right value.
_REJECTION_LIMIT = 1 / 64
# Positions a scan over a whole fault space reads at once (8 bytes each, and their reads' temporaries).
SCAN_BITS = 2**22


class FaultSpace(Protocol):
    """Stored bits faults land in."""

    n_bits: int
    row_bits: int

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values (0 or 1, uint8) of the stored bits at `positions`."""
        ...

    def ones(self) -> int:
        """How many stored bits are 1 fault-free."""
        ...


@dataclass(frozen=True)
class FaultModel:
    """A parsed fault model: `kind` with its `parameter` (stuck value, upset width or 1->0 / 0->1 rate ratio)."""

    kind: str
    parameter: float = 0.0

    @property
    def name(self) -> str:
        """The model's name as given on the command line (`flip`, `stuck:1`, `mbu:2`, `asym:0.5`)."""
        if self.kind == FLIP:
            return FLIP
        value = int(self.parameter) if self.kind != ASYMMETRIC else f"{self.parameter:g}"
        return f"{self.kind}:{value}"

    def draws_mask(self, space: FaultSpace, ber: float, count: int | None, sampler: int) -> bool:
        """Whether the positions this model draws are `faults.draw_flip_mask`'s set bits, drawn alike."""
        return (self.kind == FLIP and count is None and sampler == faults.SAMPLER_WORDS
                and faults.uses_mask(space.n_bits, ber))

    def positions(self, rng: np.random.Generator, space: FaultSpace, ber: float, count: int | None,
                  sampler: int) -> np.ndarray:
        """Sorted distinct positions of the bits a trial's faults change: at rate `ber`, or `count` faults."""
        n = space.n_bits
        if self.kind == FLIP:
            return _events(rng, n, ber, count, sampler)
        if self.kind == STUCK:
            cells = _events(rng, n, ber, count, sampler)
            return cells[space.bits(cells) != int(self.parameter)]
        if self.kind == MBU:
            width, row = int(self.parameter), space.row_bits
            per_row = row - width + 1
            starts = (n // row) * per_row + max(0, n % row - width + 1)
            upsets = _events(rng, starts, ber / width, count, sampler)
            first = upsets // per_row * row + upsets % per_row
            return faults.distinct_sorted((first[:, None] + np.arange(width)).reshape(-1))
        ones = space.ones()
        rises = int(rng.binomial(n - ones, ber))
        falls = int(rng.binomial(ones, min(1.0, self.parameter * ber)))
        return np.sort(np.concatenate([_holding(rng, space, 0, n - ones, rises), _holding(rng, space, 1, ones, falls)]))


@functools.lru_cache(maxsize=256)
def parse(text: str) -> FaultModel:
    """The fault model named `text`; a bad name is refused in one line."""
    kind, _, value = text.strip().partition(":")
    try:
        if kind == FLIP and not value:
            return FaultModel(FLIP)
        if kind == STUCK and value in ("0", "1"):
            return FaultModel(STUCK, float(value))
        if kind == MBU and value.isdigit() and 2 <= int(value) <= 64:
            return FaultModel(MBU, float(int(value)))
        if kind == ASYMMETRIC and float(value) >= 0:
            return FaultModel(ASYMMETRIC, float(value))
    except ValueError:
        pass
    raise OppassError(f"unknown fault model {text!r}: use flip, stuck:0, stuck:1, mbu:K (K = 2..64 adjacent bits) "
                      "or asym:R (1->0 rate = R x the 0->1 rate)")


def validate(model: FaultModel, ber_max: float, counts: tuple[int, ...]) -> None:
    """Refuses, in one line, what the model cannot draw: a flip count for asymmetric flips, a count below 1, a
    1->0 rate above 1."""
    if counts and model.kind == ASYMMETRIC:
        raise OppassError("--flips does not apply to asymmetric flips (two rates): use --ber")
    if any(count < 1 for count in counts):
        raise OppassError(f"--flips counts must be at least 1, got {min(counts)}")
    if not counts and model.kind == ASYMMETRIC and model.parameter * ber_max > 1:
        raise OppassError(f"asym:{model.parameter:g} makes the 1->0 rate exceed 1 at BER {ber_max:g}: lower --ber")


def _events(rng: np.random.Generator, n: int, ber: float, count: int | None, sampler: int) -> np.ndarray:
    """Distinct positions of [0, n): Binomial(n, ber) of them, or `count` (at most n)."""
    if count is None:
        return faults.draw_flip_positions(rng, n, ber, sampler=sampler)
    return faults.distinct_positions(rng, n, min(count, n))


def _holding(rng: np.random.Generator, space: FaultSpace, value: int, available: int, count: int) -> np.ndarray:
    """`count` distinct positions, uniformly drawn among the `available` bits whose fault-free value is `value`:
    uniform draws kept when they hold `value`, in the order first drawn (so any set is equally likely)."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if available < space.n_bits * _REJECTION_LIMIT:  # the bits holding `value`, listed a scan at a time
        candidates = np.concatenate([scan[space.bits(scan) == value] for scan in _scans(space)])
        return np.sort(candidates[faults.distinct_positions(rng, candidates.size, count)])
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < count:
        need = count - chosen.size
        drawn = rng.integers(0, space.n_bits, size=int(need * space.n_bits / available * 1.1) + 16, dtype=np.int64)
        merged = np.concatenate([chosen, drawn[space.bits(drawn) == value]])
        chosen = merged[faults.first_occurrences(merged)]
    return np.sort(chosen[:count])


def count_ones(space: FaultSpace) -> int:
    """How many bits of `space` are 1 fault-free, counted a scan at a time."""
    return sum(int(space.bits(scan).sum()) for scan in _scans(space))


def _scans(space: FaultSpace) -> Iterator[np.ndarray]:
    """The positions of `space`, SCAN_BITS at a time, each made when the last is done with."""
    for start in range(0, space.n_bits, SCAN_BITS):
        yield np.arange(start, min(start + SCAN_BITS, space.n_bits), dtype=np.int64)
