"""Reference models for bit-exact comparisons: the original model with the weights a fault-free decode yields."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from oppass import codec, modelio, runtime


def plain_options(with_library: bool) -> ort.SessionOptions:
    """Session options with no graph optimization and no weight prepacking."""
    options = runtime.session_options() if with_library else ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def with_weights(model: onnx.ModelProto, replacements: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers (main graph and subgraphs) named in `replacements` hold new values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in modelio.all_tensors(copy):
        if tensor.name in replacements:
            tensor.CopyFrom(numpy_helper.from_array(replacements[tensor.name], tensor.name))
    return copy


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in modelio.all_tensors(model) if t.name == name)


def adjusted_reference(model: onnx.ModelProto, names: tuple[str, ...], fmt: str, word: str, flip: str | None,
                       axes: dict[str, int] | None = None, code: str = "parity") -> onnx.ModelProto:
    """The original model with each named weight replaced by what a fault-free decode yields (as fp32)."""
    replacements = {}
    for name in names:
        original = initializer(model, name)
        target = codec.format_of(original.dtype) if fmt == "keep" else fmt
        stored, scales = codec.to_format(original, target, name=name, axis=(axes or {}).get(name, 0))
        adjusted = codec.encode(stored, codec.word_bits(target, word, code), flip, code=code).adjusted
        if scales is not None:
            shape = [1] * adjusted.ndim
            shape[(axes or {}).get(name, 0)] = scales.size
            adjusted = adjusted.astype(np.float32) * scales.reshape(shape)
        elif original.dtype == np.float32:
            adjusted = adjusted.astype(np.float32)
        replacements[name] = adjusted
    return with_weights(model, replacements)
