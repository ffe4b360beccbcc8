"""Transformer exports as they come (issue 13.3): tools/export_transformer.py's GPT-2-shaped network.

torch.onnx.export writes its Linear layers as MatMul of a transposed weight (folded into a new
initializer, or a Transpose node of the weight), the tied head shares the token embedding with a
Gather, and fp16 and bf16 exports keep their weights in their own type. Every MatMul weight must
be protected, decoded to its own type, and the protected model must compute exactly what the
stripped one computes. Skipped when torch is not installed (it is in the test extra).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_zoo import transformer
from onnx import TensorProto, helper

from oppass import protected_models, runtime
from oppass.protect import transform_file, transform_with_report

pytest.importorskip("torch")

WEIGHT_MATMULS = 9  # 2 blocks x (attention in and out, MLP in and out) + the tied head
TOKENS = np.random.default_rng(0).integers(0, 128, (3, 16)).astype(np.int64)


def outputs(model: onnx.ModelProto | str, custom_ops: bool, optimized: bool = True) -> np.ndarray:
    options = runtime.session_options() if custom_ops else ort.SessionOptions()
    if not optimized:  # onnxruntime fuses a DequantizeLinear of a constant with its MatMul, not of a decode
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options).run(["logits"], {"tokens": TOKENS})[0]


def weight_names(model: onnx.ModelProto) -> set[str]:
    """The initializers the exported MatMuls read, directly or through a Transpose."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    names = set()
    for node in model.graph.node:
        if node.op_type == "MatMul":
            weight = node.input[1]
            if weight in producers and producers[weight].op_type == "Transpose":
                weight = producers[weight].input[0]
            if weight in initializers:
                names.add(weight)
    return names


@pytest.mark.parametrize("folding", [True, False], ids=["folded", "transposes"])
@pytest.mark.parametrize(("dtype", "options"), [
    ("fp32", {}),
    ("fp32", {"format": "bf16", "word": "512"}),
    ("fp32", {"format": "fp16", "flip": "min-error"}),
    ("fp16", {"word": "weight", "flip": "largest"}),
])
def test_protected_transformer_computes_what_the_stripped_one_computes(dtype, options, folding, tmp_path,
                                                                       custom_op_library):
    exported = transformer(dtype, folding)
    model = onnx.load(exported)
    output = tmp_path / "protected.onnx"

    report = transform_file(exported, output, ops=("MatMul", "Gemm"), **options)

    protected = onnx.load(output)
    expected_weights = weight_names(model)
    assert len(expected_weights) == WEIGHT_MATMULS  # folded, the head reads a transposed copy of wte
    assert {tensor.name for tensor in report.tensors} == expected_weights
    if not folding:
        assert "wte.weight" in expected_weights  # read by the embedding's Gather and the head's Transpose
    kept = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}[model.graph.initializer[0].data_type]
    assert {tensor.stored_format for tensor in report.tensors} == {options.get("format", kept)}
    decoded_types = {entry.type.tensor_type.elem_type for entry in protected.graph.value_info
                     if entry.name in expected_weights}
    assert decoded_types == {model.graph.initializer[0].data_type}  # decoded to the export's own type
    np.testing.assert_array_equal(outputs(str(output), custom_ops=True),
                                  outputs(protected_models.strip(protected), custom_ops=False))


def test_int8_through_transposes_quantizes_each_output_channel(tmp_path, custom_op_library):
    exported = transformer("fp32", folding=False)

    protected, report = transform_with_report(exported, ops=("MatMul",), format="int8")

    assert len(report.tensors) == WEIGHT_MATMULS
    quantized = outputs(protected, custom_ops=True, optimized=False)
    original = outputs(str(exported), custom_ops=False)
    stripped = outputs(protected_models.strip(protected), custom_ops=False, optimized=False)
    np.testing.assert_array_equal(quantized, stripped)
    assert np.abs(quantized - original).max() < 0.05 * np.abs(original).max()
    dequantize_axes = {node.input[0]: node.attribute[0].i for node in protected.graph.node
                       if node.op_type == "DequantizeLinear"}
    assert dequantize_axes["wte.weight::op_int8"] == 0  # the head's output channels are the vocabulary: rows of wte
    assert dequantize_axes["blocks.0.c_attn.weight::op_int8"] == 0  # nn.Linear weights are [out, in]


@pytest.mark.parametrize("folding", [True, False], ids=["folded", "transposes"])
def test_bf16_transformer_weights_decode_to_bf16_exactly(folding, tmp_path, custom_op_library):
    """The CPU provider of onnxruntime has no bf16 Add or LayerNorm: the decode nodes run alone, their bf16
    outputs widened (exactly) by a Cast, since onnxruntime's Python API returns no bf16 arrays."""
    exported = transformer("bf16", folding)
    output = tmp_path / "protected.onnx"

    report = transform_file(exported, output, ops=("MatMul",))

    protected = onnx.load(output)
    assert {tensor.stored_format for tensor in report.tensors} == {"bf16"}
    names = sorted(tensor.name for tensor in report.tensors)
    decode_nodes = [node for node in protected.graph.node if node.domain == "ai.oppass"]
    casts = [helper.make_node("Cast", [name], [f"{name}.fp32"], to=TensorProto.FLOAT) for name in names]
    decode_only = helper.make_model(
        helper.make_graph(decode_nodes + casts, "decode", [],
                          [helper.make_tensor_value_info(f"{name}.fp32", TensorProto.FLOAT, None) for name in names],
                          [t for t in protected.graph.initializer if t.name.endswith("::op_packed")]),
        opset_imports=list(protected.opset_import), ir_version=protected.ir_version)
    widened = ort.InferenceSession(decode_only.SerializeToString(), runtime.session_options()).run(
        [f"{name}.fp32" for name in names], {})
    decoded = [(values.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16) for values in widened]
    stripped = {tensor.name: onnx.numpy_helper.to_array(tensor)
                for tensor in protected_models.strip(protected).graph.initializer}
    original = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in onnx.load(exported).graph.initializer}
    for name, values in zip(names, decoded, strict=True):
        assert values.dtype == stripped[name].dtype == original[name].dtype
        np.testing.assert_array_equal(values.view(np.uint16), stripped[name].view(np.uint16))
        assert (values.view(np.uint16) ^ original[name].view(np.uint16)).max() <= 0x8000  # one bit at most
