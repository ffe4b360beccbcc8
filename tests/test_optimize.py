"""Protecting the model onnxruntime optimised for this CPU (`runtime.optimize_for_cpu`).

The optimised graph holds onnxruntime's own kernels (NCHWc-blocked Conv, fused Conv/Gemm);
the pass must protect their weights like standard ones, and runtime-mode checking must give
exactly what the optimised model gives with OP-adjusted weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from oppass import protect, protected_models, runtime, schema
from oppass.errors import OppassError

EXAMPLES = Path(protect.__file__).parent / "examples"
DIGITS_MODEL = EXAMPLES / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def optimized() -> onnx.ModelProto:
    return runtime.optimize_for_cpu(DIGITS_MODEL)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(EXAMPLES / "digits_test.npz") as data:
        return data["inputs"]


def weight_consumers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv and Gemm nodes, standard or onnxruntime's own, that read a weight."""
    return [n for n in model.graph.node
            if (n.domain == "" and n.op_type in ("Conv", "Gemm")) or (n.domain, n.op_type) in protect.RUNTIME_OPS]


def outputs(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """Logits with prepacking off and one thread, so that kernels compute identically run to run."""
    options = runtime.session_options(threads=1)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"image": images})[0]


def test_every_weight_of_the_optimized_model_is_protected(optimized: onnx.ModelProto) -> None:
    consumers = weight_consumers(optimized)
    assert any(n.domain != "" for n in consumers), "onnxruntime rewrote no Conv or Gemm: nothing new is tested"
    protected = protect.transform(optimized)
    decoded = {o for n in protected.graph.node if n.domain == schema.DOMAIN for o in n.output}
    assert [n.input[1] in decoded for n in weight_consumers(protected)] == [True] * len(consumers)


def test_runtime_check_equals_the_optimized_model_with_adjusted_weights(
    optimized: onnx.ModelProto, images: np.ndarray
) -> None:
    protected = protect.transform(optimized)
    np.testing.assert_array_equal(outputs(protected, images), outputs(protected_models.strip(protected), images))
    predictions = outputs(protected, images).argmax(1)
    assert np.mean(predictions == outputs(onnx.load(DIGITS_MODEL), images).argmax(1)) > 0.99


def test_a_flipped_exponent_bit_is_masked(optimized: onnx.ModelProto, images: np.ndarray) -> None:
    protected = protect.transform(optimized, word=64)
    weight = weight_consumers(optimized)[0].input[1]
    packed = next(t for t in protected.graph.initializer if t.name == protect.packed_name(weight))
    words = numpy_helper.to_array(packed).copy()
    words.reshape(-1).view(np.uint8)[3] ^= 1 << 6  # bit 30 of the stream: the exponent MSB of weight 0
    packed.CopyFrom(numpy_helper.from_array(words, packed.name))

    expected = protected_models.strip(protect.transform(optimized, word=64))
    adjusted = next(t for t in expected.graph.initializer if t.name == weight)
    values = numpy_helper.to_array(adjusted).copy()
    values.reshape(-1)[:2] = 0  # the masked 64-bit word holds fp32 weights 0 and 1
    adjusted.CopyFrom(numpy_helper.from_array(values, weight))
    masked = outputs(protected, images)
    np.testing.assert_array_equal(masked, outputs(expected, images))
    unfaulted = outputs(protect.transform(optimized, word=64), images)
    assert not np.array_equal(masked, unfaulted), "the mask changed nothing"


def test_a_protected_model_is_refused(optimized: onnx.ModelProto) -> None:
    with pytest.raises(OppassError, match="already protected"):
        runtime.optimize_for_cpu(protect.transform(optimized))


# ----------------------------------------------------------------------------- load_session re-protects for this CPU


def test_load_session_reprotects_a_runtime_model_on_the_graph_optimised_for_this_cpu(images: np.ndarray) -> None:
    protected = protect.transform(onnx.load(DIGITS_MODEL), report_faults=True)
    decodes = schema.read_decode_nodes(protected)
    reprotected = runtime._with_runtime_checks_for_this_cpu(protected, decodes, None)
    assert reprotected is not None
    consumers = weight_consumers(reprotected)
    assert any(n.domain != "" for n in consumers), "onnxruntime rewrote no Conv or Gemm: nothing new is tested"
    decoded = {d.output for d in schema.read_decode_nodes(reprotected) if d.check == "runtime"}
    assert all(n.input[1] in decoded for n in consumers)
    session = runtime.load_session(protected)
    unoptimized = runtime.load_session(protected, optimize_runtime_checks=False)
    logits, masked = session.run(None, {"image": images})
    expected, _ = unoptimized.run(None, {"image": images})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert int(masked) == 0 and (logits.argmax(1) == expected.argmax(1)).mean() > 0.99


def test_load_session_masks_a_stored_fault_when_it_reprotects(images: np.ndarray) -> None:
    protected = protect.transform(onnx.load(DIGITS_MODEL), report_faults=True)
    tensor = next(t for t in protected.graph.initializer if t.name.endswith("::op_packed"))
    raw = bytearray(tensor.raw_data)
    raw[0] ^= 0x40  # bit 6 of the first word: a mantissa bit of its first weight
    tensor.raw_data = bytes(raw)
    with pytest.warns(UserWarning, match="1 corrupted weight words were masked at load"):
        session = runtime.load_session(protected)
    assert int(session.run(None, {"image": images})[1]) == 0  # masked at load; the new words are clean


@pytest.mark.parametrize("options", [{"format": "int8"}, {"check": "load-custom"}])
def test_load_session_keeps_decode_nodes_it_cannot_reprotect(options: dict) -> None:
    protected = protect.transform(onnx.load(DIGITS_MODEL), **options)
    assert runtime._with_runtime_checks_for_this_cpu(protected, schema.read_decode_nodes(protected), None) is None
