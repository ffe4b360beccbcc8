"""In-place fault injection into the weight buffers an onnxruntime session reads.

`PackedWeights` copies a session's packed weight buffers back to back into one block (each
starting on an 8-byte boundary) and keeps a pristine copy; the session reads the block's
views. A target turns a trial's random stream into an `Injection` (the flips, prepared),
`inject` applies it to the block and `restore` puts the pristine values back, so
preparation can run ahead of the inferences and the in-trial work is a few numpy calls.
Flips go to their bytes (words for ECC), or through a dense bit mask of the whole block
when there is more than one per DENSE_BITS bits (the cheaper way there, measured): either
way no Python loop runs over weights or bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from oppass import faults
from oppass.campaign import ecc

# A dense mask costs ~0.05 ns per stored bit, sparse flips ~30 ns each (sorting included): dense above 1 in 512.
DENSE_BITS = 512
_BIT_MASKS = np.left_shift(1, np.arange(8)).astype(np.uint8)


class RestorationError(RuntimeError):
    """The weights differ from their pristine copy after trials were undone (a bug, never user error)."""


@dataclass(frozen=True)
class Injection:
    """A trial's flips, ready to apply: the faulty values `change` at `index` of the target's view, or
    (`index` None) an XOR mask of the whole view; `clean` holds the pristine values there."""

    flips: int
    masked: int  # words masked outside the model (ECC detections)
    index: np.ndarray | None
    change: np.ndarray
    clean: np.ndarray


class FaultTarget(Protocol):
    """Where a trial's flips land and how they are undone."""

    n_bits: int

    def plan(self, rng: np.random.Generator, ber: float, sampler: int) -> Injection:
        """Draws a trial's flips at `ber` from `rng` with `sampler` (oppass.faults) and prepares them."""
        ...

    def inject(self, injection: Injection) -> None:
        """Corrupts the pristine weights with `injection`."""
        ...

    def restore(self, injection: Injection) -> None:
        """Undoes `inject(injection)`."""
        ...


def _dense(flips: int, n_bits: int) -> bool:
    """Whether `flips` flips over `n_bits` bits are cheaper through a dense mask."""
    return flips * DENSE_BITS > n_bits


def _bit_mask(positions: np.ndarray, n_bits: int) -> np.ndarray:
    """Little-endian packed uint8 mask of `n_bits` bits (a multiple of 8) with `positions` set."""
    bits = np.zeros(n_bits, dtype=bool)
    bits[positions] = True
    return np.packbits(bits, bitorder="little")


class PackedWeights:
    """Packed weight arrays in one block; `buffers` are its views, to hand to the session."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.sizes = np.array([array.nbytes for array in arrays], dtype=np.int64)
        padded = -(-self.sizes // 8) * 8
        self.starts = np.cumsum(padded) - padded
        self.block = np.zeros(int(padded.sum()), dtype=np.uint8)
        self.buffers = [
            self.block[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
            for array, start in zip(arrays, self.starts, strict=True)
        ]
        for buffer, array in zip(self.buffers, arrays, strict=True):
            buffer[...] = array
        self.pristine = self.block.copy()
        self.words = self.block.view("<u8")

    def verify(self) -> None:
        """Raises RestorationError unless the block equals its pristine copy."""
        if not np.array_equal(self.block, self.pristine):
            raise RestorationError("the weight buffers differ from their pristine copy after the trials were undone")


class StoredBits:
    """Flips over the concatenated little-endian bit stream of the buffers (docs/FORMAT.md)."""

    def __init__(self, weights: PackedWeights) -> None:
        self.weights = weights
        stream_ends = np.cumsum(weights.sizes)
        self.stream_bit_ends = stream_ends * 8
        # Block bit minus stream bit, per buffer: non-zero after a buffer whose size is not a multiple of 8 bytes.
        self.bit_shifts = (weights.starts - (stream_ends - weights.sizes)) * 8
        self.n_bits = int(self.stream_bit_ends[-1]) if weights.sizes.size else 0

    def plan(self, rng: np.random.Generator, ber: float, sampler: int = faults.SAMPLER_DISTINCT) -> Injection:
        """Draws the flips of one trial at `ber` over every stored bit."""
        return self.prepare(faults.draw_flip_positions(rng, self.n_bits, ber, sort=False, sampler=sampler))

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping stream bits `positions` (distinct)."""
        bits = positions
        if self.bit_shifts.any():
            bits = positions + self.bit_shifts[np.searchsorted(self.stream_bit_ends, positions, side="right")]
        if _dense(positions.size, self.n_bits):
            mask = _bit_mask(bits, self.weights.block.size * 8)
            return Injection(positions.size, 0, None, mask, self.weights.pristine)
        bits = np.sort(bits)
        offsets = bits >> 3
        first = np.empty(bits.size, dtype=bool)  # the first flip of each touched byte
        first[:1] = True
        np.not_equal(offsets[1:], offsets[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        clean = self.weights.pristine[offsets[starts]]
        faulty = clean ^ np.bitwise_or.reduceat(_BIT_MASKS[bits & 7], starts) if starts.size else clean
        return Injection(positions.size, 0, offsets[starts], faulty, clean)

    def inject(self, injection: Injection) -> None:
        """Writes the faulty bytes into the live block."""
        if injection.index is None:
            np.bitwise_xor(self.weights.pristine, injection.change, out=self.weights.block)
        else:
            self.weights.block[injection.index] = injection.change

    def restore(self, injection: Injection) -> None:
        """Writes the clean bytes back."""
        if injection.index is None:
            np.copyto(self.weights.block, injection.clean)
        else:
            self.weights.block[injection.index] = injection.clean


class BitPosition:
    """Flips restricted to bit `bit` of every stored weight, in plain (one weight per word) storage."""

    def __init__(self, stored: StoredBits, weight_bits: int, bit: int) -> None:
        self.stored = stored
        self.weight_bits = weight_bits
        self.bit = bit
        self.n_bits = stored.n_bits // weight_bits

    def plan(self, rng: np.random.Generator, ber: float, sampler: int = faults.SAMPLER_DISTINCT) -> Injection:
        """Draws the flips of one trial at `ber` over bit `bit` of every weight."""
        weights = faults.draw_flip_positions(rng, self.n_bits, ber, sort=False, sampler=sampler)
        return self.stored.prepare(weights * self.weight_bits + self.bit)

    def inject(self, injection: Injection) -> None:
        """Writes the faulty bytes into the live block."""
        self.stored.inject(injection)

    def restore(self, injection: Injection) -> None:
        """Writes the clean bytes back."""
        self.stored.restore(injection)


class EccProtected:
    """Plain stored weights under SEC-DED (72,64): each 64-bit data word of the block plus 8 check bits.

    The block's words are the data words of each buffer (the last one zero-padded). Flips
    are drawn over all 72 bits of every codeword; each touched codeword is decoded and the
    result written to the block: corrected, or zeroed when a double error is detected, or
    miscorrected.
    """

    def __init__(self, weights: PackedWeights) -> None:
        self.words = weights.words
        self.data = weights.pristine.view("<u8")
        self.check = ecc.encode(self.data)
        self.n_bits = int(self.data.size) * ecc.CODEWORD_BITS

    def plan(self, rng: np.random.Generator, ber: float, sampler: int = faults.SAMPLER_DISTINCT) -> Injection:
        """Draws the flips of one trial at `ber` over every codeword bit, data and check bits alike."""
        return self.prepare(faults.draw_flip_positions(rng, self.n_bits, ber, sort=False, sampler=sampler))

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping codeword bits `positions` (distinct): the touched words as decoded."""
        words, data_errors, check_errors = self._errors(positions)
        decoded, status = ecc.decode(self.data[words] ^ data_errors, self.check[words] ^ check_errors)
        detected = status == ecc.DETECTED
        stored = np.where(detected, np.uint64(0), decoded)
        return Injection(positions.size, int(np.count_nonzero(detected)), words, stored, self.data[words])

    def inject(self, injection: Injection) -> None:
        """Writes the decoded touched words into the live block."""
        self.words[injection.index] = injection.change

    def restore(self, injection: Injection) -> None:
        """Writes the clean words back."""
        self.words[injection.index] = injection.clean

    def _errors(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Touched codewords and their data (uint64) and check (uint8) error patterns."""
        if _dense(positions.size, self.n_bits):
            codewords = _bit_mask(positions, self.n_bits).reshape(-1, ecc.CODEWORD_BITS // 8)
            data_errors = codewords[:, : ecc.DATA_BITS // 8].copy().view("<u8").reshape(-1)
            check_errors = codewords[:, ecc.DATA_BITS // 8]
            words = np.flatnonzero((data_errors != 0) | (check_errors != 0))
            return words, data_errors[words], check_errors[words]
        words, slot = np.unique(positions // ecc.CODEWORD_BITS, return_inverse=True)
        bit = positions % ecc.CODEWORD_BITS
        in_data = bit < ecc.DATA_BITS
        data_errors = np.zeros(words.size, dtype=np.uint64)
        check_errors = np.zeros(words.size, dtype=np.uint8)
        np.bitwise_xor.at(data_errors, slot[in_data], np.left_shift(np.uint64(1), bit[in_data].astype(np.uint64)))
        check_bits = np.left_shift(1, bit[~in_data] - ecc.DATA_BITS).astype(np.uint8)
        np.bitwise_xor.at(check_errors, slot[~in_data], check_bits)
        return words, data_errors, check_errors
