"""What the pass and `inspect` report: per-tensor records and their totals (plain data, no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorReport:
    """What the pass did to one weight tensor.

    `max_weight_change` is max |decoded - stored| / |stored| over the finite nonzero stored
    weights, computed on the values in the stored format (int8: the integer codes) before
    and after the encoding changed them (the parity bit flips). Non-finite weights have no
    relative change: `nonfinite_weights` counts them (the encoding keeps them NaN or infinite).
    `max_conversion_error` is only set when the weight was converted (fp32 -> bf16/fp16/int8):
    max |converted - original| / max |original| over the finite weights, the rounding or
    quantization error in units of the tensor's largest weight magnitude. Subnormal weights
    are counted in the source tensor (`subnormals_before`) and in the decoded weights as the
    consumers read them, in the decode's output type (`subnormals_after`). `code` is the code
    protecting the words; `range_max` the range check's bound (None: no range check, or the
    tensor holds a NaN or an infinity).
    """

    name: str
    source_format: str
    stored_format: str
    word_bits: int
    code: str
    range_max: float | None
    weights: int
    bytes_before: int
    bytes_after: int
    changed_words: int
    max_weight_change: float
    max_conversion_error: float | None
    subnormals_before: int
    subnormals_after: int
    nonfinite_weights: int


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
    def range_checked(self) -> int:
        """Tensors with a range check."""
        return sum(1 for tensor in self.tensors if tensor.range_max is not None)

    @property
    def changed_words(self) -> int:
        """Words in which the encoding changed a weight (parity: a bit flip; SEC-DED: rounding)."""
        return self._total("changed_words")

    @property
    def subnormals_before(self) -> int:
        """Subnormal weights in the source tensors."""
        return self._total("subnormals_before")

    @property
    def subnormals_after(self) -> int:
        """Subnormal weights the decode nodes output, fault-free."""
        return self._total("subnormals_after")

    @property
    def nonfinite_weights(self) -> int:
        """NaN and infinite weights, kept as they are."""
        return self._total("nonfinite_weights")

    def _total(self, field_name: str) -> int:
        return sum(getattr(tensor, field_name) for tensor in self.tensors)

    @property
    def max_weight_change(self) -> float:
        """The largest `TensorReport.max_weight_change` (0.0 when nothing was protected)."""
        return max((tensor.max_weight_change for tensor in self.tensors), default=0.0)

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
    code: str
    range_max: float | None
    packed_dtype: str
    packed_shape: tuple[int, ...]
