"""Opportunistic-parity codec for weight tensors (pure numpy; see docs/FORMAT.md).

Internally a tensor of `n` weights is handled as its *codes* (the raw bits of each
weight as a native unsigned integer of the format's width), zero-padded and reshaped
to a `[n_words, N]` word matrix, `N` weights per word. The packed tensor is that
matrix's little-endian byte stream viewed as `[n_words, L]` unsigned lanes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from oppass.errors import OppassError
from oppass.formats import FLIP_STRATEGIES, FORMATS, LANE_BITS, WEIGHT_WORD, WORD_BITS, WeightFormat

_INT8_LIMIT = 127


@dataclass(frozen=True)
class Encoded:
    """Result of `encode`: the packed words, the weights they hold, and what the encoder changed.

    `changed` holds the flat (C-order) indices of the weights whose code the encoder changed,
    ascending (parity: one per adjusted word), and `changed_values` their new values.
    `changed_words` counts the words holding them. `adjusted` (every weight as a fault-free
    decode returns it) is None when `encode` was asked not to copy it out.
    """

    packed: np.ndarray
    adjusted: np.ndarray | None
    changed_words: int
    changed: np.ndarray
    changed_values: np.ndarray


def format_of(dtype: npt.DTypeLike) -> str:
    """Name of the weight format whose dtype is `dtype`."""
    wanted = np.dtype(dtype).newbyteorder("=")
    for weight_format in FORMATS.values():
        if weight_format.dtype == wanted:
            return weight_format.name
    raise OppassError(f"no weight format for dtype {np.dtype(dtype)}: expected one of {_format_list()}")


def word_bits(fmt: str, word: str | int) -> int:
    """Word width W in bits for `word` ("weight", an int or a numeric string) in format `fmt`."""
    bits = _format(fmt).bits
    if word == WEIGHT_WORD:
        return bits
    width = _parse_word(word)
    if width != bits and (width not in WORD_BITS or width < bits):
        sizes = ", ".join(str(size) for size in WORD_BITS if size >= bits)
        raise OppassError(f"invalid word size {word!r} for {fmt}: expected {WEIGHT_WORD!r} or one of {sizes}")
    return width


def storage_dtype(word_bits: int) -> np.dtype:
    """Element dtype of a packed tensor with W-bit words: '<u1', '<u2', '<u4', or '<u8' for W >= 64."""
    widths = sorted({weight_format.bits for weight_format in FORMATS.values()} | set(WORD_BITS))
    if word_bits not in widths:
        raise OppassError(f"invalid word width {word_bits} bits: expected one of {', '.join(map(str, widths))}")
    return np.dtype(f"<u{min(word_bits, LANE_BITS) // 8}")


def packed_shape(n_weights: int, fmt: str, word_bits: int) -> tuple[int, int]:
    """Shape [n_words, L] of the packed tensor holding `n_weights` weights of `fmt` in W-bit words."""
    per_word = _weights_per_word(fmt, word_bits)
    return -(-n_weights // per_word), max(1, word_bits // LANE_BITS)


def to_format(
    weights_fp32: np.ndarray, fmt: str, *, name: str = "tensor", axis: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Converts fp32 weights to `fmt`; returns the converted weights and, for int8, the per-channel scales.

    Weights already in `fmt` pass through unchanged (with no scales).
    """
    target = _format(fmt)
    weights = np.asarray(weights_fp32)
    if weights.dtype == target.dtype:
        return weights, None
    if weights.dtype != np.float32 or not target.converted_from_fp32:
        raise OppassError(f"cannot convert {name} from {weights.dtype} to {fmt}")
    if fmt == "int8":
        return _quantize_int8(weights, name, axis)
    return _round_float(weights, target, name), None


def pack(weights: np.ndarray, word_bits: int) -> np.ndarray:
    """Packs weights (in a format dtype) into W-bit words with no parity adjustment."""
    fmt = format_of(weights.dtype)
    matrix = _word_matrix(_codes(weights, fmt), _weights_per_word(fmt, word_bits))
    return _packed_from_matrix(matrix, word_bits)


def encode(
    weights: np.ndarray, word_bits: int, flip: str = "word-lsb", *, adjusted: bool = True, name: str = "tensor"
) -> Encoded:
    """Packs weights and makes every word's parity even by flipping one bit of one weight in each odd word.

    The bit and the weight follow docs/FORMAT.md ("Opportunistic parity"): a float zero's sign
    bit when the word holds a zero, else the LSB of the weight `flip` chooses (never an
    infinity; bit 1 of a NaN whose LSB flip would make it infinite), so every weight keeps its
    class. A word of only infinite weights with odd parity is an error naming `name`.
    With `adjusted=False` the adjusted weights are not copied out (`changed_values` has the
    new values of the changed ones), which saves a copy of the tensor.
    """
    if flip not in FLIP_STRATEGIES:
        raise OppassError(f"unknown flip strategy {flip!r}: expected one of {', '.join(FLIP_STRATEGIES)}")
    fmt = format_of(weights.dtype)
    codes = _codes(weights, fmt)
    matrix = _word_matrix(codes, _weights_per_word(fmt, word_bits))
    odd_rows = np.flatnonzero(odd_words(_packed_from_matrix(matrix, word_bits)))
    columns, bits = _parity_flips(matrix, odd_rows, fmt, flip, codes.size, name)
    matrix[odd_rows, columns] ^= bits
    weight_dtype = FORMATS[fmt].dtype
    adjusted_weights = matrix.reshape(-1)[: codes.size].copy().view(weight_dtype).reshape(weights.shape) \
        if adjusted else None
    return Encoded(_packed_from_matrix(matrix, word_bits), adjusted_weights, int(odd_rows.size),
                   odd_rows * matrix.shape[1] + columns, matrix[odd_rows, columns].view(weight_dtype))


def subnormal_count(weights: np.ndarray, as_dtype: npt.DTypeLike | None = None) -> int:
    """Number of subnormal weights (nonzero, of magnitude below the smallest normal) in weights of a format.

    They are judged as values of `as_dtype` (default: their own dtype), to which they widen
    exactly: an fp16 subnormal is a normal float32. Integer formats have none.
    """
    fmt = format_of(weights.dtype)
    if not FORMATS[fmt].is_float:
        return 0
    judged = FORMATS[fmt if as_dtype is None else format_of(as_dtype)]
    threshold = np.asarray(judged.smallest_normal).astype(weights.dtype)  # exact, or 0 when no weight is below it
    magnitude = np.abs(weights)
    return int(np.count_nonzero((magnitude < threshold) & (magnitude > 0)))


def nonfinite_count(weights: np.ndarray) -> int:
    """Number of NaN and infinite weights (none in integer formats)."""
    fmt = format_of(weights.dtype)
    return int(np.count_nonzero(~np.isfinite(weights))) if FORMATS[fmt].is_float else 0


def odd_words(packed: np.ndarray) -> np.ndarray:
    """Per word of a packed [n_words, L] tensor: True where its parity (XOR of all its bits) is odd."""
    lanes = np.asarray(packed)
    if lanes.ndim != 2 or lanes.dtype.kind != "u":
        shape = list(lanes.shape)
        raise OppassError(f"packed tensor must be an unsigned [n_words, L] array, got {lanes.dtype} {shape}")
    folded = lanes[:, 0] if lanes.shape[1] == 1 else np.bitwise_xor.reduce(lanes, axis=1)
    return (np.bitwise_count(folded) & 1).view(bool)


def unpack(packed: np.ndarray, fmt: str, word_bits: int, shape: Sequence[int]) -> np.ndarray:
    """Weights stored in a packed tensor, with no parity check."""
    codes = _matrix_from_packed(packed, fmt, word_bits, shape).reshape(-1)
    return _weights_from_codes(codes, fmt, shape)


def decode(packed: np.ndarray, fmt: str, word_bits: int, shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """Weights stored in a packed tensor with every odd-parity word zeroed, and the number of such words."""
    matrix = _matrix_from_packed(packed, fmt, word_bits, shape)
    masked = odd_words(packed)
    matrix[masked] = 0
    return _weights_from_codes(matrix.reshape(-1), fmt, shape), int(np.count_nonzero(masked))


def _format(fmt: str) -> WeightFormat:
    if fmt not in FORMATS:
        raise OppassError(f"unknown weight format {fmt!r}: expected one of {_format_list()}")
    return FORMATS[fmt]


def _format_list() -> str:
    return ", ".join(FORMATS)


def _parse_word(word: str | int) -> int:
    """Integer value of a word-size argument given as an int or a numeric string."""
    if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
        return int(word)
    if isinstance(word, str) and word.strip().isdigit():
        return int(word)
    raise OppassError(f"invalid word size {word!r}: expected {WEIGHT_WORD!r} or a number of bits")


def _weights_per_word(fmt: str, width: int) -> int:
    """N = W / b, after validating W for the format."""
    return word_bits(fmt, width) // FORMATS[fmt].bits


def _codes(weights: np.ndarray, fmt: str) -> np.ndarray:
    """Flat native unsigned codes (raw bits) of weights in format `fmt`, in C order."""
    native = np.ascontiguousarray(weights, dtype=FORMATS[fmt].dtype)
    return native.reshape(-1).view(FORMATS[fmt].code_dtype)


def _word_matrix(codes: np.ndarray, per_word: int) -> np.ndarray:
    """A fresh [n_words, N] copy of the codes, the last word's tail padded with zeros."""
    n_words = -(-codes.size // per_word)
    matrix = np.empty(n_words * per_word, dtype=codes.dtype)
    matrix[: codes.size] = codes
    matrix[codes.size:] = 0
    return matrix.reshape(n_words, per_word)


def _parity_flips(
    matrix: np.ndarray, rows: np.ndarray, fmt: str, flip: str, n_weights: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per odd word row of a code matrix: the column of the weight to change and the bit (a mask) to flip there.

    Candidates are the real weights (not the padding beyond `n_weights`), for floats less the
    infinities; a float zero is every strategy's first choice (its sign bit is flipped).
    """
    n_words, per_word = matrix.shape
    words = matrix[rows]
    candidates = np.ones(words.shape, dtype=bool)
    if rows.size and rows[-1] == n_words - 1:
        candidates[-1, n_weights - (n_words - 1) * per_word:] = False
    bits = np.ones(rows.size, dtype=matrix.dtype)
    if not FORMATS[fmt].is_float:
        return _strategy_columns(words, candidates, fmt, flip), bits
    magnitude = words & _magnitude_mask(fmt)
    zeros = candidates & (magnitude == 0)
    candidates &= magnitude != _infinity(fmt)
    _refuse_infinite_words(candidates, rows, per_word, name)
    has_zero = zeros.any(axis=1)
    columns = np.where(has_zero, np.argmax(zeros, axis=1), _strategy_columns(words, candidates, fmt, flip))
    chosen = words[np.arange(rows.size), columns]
    mantissa = chosen & ((1 << FORMATS[fmt].mantissa_bits) - 1)
    bits[((chosen & _magnitude_mask(fmt)) > _infinity(fmt)) & (mantissa == 1)] = 0b10  # a NaN the LSB would make inf
    bits[has_zero] = 1 << (FORMATS[fmt].bits - 1)
    return columns, bits


def _refuse_infinite_words(candidates: np.ndarray, rows: np.ndarray, per_word: int, name: str) -> None:
    """An odd word whose real weights are all infinite cannot be made even without making a NaN: an error."""
    stuck = ~candidates.any(axis=1)
    if stuck.any():
        word = int(rows[np.argmax(stuck)])
        raise OppassError(
            f"tensor {name!r} has {int(stuck.sum())} word(s) of odd parity holding only infinite weights (the first "
            f"starts at weight {word * per_word}): parity cannot be made even without turning an infinity into a "
            "NaN; replace the infinities or choose another word size"
        )


def _strategy_columns(words: np.ndarray, candidates: np.ndarray, fmt: str, flip: str) -> np.ndarray:
    """Column of the candidate weight the strategy chooses in each word row (ties: the lowest column)."""
    if flip == "word-lsb":
        return np.argmax(candidates, axis=1)
    if flip == "largest":
        ranks = _magnitude_rank(words, fmt).astype(np.int64)
        ranks[~candidates] = -1
        return np.argmax(ranks, axis=1)
    error_ranks = _flip_error_rank(words, fmt)
    error_ranks[~candidates] = np.iinfo(error_ranks.dtype).max
    return np.argmin(error_ranks, axis=1)


def _magnitude_mask(fmt: str) -> int:
    """The bits of a float code other than its sign."""
    return (1 << (FORMATS[fmt].bits - 1)) - 1


def _infinity(fmt: str) -> int:
    """Magnitude bits of a float format's infinity: all-ones exponent, zero mantissa."""
    weight_format = FORMATS[fmt]
    return ((1 << weight_format.exponent_bits) - 1) << weight_format.mantissa_bits


def _magnitude_rank(codes: np.ndarray, fmt: str) -> np.ndarray:
    """Integers ordered like |value|, every NaN equal and above +-inf.

    For IEEE floats the magnitude bits (sign cleared) order like |value|; NaNs are
    clamped to one rank just above infinity.
    """
    if fmt == "int8":
        return np.abs(codes.view(np.int8).astype(np.int16))
    if fmt == "uint8":
        return codes
    return np.minimum(codes & _magnitude_mask(fmt), _infinity(fmt) + 1)


def _flip_error_rank(codes: np.ndarray, fmt: str) -> np.ndarray:
    """Integers ordered like the absolute change an LSB flip makes to each weight.

    An integer's LSB flip always changes its code by exactly 1, so all ranks tie. A
    float's LSB flip changes the mantissa by one unit in the last place and leaves the
    exponent field alone: the change is 2**(max(exponent_field, 1) - bias - mantissa_bits),
    monotonic in max(exponent_field, 1). A NaN (all-ones exponent: no finite change) gets
    the all-ones exponent as rank, above every finite one.
    """
    if not FORMATS[fmt].is_float:
        return np.zeros(codes.shape, dtype=np.int32)
    exponent_bits, mantissa_bits = FORMATS[fmt].exponent_bits, FORMATS[fmt].mantissa_bits
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    return np.maximum(exponent, 1).astype(np.int32)


def _packed_from_matrix(matrix: np.ndarray, width: int) -> np.ndarray:
    """The [n_words, L] little-endian packed tensor holding a word matrix's bit stream."""
    stream = matrix.astype(matrix.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)
    lanes = stream.view(storage_dtype(width))
    return lanes.reshape(matrix.shape[0], max(1, width // 64))


def _matrix_from_packed(packed: np.ndarray, fmt: str, width: int, shape: Sequence[int]) -> np.ndarray:
    """A fresh native [n_words, N] code matrix read from a validated packed tensor."""
    n_weights = element_count(shape)
    expected_shape = packed_shape(n_weights, fmt, width)
    expected_dtype = storage_dtype(width)
    packed = np.asarray(packed)
    if packed.dtype.kind != "u" or packed.dtype.itemsize != expected_dtype.itemsize:
        raise OppassError(f"packed tensor has dtype {packed.dtype}, expected {expected_dtype} for {width}-bit words")
    if packed.shape != expected_shape:
        raise OppassError(f"packed tensor has shape {list(packed.shape)}, expected {list(expected_shape)}")
    little_endian = np.ascontiguousarray(packed, dtype=expected_dtype)
    code_dtype = FORMATS[fmt].code_dtype
    codes = little_endian.reshape(-1).view(np.uint8).view(code_dtype.newbyteorder("<")).astype(code_dtype)
    return codes.reshape(expected_shape[0], _weights_per_word(fmt, width))


def element_count(shape: Sequence[int]) -> int:
    """Number of weights in a tensor of `shape`; negative dimensions are an error."""
    dims = [int(dim) for dim in shape]
    if any(dim < 0 for dim in dims):
        raise OppassError(f"invalid tensor shape {dims}: dimensions must be non-negative")
    return int(np.prod(dims, dtype=object))


def _weights_from_codes(codes: np.ndarray, fmt: str, shape: Sequence[int]) -> np.ndarray:
    """The first prod(shape) codes as weights of `fmt`, reshaped to `shape`."""
    n_weights = element_count(shape)
    return codes[:n_weights].view(FORMATS[fmt].dtype).reshape(tuple(shape))


def _round_float(weights: np.ndarray, target: WeightFormat, name: str) -> np.ndarray:
    """fp32 -> bf16/fp16 by round-to-nearest-even; a finite value that rounds to infinity is an error."""
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = weights.astype(target.dtype)
    overflow = np.isfinite(weights) & ~np.isfinite(rounded)
    if overflow.any():
        first = weights.reshape(-1)[np.argmax(overflow.reshape(-1))]
        raise OppassError(
            f"tensor {name!r} has {int(overflow.sum())} value(s) outside the finite {target.name} range "
            f"(e.g. {float(first):g})"
        )
    return rounded


def _quantize_int8(weights: np.ndarray, name: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 quantization along `axis`; returns the codes and float32 scales."""
    if weights.ndim == 0 or not -weights.ndim <= axis < weights.ndim:
        raise OppassError(f"cannot quantize {name}: axis {axis} is out of range for shape {list(weights.shape)}")
    if not np.isfinite(weights).all():
        raise OppassError(f"cannot quantize {name} to int8: it contains NaN or infinity")
    other_axes = tuple(other for other in range(weights.ndim) if other != axis % weights.ndim)
    channel_max = np.max(np.abs(weights), axis=other_axes, initial=0.0)
    scales = (channel_max / np.float32(_INT8_LIMIT)).astype(np.float32)
    scales[scales == 0] = 1.0  # all-zero channels, and tiny ones whose scale underflows: all their codes are 0
    broadcast_shape = [1] * weights.ndim
    broadcast_shape[axis] = scales.size
    quantized = np.rint(weights / scales.reshape(broadcast_shape))
    return np.clip(quantized, -_INT8_LIMIT, _INT8_LIMIT).astype(np.int8), scales
