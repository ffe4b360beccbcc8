"""Encoding one weight tensor into the bytes of its packed tensor, chunk by chunk, with the figures the pass reports.

The graph pass hands a `TensorEncoder` the tensor's weights in their own format, flat in C order,
in chunks of `chunk_weights` weights, and writes what each `encode` returns and then `tail`: the
packed tensor's little-endian bytes (docs/FORMAT.md). A chunk is CHUNK_WEIGHTS weights. With the C
encoder (`oppass.native`, parity only) every step is C (rounding to bf16/fp16, parity adjustment,
counts); for SEC-DED, or without it, the numpy codec encodes each chunk (the codes work word by word
and chunks start on word boundaries), so the memory used is one chunk whatever the tensor's size.
A conversion to int8 quantizes each chunk with the tensor's per-channel scales, which the caller
measures first in a pass of its own (`codec.int8_scales`, chunk by chunk). Only `reference=True`
encodes the tensor as one chunk. All give the same bytes and figures (tests/test_native.py); where a
chunk meets what only the whole tensor words exactly (an error: a word of infinities, a weight out
of range, counted over the tensor) the encoder raises `ReferenceNeeded` and the tensor goes through
the codec whole, which raises the error.

numpy only, like the codec: nothing here knows ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from oppass import codec, native
from oppass.errors import OppassError
from oppass.formats import FLIP_STRATEGIES, FORMATS, PARITY, SECDED

# Weights per chunk: a multiple of every N = W / b (at most 64), so chunks start on word boundaries.
CHUNK_WEIGHTS = 2**18
# Elements per float64 slice when the codec path measures a conversion error.
STATISTIC_SLICE = 2**20


class ReferenceNeeded(Exception):
    """The C encoder met an error only the numpy codec words exactly: encode the whole tensor with `reference=True`."""


@dataclass(frozen=True)
class Figures:
    """What encoding a tensor did, as `oppass.reports.TensorReport` reports it."""

    changed_words: int
    max_weight_change: float
    max_conversion_error: float | None
    subnormals_before: int
    subnormals_after: int
    nonfinite_weights: int
    fault_free_max: float | None = None  # max |w| of the fault-free decode; None when measured off or non-finite


class TensorEncoder:
    """Converts (fp32 to bf16/fp16/int8, or not) and encodes one tensor, a chunk at a time.

    `code` is parity (`flip` chooses the weight, None: the default strategy) or SEC-DED (`flip`
    None). `checked=False` packs parity words without the adjustment (check mode "none"; SEC-DED
    always sets its check bits). `output_dtype` is what a fault-free decode outputs (subnormals are
    counted in it); `axis` is the int8 conversion's channel axis and `scales` its scales
    (`codec.int8_scales`; needed unless `reference`). `measure_range` also measures
    the fault-free decode's largest magnitude (`Figures.fault_free_max`, the range check's bound).
    `reference=True` uses the numpy codec on the whole tensor whatever is available.
    """

    def __init__(self, *, name: str, source_format: str, target_format: str, word_bits: int,
                 code: str = PARITY, flip: str | None = None, checked: bool, output_dtype: npt.DTypeLike,
                 shape: tuple[int, ...], axis: int = 0, scales: np.ndarray | None = None,
                 measure_range: bool = False, reference: bool = False) -> None:
        self.name, self.source, self.target = name, source_format, target_format
        self.word_bits, self.code, self.checked = word_bits, code, checked or code == SECDED
        self.flip = FLIP_STRATEGIES[0] if flip is None else flip  # parity's; SEC-DED has none
        self.shape, self.axis, self.output_dtype = shape, axis, np.dtype(output_dtype)
        self.measure_range = measure_range
        self.n_weights = codec.element_count(shape)
        self.quantizes = target_format != source_format and target_format == "int8"
        if self.quantizes and scales is None and not reference:
            raise ValueError("a chunked conversion to int8 needs the tensor's scales")
        self.scales = scales
        self.whole = reference
        self.native = not self.whole and code == PARITY and native.available()
        self.chunk_weights = max(self.n_weights, 1) if self.whole else CHUNK_WEIGHTS
        self._before_threshold = _subnormal_threshold(source_format, FORMATS[source_format].dtype)
        self._after_threshold = _subnormal_threshold(target_format, self.output_dtype)
        self._buffer: np.ndarray | None = None
        self._seen = 0
        self._changed_words = 0
        self._max_weight_change = 0.0
        self._largest_difference = 0.0
        self._largest_weight = 0.0
        self._subnormals_before = 0
        self._subnormals_after = 0
        self._nonfinite = 0
        self._fault_free_max: float | None = 0.0

    def encode(self, original: np.ndarray) -> np.ndarray:
        """The packed bytes (uint8) of the next chunk of weights; valid until the next call.

        `original` (flat, in the source format) may be changed in place when it is writable.
        """
        if original.size > self.chunk_weights or self._seen + original.size > self.n_weights:
            raise ValueError(f"chunk of {original.size} weights does not fit the tensor's chunks")
        self._seen += original.size
        if self.native:
            packed = self._encode_native(original)
        elif self.whole:
            packed = self._encode_reference(original)
        else:
            try:
                packed = self._encode_reference(original)
            except OppassError:
                raise ReferenceNeeded from None
        return packed.reshape(-1).view(np.uint8)

    @property
    def tail(self) -> bytes:
        """The zero padding that ends the last word, written after the last chunk."""
        if not self.native:
            return b""  # the codec pads the last chunk to whole words
        per_word = self.word_bits // FORMATS[self.target].bits
        padded = -(-self.n_weights // per_word) * per_word
        return bytes((padded - self.n_weights) * FORMATS[self.target].dtype.itemsize)

    def figures(self) -> Figures:
        """The figures of the whole tensor, once every chunk is encoded."""
        if self._seen != self.n_weights:
            raise ValueError(f"{self._seen} of {self.n_weights} weights were encoded")
        conversion = None
        if self.target != self.source:
            conversion = self._largest_difference / self._largest_weight if self._largest_weight else 0.0
        return Figures(self._changed_words, self._max_weight_change, conversion, self._subnormals_before,
                       self._subnormals_after, self._nonfinite,
                       self._fault_free_max if self.measure_range else None)

    def _measure_range(self, decoded: np.ndarray) -> None:
        if self.measure_range and self._fault_free_max is not None:
            largest = codec.max_magnitude(decoded)
            self._fault_free_max = None if largest is None else max(self._fault_free_max, largest)

    # ------------------------------------------------------------------------- C

    def _encode_native(self, original: np.ndarray) -> np.ndarray:
        self._subnormals_before += native.count_weights(original, self.source, self._before_threshold)[0]
        if self.quantizes:
            stored = self._quantize(original)
        elif self.target != self.source:
            stored = self._chunk_buffer(original.size)
            conversion = native.convert_fp32(original, stored, self.target)
            if conversion.overflows:
                raise ReferenceNeeded
            if conversion.nonfinite_inputs:  # NaN payloads and infinities as the codec rounds them
                stored[...] = codec.to_format(original, self.target, name=self.name)[0]
            self._largest_difference = max(self._largest_difference, conversion.max_difference)
            self._largest_weight = max(self._largest_weight, conversion.max_magnitude)
        elif original.flags.writeable and original.flags.c_contiguous:
            stored = original
        else:
            stored = self._chunk_buffer(original.size)
            stored[...] = original
        if self.checked:
            summary = native.encode_parity(stored, self.target, self.word_bits, self.flip)
            if summary.stuck_words:
                raise ReferenceNeeded
            self._changed_words += summary.changed_words
            self._max_weight_change = max(self._max_weight_change, summary.max_relative_change)
        subnormals, nonfinite = native.count_weights(stored, self.target, self._after_threshold)
        self._subnormals_after += subnormals
        self._nonfinite += nonfinite
        self._measure_range(stored)  # the adjusted weights: what a fault-free decode outputs
        return stored

    def _quantize(self, original: np.ndarray) -> np.ndarray:
        """The int8 codes of the chunk just counted in `_seen`, its conversion figures added to the tensor's."""
        assert self.scales is not None
        start = self._seen - original.size
        stored = codec.quantize_int8(original, self.scales, self.shape, self.axis, start)
        difference, largest = conversion_extremes(original, stored, self.scales, self.axis, self.shape, start)
        self._largest_difference = max(self._largest_difference, difference)
        self._largest_weight = max(self._largest_weight, largest)
        return stored

    def _chunk_buffer(self, size: int) -> np.ndarray:
        if self._buffer is None:
            self._buffer = np.empty(min(self.chunk_weights, self.n_weights), FORMATS[self.target].dtype)
        return self._buffer[:size]

    # ------------------------------------------------------------------------- numpy codec

    def _encode_reference(self, original: np.ndarray) -> np.ndarray:
        """Encodes a chunk (the whole tensor when `whole`) with the codec, adding its figures to the tensor's."""
        weights = original.reshape(self.shape) if self.whole else original
        if self.quantizes and not self.whole:
            stored, scales = self._quantize(original), None  # its figures added by _quantize
        else:
            stored, scales = codec.to_format(weights, self.target, name=self.name, axis=self.axis)
        if self.checked:
            flip = None if self.code == SECDED else self.flip
            encoded = codec.encode(stored, self.word_bits, flip, code=self.code, adjusted=False, name=self.name)
            packed, changed, changed_values = encoded.packed, encoded.changed, encoded.changed_values
            self._changed_words += encoded.changed_words
        else:
            packed, changed, changed_values = codec.pack(stored, self.word_bits), np.zeros(0, np.intp), \
                stored.reshape(-1)[:0]
        output_dtype = self.output_dtype
        before_change = stored.reshape(-1)[changed]
        self._max_weight_change = max(self._max_weight_change, max_relative_change(before_change, changed_values))
        if self.target != self.source and (self.whole or not self.quantizes):
            difference, largest = conversion_extremes(weights, stored, scales, self.axis, self.shape)
            self._largest_difference = max(self._largest_difference, difference)
            self._largest_weight = max(self._largest_weight, largest)
        self._subnormals_before += codec.subnormal_count(weights)
        self._subnormals_after += (codec.subnormal_count(stored, output_dtype)
                                   - codec.subnormal_count(before_change, output_dtype)
                                   + codec.subnormal_count(changed_values, output_dtype))
        self._nonfinite += codec.nonfinite_count(stored)
        if self.measure_range:
            decoded = stored.reshape(-1).copy()
            decoded[changed] = changed_values
            self._measure_range(decoded)
        return packed


def _subnormal_threshold(fmt: str, judged_dtype: np.dtype) -> int:
    """The magnitude bits below which a nonzero weight of `fmt` is subnormal as a value of `judged_dtype`.

    `codec.subnormal_count`'s threshold (the judging format's smallest normal rounded into `fmt`), as bits.
    """
    weight_format = FORMATS[fmt]
    if not weight_format.is_float:
        return 0
    judged = FORMATS[codec.format_of(judged_dtype)]
    threshold = np.asarray(judged.smallest_normal).astype(weight_format.dtype)
    return int(threshold.view(weight_format.code_dtype)) & ((1 << (weight_format.bits - 1)) - 1)


def max_relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """Max |after - before| / |before| over the finite nonzero `before` values (0.0 if there are none).

    Computed in float32, which holds every stored format exactly; only the division rounds.
    """
    before32 = before.astype(np.float32, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN and zero weights are not considered
        change = after.astype(np.float32, copy=False) - before32
        change = np.divide(np.abs(change, out=change), np.abs(before32), out=change)
    considered = np.isfinite(before32)
    considered &= before32 != 0
    return float(change.max(where=considered, initial=0.0))


def conversion_extremes(original: np.ndarray, stored: np.ndarray, scales: np.ndarray | None, axis: int,
                        shape: tuple[int, ...], start: int = 0) -> tuple[float, float]:
    """(max |converted - original|, max |original|) over the finite originals, in float64 slices: the tensor's
    conversion error is their ratio, the rounding or quantization error in units of the largest weight.

    `original` and `stored` are the weights from flat index `start` of a tensor of `shape`;
    `scales` (int8) are per index of `axis`. Each slice of STATISTIC_SLICE weights is widened
    on its own, so the float64 copies stay a fixed size whatever the tensor's.
    """
    flat_original, flat_stored = original.reshape(-1), stored.reshape(-1)
    channels, inner = codec.channel_layout(shape, axis) if scales is not None else (1, 1)
    scales64 = None if scales is None else scales.astype(np.float64).reshape(-1)
    largest = difference = 0.0
    for first in range(0, flat_original.size, STATISTIC_SLICE):
        end = min(first + STATISTIC_SLICE, flat_original.size)
        with np.errstate(invalid="ignore"):  # signalling NaNs, which are not considered
            reference = flat_original[first:end].astype(np.float64)
        converted = flat_stored[first:end].astype(np.float64)
        if scales64 is not None:
            converted *= scales64[np.arange(start + first, start + end) // inner % channels]
        finite = np.isfinite(reference)
        largest = max(largest, float(np.abs(reference[finite]).max(initial=0.0)))
        difference = max(difference, float(np.abs(converted[finite] - reference[finite]).max(initial=0.0)))
    return difference, largest
