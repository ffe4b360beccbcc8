"""The C encoder of custom_ops/encoder.c, called through ctypes from the kernel's own library.

numpy and the standard library only, like the codec: importing this module loads nothing; the
library is opened on first use, and `available()` is False when it is missing, built without the
encoder, or the host is big-endian (the C code reads little-endian streams as raw bytes). The
numpy codec (`oppass.codec`) is the reference these functions must equal (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oppass.errors import OppassError

LIBRARY_ENV = "OPPASS_CUSTOM_OP_LIBRARY"
LIBRARY_NAME = "liboppass_ops.so"


def library_path() -> Path:
    """Where the compiled library is: $OPPASS_CUSTOM_OP_LIBRARY, else the one installed with the package."""
    override = os.environ.get(LIBRARY_ENV)
    return Path(override) if override else Path(__file__).parent / "_lib" / LIBRARY_NAME


class _ParitySummary(ctypes.Structure):
    _fields_ = [("changed_words", ctypes.c_uint64), ("stuck_words", ctypes.c_uint64),
                ("first_stuck_word", ctypes.c_uint64), ("max_relative_change", ctypes.c_float)]


class _WeightCounts(ctypes.Structure):
    _fields_ = [("subnormals", ctypes.c_uint64), ("nonfinite", ctypes.c_uint64)]


class _ConversionSummary(ctypes.Structure):
    _fields_ = [("nonfinite_inputs", ctypes.c_uint64), ("overflows", ctypes.c_uint64),
                ("max_difference", ctypes.c_double), ("max_magnitude", ctypes.c_double)]


@dataclass(frozen=True)
class ParitySummary:
    """What `encode_parity` did: words made even, odd words of only infinities left odd (an error), and the
    largest relative change of a changed finite nonzero weight (binary32)."""

    changed_words: int
    stuck_words: int
    first_stuck_word: int
    max_relative_change: float


@dataclass(frozen=True)
class ConversionSummary:
    """What `convert_fp32` met: non-finite inputs (left to the caller), finite inputs that rounded to infinity,
    and max |converted - input| and max |input| over the finite inputs."""

    nonfinite_inputs: int
    overflows: int
    max_difference: float
    max_magnitude: float


@functools.cache
def _library(path: str) -> ctypes.CDLL | None:
    if sys.byteorder != "little" or not Path(path).is_file():
        return None
    try:
        library = ctypes.CDLL(path)
        functions = (library.oppass_encode_parity, library.oppass_count_weights, library.oppass_convert_fp32)
    except (OSError, AttributeError):  # not loadable here, or a build without the encoder
        return None
    pointer, u64, text = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p
    argtypes: tuple[list[Any], ...] = (
        [pointer, u64, text, u64, text, pointer, ctypes.POINTER(_ParitySummary)],
        [pointer, u64, text, u64, ctypes.POINTER(_WeightCounts)],
        [pointer, pointer, u64, text, ctypes.POINTER(_ConversionSummary)],
    )
    for function, types in zip(functions, argtypes, strict=True):
        function.argtypes = types
        function.restype = ctypes.c_int
    return library


def _loaded() -> ctypes.CDLL:
    library = _library(str(library_path()))
    if library is None:
        raise OppassError(f"the C encoder is not available (no usable library at {library_path()})")
    return library


def available() -> bool:
    """Whether the C encoder can be used in this process."""
    return _library(str(library_path())) is not None


def _address(array: np.ndarray, *, writable: bool = False) -> int:
    if not array.flags.c_contiguous or writable and not array.flags.writeable:
        raise ValueError("the C encoder needs a C-contiguous array (writable for its output)")
    return int(array.ctypes.data)


def _checked(status: int, what: str) -> None:
    if status != 0:
        raise OppassError(f"the C encoder refused its arguments ({what})")


def encode_parity(weights: np.ndarray, fmt: str, word_bits: int, flip: str,
                  changed: np.ndarray | None = None) -> ParitySummary:
    """Makes every W-bit word of the flat chunk `weights` (codes or values of `fmt`) even, in place.

    A chunk starts at a word boundary of its tensor; only a tensor's last chunk may end inside a
    word. `changed`, when given (int64, one slot per word), receives the indices of the changed
    weights, ascending; the first `changed_words` slots are filled.
    """
    summary = _ParitySummary()
    words = -(-weights.size // max(word_bits // (weights.dtype.itemsize * 8), 1))
    if changed is not None and (changed.dtype != np.int64 or changed.size < words):
        raise ValueError("changed needs one int64 slot per word")
    status = _loaded().oppass_encode_parity(
        _address(weights, writable=True), weights.size, fmt.encode(), word_bits, flip.encode(),
        None if changed is None else _address(changed, writable=True), ctypes.byref(summary))
    _checked(status, f"{fmt}, {word_bits}-bit words, {flip}")
    return ParitySummary(summary.changed_words, summary.stuck_words, summary.first_stuck_word,
                         float(summary.max_relative_change))


def count_weights(weights: np.ndarray, fmt: str, subnormal_threshold: int) -> tuple[int, int]:
    """(subnormal, non-finite) weights in a flat chunk of `fmt`; subnormal: 0 < magnitude bits < the threshold."""
    counts = _WeightCounts()
    status = _loaded().oppass_count_weights(_address(weights), weights.size, fmt.encode(), subnormal_threshold,
                                            ctypes.byref(counts))
    _checked(status, f"{fmt}, threshold {subnormal_threshold:#x}")
    return int(counts.subnormals), int(counts.nonfinite)


def convert_fp32(weights: np.ndarray, out: np.ndarray, fmt: str) -> ConversionSummary:
    """Rounds the float32 chunk `weights` into `out` (a chunk of bf16 or fp16), to nearest, ties to even."""
    if weights.dtype != np.float32 or out.size != weights.size or out.dtype.itemsize != 2:
        raise ValueError("convert_fp32 takes float32 weights and a 16-bit output of the same size")
    summary = _ConversionSummary()
    status = _loaded().oppass_convert_fp32(_address(weights), _address(out, writable=True), weights.size,
                                           fmt.encode(), ctypes.byref(summary))
    _checked(status, f"to {fmt}")
    return ConversionSummary(summary.nonfinite_inputs, summary.overflows, summary.max_difference,
                             summary.max_magnitude)
