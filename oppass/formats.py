"""The weight formats, word sizes, codes and flip strategies of docs/FORMAT.md: one table each (numpy + ml_dtypes only).

Every fact about a format that numpy or ml_dtypes know (width, float fields) is read from them,
not restated: `WeightFormat` holds only a name, a dtype and what the format may decode to.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# SEC-DED check bits an integer weight may hold (floats: half their mantissa bits).
INTEGER_STOLEN_BUDGET = 3


@dataclass(frozen=True)
class WeightFormat:
    """A weight encoding: its name, numpy dtype, and the dtypes a decode may return it as (its own first)."""

    name: str
    dtype: np.dtype
    output_dtypes: tuple[np.dtype, ...]
    converted_from_fp32: bool  # whether `oppass transform --format` may convert fp32 weights to it

    @property
    def bits(self) -> int:
        """Width `b` of one weight in bits."""
        return self.dtype.itemsize * 8

    @property
    def code_dtype(self) -> np.dtype:
        """Native unsigned integer dtype as wide as one weight: its raw bits, its *code*."""
        return np.dtype(f"u{self.dtype.itemsize}")

    @property
    def is_float(self) -> bool:
        """Whether the format is a binary floating-point one (has exponent and mantissa fields)."""
        return _float_info(self.dtype) is not None

    @property
    def exponent_bits(self) -> int:
        """Width of the exponent field (floats only)."""
        return int(self._float_info().nexp)

    @property
    def mantissa_bits(self) -> int:
        """Width of the stored mantissa field, without the implicit bit (floats only)."""
        return int(self._float_info().nmant)

    @property
    def stolen_budget(self) -> int:
        """The most SEC-DED check bits one weight may hold: floor(mantissa bits / 2) for floats, 3 for integers."""
        return self.mantissa_bits // 2 if self.is_float else INTEGER_STOLEN_BUDGET

    @property
    def smallest_normal(self) -> float:
        """The smallest positive normal value (floats only)."""
        return float(self._float_info().smallest_normal)

    def _float_info(self) -> ml_dtypes.finfo:
        info = _float_info(self.dtype)
        if info is None:
            raise TypeError(f"{self.name} is not a floating-point format")
        return info


def _float_info(dtype: np.dtype) -> ml_dtypes.finfo | None:
    """ml_dtypes' (and so numpy's) float fields of `dtype`; None for an integer dtype."""
    try:
        return ml_dtypes.finfo(dtype)
    except ValueError:
        return None


def _weight_format(name: str, dtype: type, *, widens_to_fp32: bool = False, converted: bool = True) -> WeightFormat:
    own = np.dtype(dtype)
    outputs = (own, np.dtype(np.float32)) if widens_to_fp32 else (own,)
    return WeightFormat(name, own, outputs, converted)


FORMATS: dict[str, WeightFormat] = {
    weight_format.name: weight_format
    for weight_format in (
        _weight_format("fp32", np.float32),
        _weight_format("bf16", ml_dtypes.bfloat16, widens_to_fp32=True),
        _weight_format("fp16", np.float16, widens_to_fp32=True),
        _weight_format("int8", np.int8),
        _weight_format("uint8", np.uint8, converted=False),  # ConvInteger/MatMulInteger weights, kept as they are
    )
}
FLOAT_FORMATS = tuple(name for name, weight_format in FORMATS.items() if weight_format.is_float)

# Word sizes: WEIGHT_WORD (W = b, one weight per word) or a width in bits, never narrower than b.
WEIGHT_WORD = "weight"
WORD_BITS = (16, 32, 64, 128, 256, 512)
WORD_SIZES: tuple[str | int, ...] = (WEIGHT_WORD, *WORD_BITS)
# Packed tensors hold their words in lanes of at most LANE_BITS bits.
LANE_BITS = 64

FLIP_STRATEGIES = ("word-lsb", "largest", "min-error")
# The op types whose weight inputs the pass protects unless told otherwise.
DEFAULT_OPS = ("Conv", "Gemm")

# Codes: opportunistic parity (detects odd flip counts) and SEC-DED (corrects one flip, detects two) per word.
PARITY = "parity"
SECDED = "secded"
CODES = (PARITY, SECDED)


def word_widths(fmt: str, code: str = PARITY) -> tuple[int, ...]:
    """Every word width W (bits) that `code` supports for format `fmt`, ascending: W = b or a WORD_BITS size
    above b; SEC-DED only where no weight holds more check bits than the format's stolen-bit budget."""
    weight_format = FORMATS[fmt]
    widths = (weight_format.bits, *(width for width in WORD_BITS if width > weight_format.bits))
    if code == SECDED:
        return tuple(width for width in widths if max(secded_stolen_bits(fmt, width)) <= weight_format.stolen_budget)
    return widths


def secded_check_bits(word_bits: int) -> int:
    """r, the number of SEC-DED check bits of a W-bit word: 2**(r - 1) = W."""
    return word_bits.bit_length()


def secded_stolen_bits(fmt: str, word_bits: int) -> tuple[int, ...]:
    """Per weight of a W-bit word: how many of its lowest bits hold check bits (check bit j is bit j div k of
    weight j mod k, k weights per word)."""
    per_word = word_bits // FORMATS[fmt].bits
    checks = secded_check_bits(word_bits)
    return tuple(len(range(weight, checks, per_word)) for weight in range(per_word))
