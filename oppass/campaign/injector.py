"""In-place fault injection into the weight buffers an onnxruntime session reads.

`PackedWeights` copies a session's packed weight buffers back to back into one block (each
starting on an 8-byte boundary) and keeps its CRC-32; the session reads the block's views. A
target is a fault space (oppass.campaign.faultmodels) over the bits a protection stores; it
turns the positions a fault model draws into an `Injection` (the flips, prepared), `inject`
applies it to the block and `restore` undoes it, so preparation can run ahead of the
inferences and the in-trial work is a few numpy calls. The block holds its fault-free values
whenever no injection is live: targets read them from it (no second copy of the weights), so
`bits`, `ones` and `prepare` are called only between a `restore` and the next `inject`.
`NumpyDecoded` writes the numpy decode of a code's stored words (SEC-DED, parity, then the
range check) into plain weights; it encodes the words it needs again from the block.
Flips go to their bytes (words for ECC), or through a dense bit mask of the whole block
when there is more than one per DENSE_BITS bits (the cheaper way there, measured): either
way no Python loop runs over weights or bits.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from oppass import codec, faults
from oppass.campaign import ecc
from oppass.campaign.faultmodels import count_ones
from oppass.formats import FORMATS, LANE_BITS, SECDED

# A dense mask costs ~0.05 ns per stored bit, sparse flips ~30 ns each (sorting included): dense above 1 in 512.
DENSE_BITS = 512
# A dense mask is built byte by byte below 1 flip in 16 bits, as a packed boolean mask above (measured on
# 1.2 M bits: 36 against 90 us at 12 k flips, 620 against 440 us at 122 k).
PACKED_BITS = 16
_BIT_MASKS = np.left_shift(1, np.arange(8)).astype(np.uint8)
_NOTHING = np.empty(0, dtype=np.uint8)
ROW_BITS = 64  # the memory word of plain and OP storage, for multi-bit upsets
# Flips a numpy decoder prepares at once (about 150 bytes of temporaries each, SEC-DED's encode and decode).
PREPARED_FLIPS = 2**16


class RestorationError(RuntimeError):
    """The weights differ from their fault-free values after trials were undone (a bug, never user error)."""


@dataclass(frozen=True)
class Injection:
    """A trial's flips, ready to apply: the faulty values `change` at `index` of the target's view, with
    `clean` the fault-free values there; or (`index` None) an XOR mask `change` of the whole view, applied
    again to undo it (`clean` empty)."""

    flips: int
    masked: int  # words masked outside the model (ECC detections)
    index: np.ndarray | None
    change: np.ndarray
    clean: np.ndarray
    corrected: int | None = None  # words SEC-DED corrected (None: the target has no SEC-DED)


class FaultTarget(Protocol):
    """Where a trial's flips land and how they are undone: a fault space (bits, ones) that prepares injections."""

    n_bits: int
    row_bits: int

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values (0 or 1, uint8) of the stored bits at `positions`."""
        ...

    def ones(self) -> int:
        """How many stored bits are 1 fault-free."""
        ...

    def segments(self, tensors: Sequence[int]) -> np.ndarray:
        """[start, stop) bit ranges of this space holding tensors `tensors` (indices of the session's buffers)."""
        ...

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping the distinct stored bits `positions`."""
        ...

    def inject(self, injection: Injection) -> None:
        """Corrupts the fault-free weights with `injection`."""
        ...

    def restore(self, injection: Injection) -> None:
        """Undoes `inject(injection)`."""
        ...


def _dense(flips: int, n_bits: int) -> bool:
    """Whether `flips` flips over `n_bits` bits are cheaper through a dense mask."""
    return flips * DENSE_BITS > n_bits


def _bit_mask(positions: np.ndarray, n_bits: int) -> np.ndarray:
    """Little-endian packed uint8 mask of `n_bits` bits (a multiple of 8) with the distinct `positions` set:
    each flip's bit added to its byte (distinct bits: adding is or-ing), or, above one flip per PACKED_BITS bits,
    a boolean mask packed (the cheaper way there, measured)."""
    if positions.size * PACKED_BITS <= n_bits:
        mask = np.zeros(n_bits // 8, dtype=np.uint8)
        np.add.at(mask, positions >> 3, _BIT_MASKS[positions & 7])
        return mask
    bits = np.zeros(n_bits, dtype=bool)
    bits[positions] = True
    return np.packbits(bits, bitorder="little")


class PackedWeights:
    """Packed weight arrays in one block; `buffers` are its views, to hand to the session."""

    def __init__(self, layouts: Sequence[tuple[tuple[int, ...], np.dtype]],
                 fill: Callable[[int, np.ndarray], None]) -> None:
        """The buffers of `layouts` (shape, dtype), buffer i written by `fill(i, buffer)` in turn, so that a caller
        holds one source tensor at a time; the block's CRC-32 is taken after the last."""
        dtypes = [np.dtype(dtype) for _, dtype in layouts]
        self.sizes = np.array([math.prod(shape) * dtype.itemsize for (shape, _), dtype in zip(layouts, dtypes,
                                                                                            strict=True)],
                              dtype=np.int64)
        padded = -(-self.sizes // 8) * 8
        self.starts = np.cumsum(padded) - padded
        self.block = np.zeros(int(padded.sum()), dtype=np.uint8)
        self.buffers = [
            self.block[start : start + size].view(dtype).reshape(shape)
            for (shape, _), dtype, start, size in zip(layouts, dtypes, self.starts, self.sizes, strict=True)
        ]
        for index, buffer in enumerate(self.buffers):
            fill(index, buffer)
        self.words = self.block.view("<u8")
        self.checksum = zlib.crc32(self.block.data)

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray]) -> PackedWeights:
        """The block holding copies of `arrays`."""
        def copy(index: int, buffer: np.ndarray) -> None:
            buffer[...] = arrays[index]
        return cls([(array.shape, array.dtype) for array in arrays], copy)

    def verify(self) -> None:
        """Raises RestorationError unless the block's CRC-32 is the fault-free one: any difference within 32
        consecutive bits is seen, a wider one unless its CRC collides (2**-32 for a random one)."""
        if zlib.crc32(self.block.data) != self.checksum:
            raise RestorationError("the weight buffers differ from their fault-free values after the trials were "
                                   "undone")


class StoredBits:
    """Flips over the concatenated little-endian bit stream of the buffers (docs/FORMAT.md)."""

    def __init__(self, weights: PackedWeights) -> None:
        self.weights = weights
        stream_ends = np.cumsum(weights.sizes)
        self.stream_bit_ends = stream_ends * 8
        # Block bit minus stream bit, per buffer: non-zero after a buffer whose size is not a multiple of 8 bytes.
        self.bit_shifts = (weights.starts - (stream_ends - weights.sizes)) * 8
        self.n_bits = int(self.stream_bit_ends[-1]) if weights.sizes.size else 0
        self.row_bits = ROW_BITS
        # A mask of the stream is one of the block when no buffer is padded (the stream, then, is the block).
        self.takes_masks = not self.bit_shifts.any()

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values of stream bits `positions`."""
        block_bits = self._block_bits(positions)
        return (self.weights.block[block_bits >> 3] >> (block_bits & 7).astype(np.uint8)) & 1

    def ones(self) -> int:
        """Set bits of the fault-free stream (the block's padding is zero)."""
        return int(np.bitwise_count(self.weights.block).sum())

    def segments(self, tensors: Sequence[int]) -> np.ndarray:
        """The stream bits of each buffer in `tensors`."""
        ends = self.stream_bit_ends[list(tensors)]
        return np.stack([ends - self.weights.sizes[list(tensors)] * 8, ends], axis=1)

    def _block_bits(self, positions: np.ndarray) -> np.ndarray:
        if self.takes_masks:  # no buffer padded: stream bits are block bits
            return positions
        return positions + self.bit_shifts[np.searchsorted(self.stream_bit_ends, positions, side="right")]

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping stream bits `positions` (distinct)."""
        bits = self._block_bits(positions)
        if _dense(positions.size, self.n_bits):
            return self.prepare_mask(_bit_mask(bits, self.weights.block.size * 8), positions.size)
        if bits.size < 2:  # one flip: its byte (the general way below, in fewer calls)
            offsets = bits >> 3
            clean = self.weights.block[offsets]
            return Injection(positions.size, 0, offsets, clean ^ _BIT_MASKS[bits & 7], clean)
        bits = np.sort(bits)
        offsets = bits >> 3
        first = np.empty(bits.size, dtype=bool)  # the first flip of each touched byte
        first[:1] = True
        np.not_equal(offsets[1:], offsets[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        clean = self.weights.block[offsets[starts]]
        faulty = clean ^ np.bitwise_or.reduceat(_BIT_MASKS[bits & 7], starts)
        return Injection(positions.size, 0, offsets[starts], faulty, clean)

    def prepare_mask(self, mask: np.ndarray, flips: int) -> Injection:
        """The injection flipping the `flips` set bits of `mask` (a little-endian uint8 mask of the stream, zero past
        it, as long as the block), where `takes_masks`: the dense injection `prepare` makes of the same bits."""
        return Injection(flips, 0, None, mask, _NOTHING)

    def stream_mask(self, injection: Injection) -> np.ndarray | None:
        """The flips of a dense `injection` as a little-endian uint8 mask of the stream (zero past its end), where
        the stream's bits are the block's (no buffer padded); None otherwise."""
        return injection.change if injection.index is None and self.takes_masks else None

    def inject(self, injection: Injection) -> None:
        """Writes the faulty bytes into the live block."""
        if injection.index is None:
            np.bitwise_xor(self.weights.block, injection.change, out=self.weights.block)
        else:
            self.weights.block[injection.index] = injection.change

    def restore(self, injection: Injection) -> None:
        """Writes the clean bytes back (a mask: XORs it again)."""
        if injection.index is None:
            np.bitwise_xor(self.weights.block, injection.change, out=self.weights.block)
        else:
            self.weights.block[injection.index] = injection.clean


class BitPosition:
    """Flips restricted to bit `bit` of every stored weight, in plain (one weight per word) storage."""

    def __init__(self, stored: StoredBits, weight_bits: int, bit: int) -> None:
        self.stored = stored
        self.weight_bits = weight_bits
        self.bit = bit
        self.n_bits = stored.n_bits // weight_bits
        self.row_bits = ROW_BITS // weight_bits  # bit `bit` of the weights of one 64-bit row

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values of bit `bit` of weights `positions`."""
        return self.stored.bits(positions * self.weight_bits + self.bit)

    def ones(self) -> int:
        """Weights whose bit `bit` is 1 fault-free."""
        return count_ones(self)

    def segments(self, tensors: Sequence[int]) -> np.ndarray:
        """The weights of each buffer in `tensors`."""
        return self.stored.segments(tensors) // self.weight_bits

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping bit `bit` of weights `positions`."""
        return self.stored.prepare(positions * self.weight_bits + self.bit)

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
        self.check = ecc.encode(self.words)
        self.n_bits = int(self.words.size) * ecc.CODEWORD_BITS
        self.row_bits = ecc.CODEWORD_BITS
        self.word_starts = weights.starts // 8
        self.word_stops = -(-(weights.starts + weights.sizes) // 8)

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values of codeword bits `positions` (data bits 0..63, check bits 64..71 of each)."""
        words, bit = np.divmod(positions, ecc.CODEWORD_BITS)
        data = (self.words[words] >> np.minimum(bit, 63).astype(np.uint64)) & np.uint64(1)
        check = (self.check[words] >> np.maximum(bit - ecc.DATA_BITS, 0).astype(np.uint8)) & 1
        return np.where(bit < ecc.DATA_BITS, data.astype(np.uint8), check)

    def ones(self) -> int:
        """Set bits of every codeword, data and check bits."""
        return int(np.bitwise_count(self.words).sum() + np.bitwise_count(self.check).sum())

    def segments(self, tensors: Sequence[int]) -> np.ndarray:
        """The codeword bits of each buffer in `tensors` (its words start on 8-byte boundaries)."""
        chosen = list(tensors)
        return np.stack([self.word_starts[chosen], self.word_stops[chosen]], axis=1) * ecc.CODEWORD_BITS

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection flipping codeword bits `positions` (distinct): the touched words as decoded."""
        words, data_errors, check_errors = self._errors(positions)
        decoded, status = ecc.decode(self.words[words] ^ data_errors, self.check[words] ^ check_errors)
        detected = status == ecc.DETECTED
        stored = np.where(detected, np.uint64(0), decoded)
        return Injection(positions.size, int(np.count_nonzero(detected)), words, stored, self.words[words],
                         int(np.count_nonzero(status == ecc.CORRECTED)))

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
        words, slot = faults.group(positions // ecc.CODEWORD_BITS)
        bit = positions % ecc.CODEWORD_BITS
        in_data = bit < ecc.DATA_BITS
        data_errors = np.zeros(words.size, dtype=np.uint64)
        check_errors = np.zeros(words.size, dtype=np.uint8)
        np.bitwise_xor.at(data_errors, slot[in_data], np.left_shift(np.uint64(1), bit[in_data].astype(np.uint64)))
        check_bits = np.left_shift(1, bit[~in_data] - ecc.DATA_BITS).astype(np.uint8)
        np.bitwise_xor.at(check_errors, slot[~in_data], check_bits)
        return words, data_errors, check_errors


@dataclass(frozen=True)
class StoredWords:
    """What a code stores for each of a block's buffers, in figures: `counts` its words, `ones` their set bits.

    The words themselves are not kept: each is the encoding of its fault-free decode, which the
    block holds, and the codec's encode of that decode gives the same word again (for every
    format, word size and code: tests/test_campaign_faults.py), so they are encoded again when read.
    """

    counts: np.ndarray
    ones: np.ndarray

    @classmethod
    def of(cls, words: Sequence[np.ndarray]) -> StoredWords:
        """The figures of each buffer's [n_words, L] packed words."""
        return cls(np.array([w.shape[0] for w in words], dtype=np.int64),
                   np.array([int(np.bitwise_count(w).sum()) for w in words], dtype=np.int64))


class NumpyDecoded:
    """Plain stored weights holding a code's fault-free decode, the code's words encoded again from it when read:
    a fault flips bits of those words, and each touched word is decoded in numpy (`codec.decode`: parity zeroes
    an odd word, SEC-DED corrects one flip and zeroes a word of two) and then, with `range_max`, every decoded
    weight w with not |w| <= its tensor's range_max (binary32) is zeroed; the result goes to the touched weights.

    `words` gives each buffer's stored words in figures (all of one format and W), `code` is None for plain
    words (no code: only the range check), `range_max` each buffer's bound (inf: no check) or is None.
    """

    def __init__(self, weights: PackedWeights, fmt: str, word_bits: int, code: str | None, words: StoredWords,
                 range_max: Sequence[float] | None) -> None:
        self.fmt, self.word_bits, self.code = fmt, word_bits, code
        self.per_word = word_bits // FORMATS[fmt].bits
        self.lane_bits = min(word_bits, LANE_BITS)
        counts = words.counts
        self.word_ends = np.cumsum(counts)
        self.word_starts = self.word_ends - counts
        self.set_bits = int(words.ones.sum())
        code_dtype = FORMATS[fmt].code_dtype
        self.codes = weights.block.view(code_dtype)
        self.code_starts = weights.starts // code_dtype.itemsize
        self.weight_counts = weights.sizes // code_dtype.itemsize
        self.range_max = None if range_max is None else np.asarray(range_max, dtype=np.float32)
        self.n_bits = int(self.word_ends[-1]) * word_bits if counts.size else 0
        self.row_bits = max(ROW_BITS, word_bits)

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values of stored word bits `positions`."""
        word, bit = np.divmod(positions, self.word_bits)
        touched, slot = faults.group(word)
        _, index, real = self._places(touched)
        lane, shift = np.divmod(bit, self.lane_bits)
        lanes = self._stored(index, real)
        return ((lanes[slot, lane] >> shift.astype(lanes.dtype)) & 1).astype(np.uint8)

    def ones(self) -> int:
        """Set bits of every stored word."""
        return self.set_bits

    def segments(self, tensors: Sequence[int]) -> np.ndarray:
        """The stored word bits of each buffer in `tensors`."""
        chosen = list(tensors)
        return np.stack([self.word_starts[chosen], self.word_ends[chosen]], axis=1) * self.word_bits

    def prepare(self, positions: np.ndarray) -> Injection:
        """The injection writing the decode of the touched words (distinct bits `positions` flipped): prepared
        PREPARED_FLIPS flips at a time (whole words each), so that the codec's temporaries stay small, each piece
        written into the injection's arrays as it is made (one piece held at a time)."""
        if positions.size <= PREPARED_FLIPS:
            return self._prepare(positions)
        positions = np.sort(positions)
        word = positions // self.word_bits
        cuts = np.unique(np.searchsorted(word, word[::PREPARED_FLIPS], side="left"))
        room = (1 + int(np.count_nonzero(word[1:] != word[:-1]))) * self.per_word  # padding weights are dropped
        del word
        index = np.empty(room, dtype=np.int64)
        change, clean = np.empty(room, dtype=self.codes.dtype), np.empty(room, dtype=self.codes.dtype)
        filled = masked = corrected = 0
        for part in np.split(positions, cuts[1:]):
            piece = self._prepare(part)
            assert piece.index is not None  # words are always written by index
            end = filled + piece.index.size
            index[filled:end], change[filled:end], clean[filled:end] = piece.index, piece.change, piece.clean
            masked, corrected, filled = masked + piece.masked, corrected + (piece.corrected or 0), end
        return Injection(positions.size, masked, index[:filled], change[:filled], clean[:filled],
                         corrected if self.code == SECDED else None)

    def _prepare(self, positions: np.ndarray) -> Injection:
        word, bit = np.divmod(positions, self.word_bits)
        touched, slot = faults.group(word)
        tensor, index, real = self._places(touched)
        received = self._stored(index, real)
        lane, shift = np.divmod(bit, self.lane_bits)
        np.bitwise_xor.at(received, (slot, lane), np.left_shift(1, shift).astype(received.dtype))
        shape = (touched.size * self.per_word,)
        corrected = None
        if self.code is None:
            masked, weights = 0, codec.unpack(received, self.fmt, self.word_bits, shape)
        else:
            decoded = codec.decode(received, self.fmt, self.word_bits, shape, code=self.code)
            masked, weights = decoded.masked_words, decoded.weights
            if self.code == SECDED:
                corrected = decoded.corrected_words
        values = weights.reshape(touched.size, self.per_word)
        if self.range_max is not None:
            with np.errstate(invalid="ignore"):  # NaNs compare false: zeroed
                outside = ~(np.abs(values.astype(np.float32)) <= self.range_max[tensor][:, None])
            values.view(self.codes.dtype)[outside] = 0
        index = index[real]
        change = values.view(self.codes.dtype)[real]
        return Injection(positions.size, masked, index, change, self.codes[index], corrected)

    def inject(self, injection: Injection) -> None:
        """Writes the decoded weights into the live block."""
        self.codes[injection.index] = injection.change

    def restore(self, injection: Injection) -> None:
        """Writes the fault-free weights back."""
        self.codes[injection.index] = injection.clean

    def _places(self, touched: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the distinct words `touched`: their buffers, the block index of each of their weights
        [n, per_word], and which of those are weights (the last word of a buffer may end in padding)."""
        tensor = np.searchsorted(self.word_ends, touched, side="right")
        weight = (touched - self.word_starts[tensor])[:, None] * self.per_word + np.arange(self.per_word)
        return tensor, self.code_starts[tensor][:, None] + weight, weight < self.weight_counts[tensor][:, None]

    def _stored(self, index: np.ndarray, real: np.ndarray) -> np.ndarray:
        """The stored words [n, L] whose fault-free decodes are at block `index` where `real` (zero padding
        elsewhere): encoded again from them."""
        codes = np.zeros(index.shape, dtype=self.codes.dtype)
        codes[real] = self.codes[index[real]]
        weights = codes.reshape(-1).view(FORMATS[self.fmt].dtype)
        if self.code == SECDED:
            return codec.encode(weights, self.word_bits, code=SECDED, adjusted=False).packed
        return codec.pack(weights, self.word_bits)  # parity: the decode of an even word is that word


class Subspace:
    """The bits of chosen tensors of a target, back to back: positions drawn here go to the target's places."""

    def __init__(self, target: FaultTarget, tensors: Sequence[int]) -> None:
        self.target = target
        segments = target.segments(tensors)
        self.starts = segments[:, 0]
        lengths = segments[:, 1] - segments[:, 0]
        self.ends = np.cumsum(lengths)
        self.offsets = self.starts - (self.ends - lengths)
        self.n_bits = int(self.ends[-1]) if lengths.size else 0
        self.row_bits = target.row_bits
        self._ones: int | None = None

    def to_target(self, positions: np.ndarray) -> np.ndarray:
        """The target's positions of subspace positions `positions` (order kept)."""
        return positions + self.offsets[np.searchsorted(self.ends, positions, side="right")]

    def bits(self, positions: np.ndarray) -> np.ndarray:
        """The fault-free values of subspace bits `positions`."""
        return self.target.bits(self.to_target(positions))

    def ones(self) -> int:
        """Set bits of the chosen tensors (counted once)."""
        if self._ones is None:
            self._ones = count_ones(self)
        return self._ones
