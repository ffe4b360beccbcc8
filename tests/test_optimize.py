"""Protecting the model onnxruntime optimised for this CPU (`runtime.optimize_for_cpu`).

The optimised graph holds onnxruntime's own kernels (NCHWc-blocked Conv, fused Conv/Gemm);
the pass must protect their weights like standard ones, and runtime-mode checking must give
exactly what the optimised model gives with OP-adjusted weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import model_zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from oppass import modelio, protect, protected_models, runtime, schema
from oppass.errors import OppassError

EXAMPLES = Path(protect.__file__).parent / "examples"
DIGITS_MODEL = EXAMPLES / "digits_cnn.onnx"


def reprotect(protected: onnx.ModelProto) -> onnx.ModelProto | None:
    """load_session's re-protection of `protected` for this CPU, loaded (None where it does not qualify)."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        modelio.save_model(protected, folder / "protected.onnx")
        source = modelio.read_model(folder / "protected.onnx", defer=True)
        path = runtime._with_runtime_checks_for_this_cpu(source, schema.read_decode_nodes(source.model), None, folder)
        return None if path is None else modelio.load_model(path)


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
    reprotected = reprotect(protected)
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


# Models in several layouts. onnxruntime reorders the fp32 Conv weights (NCHWc, renamed) and keeps the
# names of the others: a bf16 Gemm weight, and a uint8 ConvInteger weight beside an fp32 Conv. Weights the pass
# converted to int8 (decode -> DequantizeLinear; one SEC-DED with the range check) come back as fp32 words.
MIXED = {"fc1.weight": protect.WeightLayout("bf16", 32),
         "fc2.weight": protect.WeightLayout("int8", 64, code="secded", range_check=True)}


def conv_and_conv_integer() -> onnx.ModelProto:
    """Y = Conv(x, f.w) + ConvInteger(DynamicQuantizeLinear(x), u.w) * scale(x): an fp32 and a uint8 weight."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "f.w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "u.w", "xz", "u.z"], ["acc"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "xs"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    initializers = [numpy_helper.from_array(rng.standard_normal([16, 16, 3, 3]).astype(np.float32), "f.w"),
                    numpy_helper.from_array(rng.integers(0, 256, [16, 16, 3, 3]).astype(np.uint8), "u.w"),
                    numpy_helper.from_array(np.array(128, dtype=np.uint8), "u.z")]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FP32, BF16 = ("fp32", 64, "parity", False), ("bf16", 32, "parity", False)
REPROTECTED = {
    "int8": (lambda: onnx.load(DIGITS_MODEL), {"format": "int8"}),
    "fp32, bf16, int8": (lambda: onnx.load(DIGITS_MODEL), {"layouts": MIXED}),
    # both Conv weights reordered, in two layouts: each is found by its values
    "fp32, bf16 reordered": (lambda: onnx.load(DIGITS_MODEL), {"layouts": {
        "conv2.weight": protect.WeightLayout("bf16", 32)}}),
    "fp32, uint8": (conv_and_conv_integer, {"ops": ("Conv", "ConvInteger"), "layouts": {
        "u.w": protect.WeightLayout(word="weight")}}),
}


# Per case: the layouts of the re-protected words, a parity format of the file, one of the re-protected words.
EXPECTED = {
    "int8": ({FP32}, "int8", ("fp32",)),
    "fp32, bf16, int8": ({FP32, BF16, ("fp32", 64, "secded", True)}, "bf16", ("fp32", "bf16")),
    "fp32, bf16 reordered": ({FP32, BF16}, "bf16", ("fp32", "bf16")),
    "fp32, uint8": ({FP32, ("uint8", 8, "parity", False)}, "uint8", ("fp32", "uint8")),
}


def protected_file(case: str) -> onnx.ModelProto:
    """The case's model protected in runtime mode, 64-bit words unless its layouts say otherwise, counting faults."""
    model, options = REPROTECTED[case]
    return protect.transform(model(), word=64, report_faults=True, **options)


def feeds(model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
    if model.graph.input[0].name == "image":
        return {"image": images}
    return {"x": np.random.default_rng(12).standard_normal([2, 16, 8, 8]).astype(np.float32)}


def reprotected_model(protected: onnx.ModelProto) -> onnx.ModelProto:
    reprotected = reprotect(protected)
    assert reprotected is not None
    return reprotected


def layout(decode: schema.DecodeNode) -> tuple:
    return decode.format, decode.word_bits, decode.code, decode.range_max is not None


def flip_bit(model: onnx.ModelProto, packed: str, bit: int) -> None:
    """Flips stored bit `bit` of the packed initializer `packed` in place."""
    tensor = next(t for t in model.graph.initializer if t.name == packed)
    words = numpy_helper.to_array(tensor).copy()
    words.reshape(-1).view(np.uint8)[bit // 8] ^= 1 << bit % 8
    tensor.CopyFrom(numpy_helper.from_array(words, packed))


def packed_of(model: onnx.ModelProto, fmt: str, code: str = "parity") -> str:
    """The packed input of the model's first decode node of format `fmt` and code `code`."""
    return next(d.packed for d in schema.read_decode_nodes(model) if (d.format, d.code) == (fmt, code))


@pytest.mark.parametrize("case", list(REPROTECTED))
def test_load_session_reprotects_each_weight_in_its_own_layout(case: str, images: np.ndarray) -> None:
    protected = protected_file(case)
    file_decodes = schema.read_decode_nodes(protected)
    reprotected = reprotected_model(protected)
    decodes = schema.read_decode_nodes(reprotected)
    decoded = {d.output for d in decodes}
    assert len(decodes) == len(file_decodes)
    assert set(protect.weight_readers(reprotected.graph)) <= decoded  # every weight is protected again
    reordered = [n for n in reprotected.graph.node if (n.domain, n.op_type) == ("com.microsoft.nchwc", "Conv")]
    assert reordered and all(n.input[1] in decoded for n in reordered), "no decode feeds a reordered Conv"
    assert {layout(d) for d in decodes} == EXPECTED[case][0]
    by_output = {d.output: d for d in file_decodes}
    assert all(layout(d) == layout(by_output[d.output]) for d in decodes if d.output in by_output)
    assert not protect.conversion_dequantizers(reprotected.graph)  # int8 conversions come back as fp32
    inputs = feeds(protected, images)
    results = runtime.load_session(protected).run(None, inputs)
    expected = runtime.load_session(protected, optimize_runtime_checks=False).run(None, inputs)[0]
    np.testing.assert_allclose(results[0], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert [int(count) for count in results[1:]] == [0] * (len(results) - 1)


@pytest.mark.parametrize("case", list(REPROTECTED))
def test_a_stored_fault_is_masked_at_load_and_a_fault_in_the_new_words_on_run(case: str, images: np.ndarray) -> None:
    _, in_file, reprotected_formats = EXPECTED[case]
    protected = protected_file(case)
    flip_bit(protected, packed_of(protected, in_file), 6)
    with pytest.warns(UserWarning, match="1 corrupted weight words were masked at load"):
        session = runtime.load_session(protected)
    inputs = feeds(protected, images)
    assert int(session.run(None, inputs)[1]) == 0  # masked at load; the new words are clean

    for fault_in in reprotected_formats:
        reprotected = reprotected_model(protected_file(case))
        flip_bit(reprotected, packed_of(reprotected, fault_in), 6)
        session = runtime.open_session(reprotected, runtime.session_options())
        assert int(session.run(None, inputs)[1]) == 1, fault_in  # checked on every run


def test_a_flip_in_reprotected_secded_words_is_corrected_on_run(images: np.ndarray) -> None:
    reprotected = reprotected_model(protected_file("fp32, bf16, int8"))
    clean = runtime.open_session(reprotected, runtime.session_options()).run(None, {"image": images})
    flip_bit(reprotected, packed_of(reprotected, "fp32", "secded"), 3)
    logits, masked, corrected = runtime.open_session(reprotected, runtime.session_options()).run(
        None, {"image": images})
    assert (int(masked), int(corrected)) == (0, 1)
    np.testing.assert_array_equal(logits, clean[0])


@pytest.mark.parametrize("model, options", [
    (DIGITS_MODEL, {"check": "load-custom"}),
    # onnxruntime rewrites no weight of it (uint8 of ConvInteger and of MatMulInteger, which it fuses into
    # DynamicQuantizeMatMul whatever feeds it): the file's graph is its optimised graph
    ("quantized digits", {"ops": ("ConvInteger", "MatMulInteger")}),
])
def test_load_session_keeps_decode_nodes_it_cannot_or_need_not_reprotect(model: Path | str, options: dict) -> None:
    source = model_zoo.quantized_digits_model() if model == "quantized digits" else model
    protected = protect.transform(onnx.load(source), **options)
    assert reprotect(protected) is None


def test_a_layout_for_a_weight_the_pass_does_not_protect_is_an_error() -> None:
    with pytest.raises(OppassError, match="layouts name weights the pass does not protect: 'conv1.bias'"):
        protect.transform(onnx.load(DIGITS_MODEL), layouts={"conv1.bias": protect.WeightLayout("bf16")})
