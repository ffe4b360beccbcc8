"""Codec for weight tensors: opportunistic parity, SEC-DED and the range check (pure numpy; see docs/FORMAT.md).

Internally a tensor of `n` weights is handled as its *codes* (the raw bits of each
weight as a native unsigned integer of the format's width), zero-padded and reshaped
to a `[n_words, N]` word matrix, `N` weights per word. The packed tensor is that
matrix's little-endian byte stream viewed as `[n_words, L]` unsigned lanes. SEC-DED
works on whole words through per-bit masks over those lanes: its loops run over the
code's check bits, never over weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from oppass.errors import OppassError
from oppass.formats import (
    CODES,
    FLIP_STRATEGIES,
    FORMATS,
    LANE_BITS,
    PARITY,
    SECDED,
    WEIGHT_WORD,
    WORD_BITS,
    WeightFormat,
    secded_check_bits,
    secded_stolen_bits,
    word_widths,
)

_INT8_LIMIT = 127
# Weights per slice of the per-weight scales `quantize_int8` gathers.
_QUANTIZE_SLICE = 2**20


@dataclass(frozen=True)
class Encoded:
    """Result of `encode`: the packed words, the weights they hold, and what the encoder changed.

    `changed` holds the flat (C-order) indices of the weights whose code the encoder changed,
    ascending (parity: one per adjusted word; SEC-DED: the weights its rounding changed), and
    `changed_values` their new values.
    `changed_words` counts the words holding them. `adjusted` (every weight as a fault-free
    decode returns it) is None when `encode` was asked not to copy it out.
    """

    packed: np.ndarray
    adjusted: np.ndarray | None
    changed_words: int
    changed: np.ndarray
    changed_values: np.ndarray


@dataclass(frozen=True)
class Decoded:
    """Result of `decode`: the weights and what the checks did.

    `masked` marks (per word) the words the code zeroed (parity: odd; SEC-DED: even parity and
    a nonzero syndrome), `corrected` the words in which SEC-DED flipped a bit back (odd parity;
    never for parity), and `range_zeroed` counts the weights the range check zeroed (they are
    not counted as masked).
    """

    weights: np.ndarray
    masked: np.ndarray
    corrected: np.ndarray
    range_zeroed: int = 0

    @property
    def masked_words(self) -> int:
        """Number of masked words."""
        return int(np.count_nonzero(self.masked))

    @property
    def corrected_words(self) -> int:
        """Number of corrected words."""
        return int(np.count_nonzero(self.corrected))


def format_of(dtype: npt.DTypeLike) -> str:
    """Name of the weight format whose dtype is `dtype`."""
    wanted = np.dtype(dtype).newbyteorder("=")
    for weight_format in FORMATS.values():
        if weight_format.dtype == wanted:
            return weight_format.name
    raise OppassError(f"no weight format for dtype {np.dtype(dtype)}: expected one of {_format_list()}")


def word_bits(fmt: str, word: str | int, code: str = PARITY) -> int:
    """Word width W in bits for `word` ("weight", an int or a numeric string) in format `fmt`, one that
    `code` supports there."""
    bits = _format(fmt).bits
    _check_code(code)
    width = bits if word == WEIGHT_WORD else _parse_word(word)
    if width not in word_widths(fmt):
        sizes = ", ".join(str(size) for size in word_widths(fmt) if size > bits)
        raise OppassError(f"invalid word size {word!r} for {fmt}: expected {WEIGHT_WORD!r} or one of {sizes}")
    if width not in word_widths(fmt, code):
        *others, last = map(str, word_widths(fmt, code))
        raise OppassError(
            f"{code} does not fit {fmt} in {width}-bit words: a weight would hold "
            f"{max(secded_stolen_bits(fmt, width))} check bits, over {fmt}'s budget of "
            f"{FORMATS[fmt].stolen_budget}; it fits {fmt} in {', '.join(others)} or {last}-bit words"
        )
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
    weights: np.ndarray,
    word_bits: int,
    flip: str | None = None,
    *,
    code: str = PARITY,
    adjusted: bool = True,
    name: str = "tensor",
) -> Encoded:
    """Packs weights into W-bit words protected by `code` (docs/FORMAT.md).

    Parity ("Opportunistic parity"): every odd word gets one bit of one weight flipped: a float
    zero's sign bit when the word holds a zero, else the LSB of the weight `flip` chooses
    (default word-lsb; never an infinity; bit 1 of a NaN whose LSB flip would make it
    infinite), so every weight keeps its class. A word of only infinite weights with odd
    parity is an error naming `name`. SEC-DED ("SEC-DED"): every weight is rounded so that its
    stolen bits are 0, then each word's check bits are set; `flip` does not apply to it.
    With `adjusted=False` the adjusted weights are not copied out (`changed_values` has the
    new values of the changed ones), which saves a copy of the tensor.
    """
    _check_code(code)
    if code == SECDED:
        if flip is not None:
            raise OppassError(f"a flip strategy applies to parity only, not to {SECDED} (its rounding is fixed)")
        return _encode_secded(weights, word_bits, adjusted=adjusted)
    flip = FLIP_STRATEGIES[0] if flip is None else flip
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


def unpack(packed: np.ndarray, fmt: str, word_bits: int, shape: Sequence[int], code: str = PARITY) -> np.ndarray:
    """Weights stored in a packed tensor, with no check (SEC-DED: the stolen bits cleared)."""
    matrix = _matrix_from_packed(packed, fmt, word_bits, shape, code)
    if code == SECDED:
        matrix &= _secded_layout(fmt, word_bits).keep
    return _weights_from_codes(matrix.reshape(-1), fmt, shape)


def unpack_chunks(packed: np.ndarray, fmt: str, word_bits: int, shape: Sequence[int], code: str = PARITY,
                  chunk_words: int = 2**18) -> Iterator[np.ndarray]:
    """`unpack(...).reshape(-1)` in consecutive pieces of at most `chunk_words` words' weights: a chunk's memory."""
    n_weights = element_count(shape)
    expected_shape = packed_shape(n_weights, fmt, word_bits)
    packed = np.asarray(packed)
    if packed.shape != expected_shape:
        raise OppassError(f"packed tensor has shape {list(packed.shape)}, expected {list(expected_shape)}")
    per_word = _weights_per_word(fmt, word_bits)
    for start in range(0, expected_shape[0], chunk_words):
        rows = packed[start:start + chunk_words]
        yield unpack(rows, fmt, word_bits, (min(n_weights - start * per_word, rows.shape[0] * per_word),), code)


def decode(
    packed: np.ndarray,
    fmt: str,
    word_bits: int,
    shape: Sequence[int],
    *,
    code: str = PARITY,
    range_max: float | None = None,
) -> Decoded:
    """Weights stored in a packed tensor, checked by `code`, then by the range check when `range_max` is given.

    Parity zeroes every odd word. SEC-DED flips back the bit a word's syndrome names when the
    word's parity is odd, zeroes a word of even parity and nonzero syndrome, and clears the
    stolen bits. The range check zeroes every weight w with not |w| <= range_max (as binary32).
    """
    matrix = _matrix_from_packed(packed, fmt, word_bits, shape, code)
    lanes = np.ascontiguousarray(packed, dtype=storage_dtype(word_bits))
    odd = odd_words(lanes)
    corrected = np.zeros(odd.shape, dtype=bool)
    if code == SECDED:
        layout = _secded_layout(fmt, word_bits)
        syndromes = _syndromes(lanes, layout.masks)
        rows = np.flatnonzero(odd)
        columns, bits = np.divmod(layout.position_of_index[syndromes[rows]], FORMATS[fmt].bits)
        matrix[rows, columns] ^= np.left_shift(1, bits).astype(matrix.dtype)
        masked = ~odd & (syndromes != 0)
        matrix[masked] = 0
        matrix &= layout.keep
        corrected = odd
    else:
        masked = odd
        matrix[masked] = 0
    weights = _weights_from_codes(matrix.reshape(-1), fmt, shape)
    zeroed = 0 if range_max is None else _range_check(weights, range_max)
    return Decoded(weights, masked, corrected, zeroed)


def max_magnitude(weights: np.ndarray) -> float | None:
    """The largest |w| of weights in a format, as the range check compares it (binary32); None when a weight is
    NaN or infinite (such a tensor gets no range check), 0.0 for an empty tensor."""
    with np.errstate(invalid="ignore"):  # signalling NaNs
        magnitude = np.abs(weights.astype(np.float32, copy=False).reshape(-1))
    if not np.isfinite(magnitude).all():
        return None
    return float(magnitude.max(initial=0.0))


def _format(fmt: str) -> WeightFormat:
    if fmt not in FORMATS:
        raise OppassError(f"unknown weight format {fmt!r}: expected one of {_format_list()}")
    return FORMATS[fmt]


def _format_list() -> str:
    return ", ".join(FORMATS)


def _check_code(code: str) -> None:
    if code not in CODES:
        raise OppassError(f"unknown code {code!r}: expected one of {', '.join(CODES)}")


def _check_range_max(range_max: float) -> np.float32:
    """The bound as binary32, refused unless finite and >= 0."""
    bound = float(range_max)
    if not (math.isfinite(bound) and bound >= 0):
        raise OppassError(f"range_max must be a finite number >= 0, got {range_max!r}")
    return np.float32(bound)


def _range_check(weights: np.ndarray, range_max: float) -> int:
    """Zeroes (all bits 0), in place, every weight w with not |w| <= range_max; returns how many."""
    bound = _check_range_max(range_max)
    flat = weights.reshape(-1)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        outside = ~(np.abs(flat.astype(np.float32, copy=False)) <= bound)
    flat.view(f"u{flat.dtype.itemsize}")[outside] = 0
    return int(np.count_nonzero(outside))


@dataclass(frozen=True)
class _SecdedLayout:
    """Where a format's W-bit word holds its SEC-DED check bits, and the masks the syndrome is computed with.

    `stolen`: check bits per weight column; `checks`: the check positions ascending (p_0 first);
    `position_of_index`: word bit position of each Hamming index 0 .. W-1; `masks`: [r-1, L]
    lanes, row i the positions whose index has bit i set; `keep`: per column, the code mask
    with its stolen bits 0.
    """

    stolen: np.ndarray
    checks: tuple[int, ...]
    position_of_index: np.ndarray
    masks: np.ndarray
    keep: np.ndarray


@functools.cache
def _secded_layout(fmt: str, width: int) -> _SecdedLayout:
    """The layout of docs/FORMAT.md ("SEC-DED") for a supported (format, W)."""
    bits = FORMATS[fmt].bits
    code_dtype = FORMATS[fmt].code_dtype
    per_word = width // bits
    checks = tuple(sorted((j % per_word) * bits + j // per_word for j in range(secded_check_bits(width))))
    is_check = np.zeros(width, dtype=bool)
    is_check[list(checks)] = True
    data_indices = np.arange(3, width)
    data_indices = data_indices[(data_indices & (data_indices - 1)) != 0]
    index_of_position = np.zeros(width, dtype=np.int64)
    index_of_position[list(checks[1:])] = 1 << np.arange(len(checks) - 1)
    index_of_position[~is_check] = data_indices
    position_of_index = np.empty(width, dtype=np.int64)
    position_of_index[index_of_position] = np.arange(width)
    selected = (index_of_position[None, :] >> np.arange(len(checks) - 1)[:, None]) & 1
    masks = np.packbits(selected.astype(np.uint8), axis=1, bitorder="little")
    masks = masks.view(storage_dtype(width)).astype(storage_dtype(width).newbyteorder("="))
    stolen = np.array(secded_stolen_bits(fmt, width), dtype=code_dtype)
    keep = ~((np.ones(per_word, dtype=code_dtype) << stolen) - 1)
    return _SecdedLayout(stolen, checks, position_of_index, masks, keep)


def _syndromes(lanes: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per word of [n_words, L] lanes: the XOR of the Hamming indices of its set bits (one pass per index bit)."""
    syndromes = np.zeros(lanes.shape[0], dtype=np.int64)
    for index_bit, mask in enumerate(masks):
        selected = lanes & mask
        folded = selected[:, 0] if lanes.shape[1] == 1 else np.bitwise_xor.reduce(selected, axis=1)
        syndromes |= (np.bitwise_count(folded) & 1).astype(np.int64) << index_bit
    return syndromes


def _encode_secded(weights: np.ndarray, width: int, *, adjusted: bool) -> Encoded:
    """Rounds the weights so that their stolen bits are 0, packs them, and sets each word's check bits."""
    fmt = format_of(weights.dtype)
    word_bits(fmt, width, SECDED)
    layout = _secded_layout(fmt, width)
    codes = _codes(weights, fmt)
    source = _word_matrix(codes, width // FORMATS[fmt].bits)
    matrix = _rounded(source, fmt, layout.stolen)
    changed_matrix = matrix != source
    del source
    changed = np.flatnonzero(changed_matrix.reshape(-1)[: codes.size])
    changed_words = int(np.count_nonzero(changed_matrix.any(axis=1)))
    del changed_matrix
    weight_dtype = FORMATS[fmt].dtype
    changed_values = matrix.reshape(-1)[changed].view(weight_dtype)
    adjusted_weights = matrix.reshape(-1)[: codes.size].copy().view(weight_dtype).reshape(weights.shape) \
        if adjusted else None
    bits = FORMATS[fmt].bits
    syndromes = _syndromes(_packed_from_matrix(matrix, width), layout.masks)
    for index_bit, position in enumerate(layout.checks[1:]):
        column, bit = divmod(position, bits)
        matrix[:, column] |= ((syndromes >> index_bit) & 1).astype(matrix.dtype) << matrix.dtype.type(bit)
    column, bit = divmod(layout.checks[0], bits)
    matrix[:, column] |= odd_words(_packed_from_matrix(matrix, width)).astype(matrix.dtype) << matrix.dtype.type(bit)
    return Encoded(_packed_from_matrix(matrix, width), adjusted_weights, changed_words, changed, changed_values)


def _rounded(matrix: np.ndarray, fmt: str, stolen: np.ndarray) -> np.ndarray:
    """A code matrix with each column's `stolen` low bits 0, each weight rounded per docs/FORMAT.md.

    The columns are rounded in groups of equal stolen-bit counts (at most two nonzero ones), with a
    scalar count each: numpy broadcasts a scalar much faster than a per-column row.
    """
    rounded = matrix.copy()
    for count in np.unique(stolen[stolen > 0]):
        columns = np.flatnonzero(stolen == count)
        block = matrix if columns.size == matrix.shape[1] else matrix[:, columns]
        round_block = _rounded_floats if FORMATS[fmt].is_float else _rounded_integers
        rounded[:, columns] = round_block(block, fmt, int(count))
    return rounded


def _rounded_floats(codes: np.ndarray, fmt: str, stolen: int) -> np.ndarray:
    """Float codes with their `stolen` (>= 1) low bits 0: the magnitude rounded to nearest, ties to even, never to
    infinity; a NaN truncated, its mantissa's top bit set if that left it 0; the sign kept."""
    code = codes.dtype.type
    sign = codes & code(1 << (FORMATS[fmt].bits - 1))
    magnitude = codes ^ sign
    down = magnitude & code(~((1 << stolen) - 1) & _magnitude_mask(fmt))
    rest = magnitude - down
    half = code(1 << (stolen - 1))
    round_up = (rest > half) | ((rest == half) & ((down & code(1 << stolen)) != 0))
    infinity = code(_infinity(fmt))
    round_up &= down < infinity - code(1 << stolen)  # the next value up is finite (and never past a NaN's)
    rounded = down + round_up.astype(codes.dtype) * code(1 << stolen)
    nan = magnitude > infinity
    if nan.any():
        mantissa_mask = code((1 << FORMATS[fmt].mantissa_bits) - 1)
        emptied = nan & ((down & mantissa_mask) == 0)
        rounded[emptied] |= code(1 << (FORMATS[fmt].mantissa_bits - 1))
    rounded |= sign
    return rounded


def _rounded_integers(codes: np.ndarray, fmt: str, stolen: int) -> np.ndarray:
    """Integer codes rounded to the nearest multiple of 2**stolen, ties toward zero, clamped to the range."""
    limits = np.iinfo(FORMATS[fmt].dtype)
    values = codes.view(FORMATS[fmt].dtype).astype(np.int16)
    step = 1 << stolen
    down = (values >> stolen) << stolen
    rest = values - down
    round_up = (2 * rest > step) | ((2 * rest == step) & (values < 0))
    rounded = np.minimum(down + round_up * np.int16(step), np.int16(limits.max >> stolen << stolen))
    return rounded.astype(FORMATS[fmt].dtype).view(codes.dtype)


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


def _matrix_from_packed(
    packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], code: str = PARITY
) -> np.ndarray:
    """A fresh native [n_words, N] code matrix read from a validated packed tensor (W checked for `code`)."""
    word_bits(fmt, width, code)
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
    flat = weights.reshape(-1)
    scales = int8_scales([flat], weights.shape, axis, name)
    return quantize_int8(flat, scales, weights.shape, axis).reshape(weights.shape), scales


def int8_scales(chunks: Iterable[np.ndarray], shape: Sequence[int], axis: int, name: str = "tensor") -> np.ndarray:
    """The float32 scales of symmetric int8 quantization along `axis`, max |w| / 127 per channel (1 where that is 0).

    `chunks` are the fp32 weights of a tensor of `shape`, flat in C order, in consecutive pieces
    (read one at a time: the memory is a chunk's); NaN or infinity is an error naming `name`.
    """
    channels, inner = channel_layout(shape, axis, name)
    channel_max = np.zeros(channels, np.float32)
    start = 0
    for chunk in chunks:
        if not np.isfinite(chunk).all():
            raise OppassError(f"cannot quantize {name} to int8: it contains NaN or infinity")
        _raise_channel_max(channel_max, np.abs(chunk), start, inner)
        start += chunk.size
    scales = (channel_max / np.float32(_INT8_LIMIT)).astype(np.float32)
    scales[scales == 0] = 1.0  # all-zero channels, and tiny ones whose scale underflows: all their codes are 0
    return scales


def quantize_int8(chunk: np.ndarray, scales: np.ndarray, shape: Sequence[int], axis: int, start: int = 0) -> np.ndarray:
    """The int8 codes of the flat fp32 weights `chunk`, at flat index `start` of a tensor of `shape`, with `scales`."""
    channels, inner = channel_layout(shape, axis)
    codes = np.empty(chunk.size, np.int8)
    for first in range(0, chunk.size, _QUANTIZE_SLICE):  # the per-weight scales, one slice at a time
        end = min(first + _QUANTIZE_SLICE, chunk.size)
        weight_scales = scales[np.arange(start + first, start + end) // inner % channels]
        quantized = np.rint(chunk[first:end] / weight_scales)
        codes[first:end] = np.clip(quantized, -_INT8_LIMIT, _INT8_LIMIT)
    return codes


def channel_layout(shape: Sequence[int], axis: int, name: str = "tensor") -> tuple[int, int]:
    """(channels, weights per run of one channel) of a C-order tensor of `shape` read along `axis`."""
    ndim = len(shape)
    if ndim == 0 or not -ndim <= axis < ndim:
        raise OppassError(f"cannot quantize {name}: axis {axis} is out of range for shape {list(shape)}")
    return int(shape[axis]), int(np.prod(shape[axis % ndim + 1:], dtype=np.int64))


def _raise_channel_max(channel_max: np.ndarray, magnitudes: np.ndarray, start: int, inner: int) -> None:
    """Raises `channel_max` to the largest of `magnitudes` (flat weights from flat index `start`) in each channel.

    The weights form runs of `inner` of one channel each, channels in turn: the whole runs are
    reduced as a matrix, the partial ones at both ends on their own.
    """
    if not magnitudes.size:
        return
    end = start + magnitudes.size
    first_run, last_run = -(-start // inner), end // inner
    if first_run > last_run:  # inside one run
        _raise_periodic(channel_max, magnitudes.max(initial=0.0, keepdims=True), start // inner)
        return
    head, tail = first_run * inner - start, end - last_run * inner
    if head:
        _raise_periodic(channel_max, magnitudes[:head].max(keepdims=True), first_run - 1)
    runs = magnitudes[head:magnitudes.size - tail]
    if runs.size:
        _raise_periodic(channel_max, runs.reshape(-1, inner).max(axis=1), first_run)
    if tail:
        _raise_periodic(channel_max, magnitudes[magnitudes.size - tail:].max(keepdims=True), last_run)


def _raise_periodic(channel_max: np.ndarray, run_max: np.ndarray, first_run: int) -> None:
    """Raises channel_max[(first_run + i) % channels] to run_max[i], whole periods reduced as a matrix."""
    channels = channel_max.size
    offset = first_run % channels
    head = min(channels - offset, run_max.size)
    np.maximum(channel_max[offset:offset + head], run_max[:head], out=channel_max[offset:offset + head])
    rest = run_max[head:]
    periods = rest.size // channels
    if periods:
        np.maximum(channel_max, rest[:periods * channels].reshape(periods, channels).max(axis=0), out=channel_max)
    tail = rest[periods * channels:]
    np.maximum(channel_max[:tail.size], tail, out=channel_max[:tail.size])
