"""What the pass and `inspect` report: per-tensor records and their totals (plain data, no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorReport:
    """What the pass did to one weight tensor.

    `max_flip_change` is max |adjusted - stored| / |stored| over the finite nonzero stored
    weights, computed on the values in the stored format (int8: the integer codes) before
    and after the parity LSB flips. `max_conversion_error` is only set when the weight was
    converted (fp32 -> bf16/fp16/int8): max |converted - original| / max |original|, the
    rounding or quantization error in units of the tensor's largest weight magnitude.
    """

    name: str
    source_format: str
    stored_format: str
    word_bits: int
    weights: int
    bytes_before: int
    bytes_after: int
    flipped_words: int
    max_flip_change: float
    max_conversion_error: float | None


@dataclass(frozen=True)
class TransformReport:
    """Per-tensor reports and their totals."""

    tensors: tuple[TensorReport, ...] = field(default_factory=tuple)

    @property
    def weights(self) -> int:
        """Weights protected, all tensors together."""
        return self._total("weights")

    @property
    def bytes_before(self) -> int:
        """Bytes of the protected tensors before the pass."""
        return self._total("bytes_before")

    @property
    def bytes_after(self) -> int:
        """Bytes of their packed tensors (and int8 scales) after it."""
        return self._total("bytes_after")

    @property
    def flipped_words(self) -> int:
        """Words whose parity needed an LSB flip."""
        return self._total("flipped_words")

    def _total(self, field_name: str) -> int:
        return sum(getattr(tensor, field_name) for tensor in self.tensors)

    @property
    def max_flip_change(self) -> float:
        """The largest `TensorReport.max_flip_change` (0.0 when nothing was protected)."""
        return max((tensor.max_flip_change for tensor in self.tensors), default=0.0)

    @property
    def max_conversion_error(self) -> float | None:
        """The largest `TensorReport.max_conversion_error`; None when no weight was converted."""
        errors = [t.max_conversion_error for t in self.tensors if t.max_conversion_error is not None]
        return max(errors, default=None)


@dataclass(frozen=True)
class ProtectedTensor:
    """One decode node of a protected model, as `inspect` reports it."""

    name: str
    format: str
    word_bits: int
    shape: tuple[int, ...]
    check: str
    output_type: str
    packed_dtype: str
    packed_shape: tuple[int, ...]
