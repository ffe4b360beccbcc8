"""In-place fault injection into the weight buffers an onnxruntime session reads.

A target owns the live buffers (the session's user-supplied initializers) and a pristine
copy. `inject` corrupts the live buffers for one trial, `restore` undoes it and checks,
on the touched words only, that every buffer is back to its pristine content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from oppass import faults
from oppass.campaign import ecc


class RestorationError(RuntimeError):
    """A buffer differs from its pristine copy after a trial was undone (a bug, never user error)."""


class FaultTarget(Protocol):
    """Where a trial's flips land and how they are undone."""

    n_bits: int

    def draw(self, rng: np.random.Generator, ber: float) -> np.ndarray:
        """Sorted positions of the bits this trial flips, in [0, n_bits)."""
        ...

    def inject(self, positions: np.ndarray) -> int:
        """Applies the flips; returns the words masked outside the model (ECC detections)."""
        ...

    def restore(self, positions: np.ndarray) -> None:
        """Undoes `inject(positions)` and verifies the touched words."""
        ...


class StoredBits:
    """Flips over the concatenated little-endian bit stream of the buffers (docs/FORMAT.md)."""

    def __init__(self, buffers: Sequence[np.ndarray]) -> None:
        self.buffers = [buffer.reshape(-1) for buffer in buffers]
        self.pristine = [buffer.copy() for buffer in self.buffers]
        bits = np.array([buffer.nbytes * 8 for buffer in self.buffers], dtype=np.int64)
        self.bit_ends = np.cumsum(bits)
        self.n_bits = int(self.bit_ends[-1])

    def draw(self, rng: np.random.Generator, ber: float) -> np.ndarray:
        return faults.draw_flip_positions(rng, self.n_bits, ber)

    def inject(self, positions: np.ndarray) -> int:
        faults.flip_bits(self.buffers, positions)
        return 0

    def restore(self, positions: np.ndarray) -> None:
        faults.flip_bits(self.buffers, positions)
        self.verify(positions)

    def verify(self, positions: np.ndarray) -> None:
        """Raises RestorationError unless the elements holding `positions` equal the pristine copy."""
        owners = np.searchsorted(self.bit_ends, positions, side="right")
        for index in np.unique(owners):
            start = self.bit_ends[index] - self.buffers[index].nbytes * 8
            elements = (positions[owners == index] - start) // (self.buffers[index].itemsize * 8)
            if not np.array_equal(self.buffers[index][elements], self.pristine[index][elements]):
                raise RestorationError(f"weight buffer {index} was not restored after a trial")


class BitPosition:
    """Flips restricted to bit `bit` of every stored weight, in plain (one weight per word) storage."""

    def __init__(self, stored: StoredBits, weight_bits: int, bit: int) -> None:
        self.stored = stored
        self.weight_bits = weight_bits
        self.bit = bit
        self.n_bits = stored.n_bits // weight_bits

    def draw(self, rng: np.random.Generator, ber: float) -> np.ndarray:
        return faults.draw_flip_positions(rng, self.n_bits, ber) * self.weight_bits + self.bit

    def inject(self, positions: np.ndarray) -> int:
        return self.stored.inject(positions)

    def restore(self, positions: np.ndarray) -> None:
        self.stored.restore(positions)


class EccProtected:
    """Plain stored weights under SEC-DED (72,64): 64-bit data words of each buffer plus 8 check bits.

    Flips are drawn over all 72 bits of every codeword (the last word of a buffer is
    zero-padded); each touched codeword is decoded and the result written to the live
    buffer: corrected, or zeroed when a double error is detected, or miscorrected.
    """

    def __init__(self, buffers: Sequence[np.ndarray]) -> None:
        self.live_bytes = [buffer.reshape(-1).view(np.uint8) for buffer in buffers]
        words = [_padded_words(view) for view in self.live_bytes]
        self.data = np.concatenate(words)
        self.check = ecc.encode(self.data)
        self.owner = np.repeat(np.arange(len(words)), [w.size for w in words])
        self.first_word = np.cumsum([0] + [w.size for w in words])[:-1]
        self.buffer_bytes = np.array([view.size for view in self.live_bytes])
        self.n_bits = int(self.data.size) * ecc.CODEWORD_BITS

    def draw(self, rng: np.random.Generator, ber: float) -> np.ndarray:
        return faults.draw_flip_positions(rng, self.n_bits, ber)

    def inject(self, positions: np.ndarray) -> int:
        words, received_data, received_check = self._received(positions)
        decoded, status = ecc.decode(received_data, received_check)
        detected = status == ecc.DETECTED
        self._write(words, np.where(detected, np.uint64(0), decoded))
        return int(detected.sum())

    def restore(self, positions: np.ndarray) -> None:
        words = np.unique(positions // ecc.CODEWORD_BITS)
        self._write(words, self.data[words])
        owners, offsets, rows, columns = self._stored_bytes(words)
        pristine = _word_bytes(self.data[words])[rows, columns]
        actual = np.empty_like(pristine)
        for index in np.unique(owners):
            mine = owners == index
            actual[mine] = self.live_bytes[index][offsets[mine]]
        if not np.array_equal(actual, pristine):
            raise RestorationError("an ECC-protected weight word was not restored after a trial")

    def _received(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Touched codewords and their received data and check bits."""
        words, slot = np.unique(positions // ecc.CODEWORD_BITS, return_inverse=True)
        bit = positions % ecc.CODEWORD_BITS
        in_data = bit < ecc.DATA_BITS
        data_errors = np.zeros(words.size, dtype=np.uint64)
        check_errors = np.zeros(words.size, dtype=np.uint8)
        np.bitwise_xor.at(data_errors, slot[in_data], np.left_shift(np.uint64(1), bit[in_data].astype(np.uint64)))
        np.bitwise_xor.at(check_errors, slot[~in_data], np.left_shift(1, bit[~in_data] - ecc.DATA_BITS).astype(np.uint8))
        return words, self.data[words] ^ data_errors, self.check[words] ^ check_errors

    def _stored_bytes(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(buffer, byte offset in it, row in `words`, byte in word) of every stored byte of `words`."""
        owners = np.repeat(self.owner[words], 8)
        rows = np.repeat(np.arange(words.size), 8)
        columns = np.tile(np.arange(8), words.size)
        offsets = np.repeat(words - self.first_word[self.owner[words]], 8) * 8 + columns
        inside = offsets < self.buffer_bytes[owners]
        return owners[inside], offsets[inside], rows[inside], columns[inside]

    def _write(self, words: np.ndarray, values: np.ndarray) -> None:
        owners, offsets, rows, columns = self._stored_bytes(words)
        value_bytes = _word_bytes(values)[rows, columns]
        for index in np.unique(owners):
            mine = owners == index
            self.live_bytes[index][offsets[mine]] = value_bytes[mine]


def _word_bytes(words: np.ndarray) -> np.ndarray:
    """[n, 8] little-endian bytes of 64-bit words."""
    return words.astype("<u8").view(np.uint8).reshape(-1, 8)


def _padded_words(view: np.ndarray) -> np.ndarray:
    """The bytes of `view` as little-endian 64-bit words, the last one zero-padded."""
    padded = np.zeros(-(-view.size // 8) * 8, dtype=np.uint8)
    padded[: view.size] = view
    return padded.view("<u8").astype(np.uint64)
