"""The standard-op decode (oppass/standard_decode.py) against the numpy codec and the C kernel.

Each decode runs twice: with onnxruntime's graph optimizations off (every node executes)
and fully on (the chain is constant-folded at session creation). Outputs are compared bit
for bit, as raw bytes, with `codec.decode`, the normative vectors and ParityCheckUnpack
with `check = load`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_kernel import (
    LAYOUTS,
    OUTPUT_TYPES,
    SMALL_SHAPES,
    codec_expectation,
    decode_with_kernel,
    flip_stream_bits,
    layout_id,
    load_vectors,
    output_codes,
    random_faults,
    random_weights,
    raw_bytes,
    vector_packed,
)

from oppass import codec
from oppass.errors import OppassError
from oppass.standard_decode import IR_VERSION, OPSET, standard_decode

WEIGHT = "w"
PACKED = "w::op_packed"
MASKED = "w::op_masked"
LEVELS = {
    "executed": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "folded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def decoder_model(packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], output_type: int) -> onnx.ModelProto:
    """The standard-op decode of `packed` as a model with outputs WEIGHT and MASKED."""
    decode = standard_decode(WEIGHT, PACKED, WEIGHT, fmt, width, shape, output_type, MASKED)
    graph = helper.make_graph(
        decode.nodes,
        "standard_decode_test",
        [],
        [helper.make_tensor_value_info(WEIGHT, output_type, list(shape)),
         helper.make_tensor_value_info(MASKED, TensorProto.INT64, [])],
        [numpy_helper.from_array(packed, PACKED), *decode.initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def decode_with_standard_ops(
    packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], output_type: int, level: str
) -> tuple[np.ndarray, int]:
    """Output codes (unsigned ints of the output element width) and masked count from the standard ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    model = decoder_model(packed, fmt, width, shape, output_type)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    weights, masked = session.run_with_ort_values([WEIGHT, MASKED], {})
    assert weights.shape() == list(shape)
    element_bytes = 4 if output_type == TensorProto.FLOAT else codec.FORMATS[fmt].bits // 8
    return raw_bytes(weights).view(f"<u{element_bytes}"), int(masked.numpy())


def assert_decodes_alike(packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], output_type: int) -> None:
    """Standard ops (executed and folded), the C kernel (check = load) and the codec give the same bits."""
    expected, expected_masked = codec_expectation(packed, fmt, width, shape, "load", output_type)
    kernel, kernel_masked = decode_with_kernel(packed, fmt, width, shape, "load", output_type)
    np.testing.assert_array_equal(kernel, expected)
    assert kernel_masked == expected_masked
    for level in LEVELS:
        decoded, masked = decode_with_standard_ops(packed, fmt, width, shape, output_type, level)
        np.testing.assert_array_equal(decoded, expected, err_msg=f"{level}, shape {list(shape)}")
        assert masked == expected_masked, level


# ----------------------------------------------------------------------------- (1) normative vectors

VECTOR_RUNS = [
    pytest.param(case, output_type, id=f"{case['name']}-{TensorProto.DataType.Name(output_type)}")
    for case in load_vectors()
    for output_type in OUTPUT_TYPES[case["format"]]
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("case", "output_type"), VECTOR_RUNS)
def test_vectors_decode_clean_words_unchanged(case: dict, output_type: int, level: str) -> None:
    fmt, width, shape = case["format"], case["word_bits"], case["shape"]
    packed = vector_packed(case)
    decoded, masked = decode_with_standard_ops(packed, fmt, width, shape, output_type, level)
    np.testing.assert_array_equal(decoded, output_codes(case["adjusted"], fmt, output_type))
    assert masked == 0
    assert_decodes_alike(packed, fmt, width, shape, output_type)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    ("case", "output_type"), [run for run in VECTOR_RUNS if "decoded_after_faults" in run.values[0]]
)
def test_vectors_mask_faulty_words(case: dict, output_type: int, level: str) -> None:
    fmt, width, shape = case["format"], case["word_bits"], case["shape"]
    faults = case["decoded_after_faults"]
    packed = vector_packed(case)
    flip_stream_bits(packed, faults["flipped_bits"])
    decoded, masked = decode_with_standard_ops(packed, fmt, width, shape, output_type, level)
    np.testing.assert_array_equal(decoded, output_codes(faults["decoded"], fmt, output_type))
    assert masked == faults["masked_words"]
    assert_decodes_alike(packed, fmt, width, shape, output_type)


# ----------------------------------------------------------------------------- (2) random tensors

SHAPES = [*SMALL_SHAPES, (5, 0), (64, 3, 3, 3)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_random_tensors_match_codec_and_kernel(layout: tuple[str, int, int]) -> None:
    """Arbitrary bit patterns (NaNs, infinities, subnormals) with 0, 1, 9 and dense random faults."""
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt)])
    for shape in SHAPES:
        packed = codec.encode(random_weights(rng, fmt, int(np.prod(shape))).reshape(shape), width).packed
        for faults in (0, 1, 9, packed.nbytes):
            faulty = packed.copy()
            random_faults(rng, faulty, faults)
            assert_decodes_alike(faulty, fmt, width, shape, output_type)


@pytest.mark.parametrize("layout", [("fp32", 32, TensorProto.FLOAT), ("fp16", 512, TensorProto.FLOAT),
                                    ("bf16", 64, TensorProto.BFLOAT16), ("int8", 128, TensorProto.INT8)],
                         ids=layout_id)
def test_large_tensor_with_sparse_faults(layout: tuple[str, int, int]) -> None:
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type])
    shape = (257, 1031)
    packed = codec.encode(random_weights(rng, fmt, 257 * 1031).reshape(shape), width).packed.copy()
    random_faults(rng, packed, 300)
    assert_decodes_alike(packed, fmt, width, shape, output_type)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("fp64", 64, [4], TensorProto.FLOAT), "unknown weight format 'fp64'"),
        (("fp32", 16, [4], TensorProto.FLOAT), "invalid word size 16 for fp32"),
        (("int8", 24, [4], TensorProto.INT8), "invalid word size 24 for int8"),
        (("int8", 64, [4], TensorProto.FLOAT), "expected INT8"),
        (("fp16", 64, [4], TensorProto.BFLOAT16), "expected FLOAT16 or FLOAT"),
        (("fp32", 64, [-1, 4], TensorProto.FLOAT), "dimensions must be non-negative"),
    ],
)
def test_invalid_arguments_are_refused(arguments: tuple, message: str) -> None:
    fmt, width, shape, output_type = arguments
    with pytest.raises(OppassError, match=message):
        standard_decode(WEIGHT, PACKED, WEIGHT, fmt, width, shape, output_type)


# ----------------------------------------------------------------------------- (3) deployment with plain onnxruntime

INPUT_SHAPE = [1, 3, 8, 8]
CONV_SHAPE = [8, 3, 3, 3]
FC_SHAPE = [10, 8 * 6 * 6]
MASKED_TOTAL = "oppass_masked_words"


def small_cnn(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(transB=1), reading weights from `weights` (initializers or decode outputs)."""
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def protected_cnn(weights: dict[str, np.ndarray], fmt: str, width: int, report_faults: bool = True) -> onnx.ModelProto:
    """The CNN with every weight stored packed behind a standard-op decode, optionally reporting masked words."""
    model = small_cnn({})
    graph = model.graph
    nodes, counts = [], []
    for name, value in weights.items():
        count = f"{name}::op_masked" if report_faults else None
        decode = standard_decode(name, f"{name}::op_packed", name, fmt, width, value.shape, TensorProto.FLOAT, count)
        packed = codec.encode(codec.to_format(value, fmt)[0], width).packed
        graph.initializer.append(numpy_helper.from_array(packed, f"{name}::op_packed"))
        graph.initializer.extend(decode.initializers)
        nodes.extend(decode.nodes)
        counts.append(count)
    if report_faults:
        nodes.append(helper.make_node("Add", counts, [MASKED_TOTAL], name=f"{MASKED_TOTAL}::op_sum"))
        graph.output.append(helper.make_tensor_value_info(MASKED_TOTAL, TensorProto.INT64, []))
    nodes.extend(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


# Runs models with plain onnxruntime (no custom-op library, no oppass) and reports what it imported.
PLAIN_RUNNER = """
import json, sys
import numpy as np
import onnxruntime as ort

x = np.load(sys.argv[1])
results = []
for path in sys.argv[2:]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y, masked = session.run(["y", "oppass_masked_words"], {"x": x})
    results.append({"y": y.tolist(), "masked": int(masked)})
imported = sorted(name for name in sys.modules if name.split(".")[0] == "oppass")
print(json.dumps({"results": results, "oppass_modules": imported}))
"""


def cnn_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(31)
    return {"conv.w": rng.standard_normal(CONV_SHAPE).astype(np.float32),
            "fc.w": rng.standard_normal(FC_SHAPE).astype(np.float32)}


def adjusted_weights(weights: dict[str, np.ndarray], fmt: str, width: int) -> dict[str, np.ndarray]:
    """What a fault-free decode yields for each weight, as fp32."""
    adjusted = {}
    for name, value in weights.items():
        encoded = codec.encode(codec.to_format(value, fmt)[0], width)
        assert encoded.adjusted is not None
        adjusted[name] = encoded.adjusted.astype(np.float32)
    return adjusted


def flip_stored_bit(model: onnx.ModelProto, packed_name: str, stream_bit: int) -> onnx.ModelProto:
    faulty = onnx.ModelProto()
    faulty.CopyFrom(model)
    tensor = next(tensor for tensor in faulty.graph.initializer if tensor.name == packed_name)
    packed = numpy_helper.to_array(tensor).copy()
    flip_stream_bits(packed, [stream_bit])
    tensor.CopyFrom(numpy_helper.from_array(packed, packed_name))
    return faulty


@pytest.mark.parametrize(("fmt", "width"), [("fp32", 64), ("bf16", 32), ("fp16", 512)])
def test_plain_onnxruntime_runs_protected_model_and_masks_a_flip(fmt: str, width: int, tmp_path: Path) -> None:
    weights = cnn_weights()
    protected = protected_cnn(weights, fmt, width)
    bad_word = 3
    faulty = flip_stored_bit(protected, "conv.w::op_packed", bad_word * width + 5)
    paths = []
    for label, model in (("protected", protected), ("faulty", faulty)):
        paths.append(tmp_path / f"{label}.onnx")
        onnx.save_model(model, paths[-1])
    x = np.random.default_rng(32).standard_normal(INPUT_SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # -I: isolated mode, so neither PYTHONPATH nor the working folder can supply oppass.
    command = [sys.executable, "-I", "-c", PLAIN_RUNNER, str(tmp_path / "x.npy"), *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["oppass_modules"] == []
    clean, masked_run = report["results"]

    adjusted = adjusted_weights(weights, fmt, width)
    zeroed = {name: value.copy() for name, value in adjusted.items()}
    per_word = width // codec.FORMATS[fmt].bits
    zeroed["conv.w"].reshape(-1)[bad_word * per_word:(bad_word + 1) * per_word] = 0
    for outcome, reference_weights, masked in ((clean, adjusted, 0), (masked_run, zeroed, 1)):
        reference = ort.InferenceSession(small_cnn(reference_weights).SerializeToString(),
                                         providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(np.array(outcome["y"], dtype=np.float32), reference.run(None, {"x": x})[0])
        assert outcome["masked"] == masked
    assert clean["y"] != masked_run["y"]


@pytest.mark.parametrize("report_faults", [False, True], ids=["weights-only", "with-masked-count"])
def test_onnxruntime_folds_the_whole_decode_at_session_creation(report_faults: bool, tmp_path: Path) -> None:
    """No decode node survives optimization: the weights (and the count) become initializers."""
    protected = protected_cnn(cnn_weights(), "fp16", 64, report_faults)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(protected.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    op_types = sorted(node.op_type for node in optimized.graph.node)
    assert not [node.name for node in optimized.graph.node if "::op_" in node.name], op_types
    initializers = {tensor.name for tensor in optimized.graph.initializer}
    assert not [name for name in initializers if name.endswith("::op_packed")]
    if report_faults:
        assert MASKED_TOTAL in initializers
