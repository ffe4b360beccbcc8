"""The pass (oppass.protect), the protected-model tools (oppass.protected_models), model I/O (oppass.modelio)
and the fault primitives (oppass.faults).

Reference outputs come from the ORIGINAL model with the OP-adjusted weights (from the
codec) substituted. Both sessions run without graph optimizations and without weight
prepacking: with prepacking onnxruntime picks a different Conv/Gemm kernel for constant
weights than for computed ones, which changes float rounding (by ~1e-5 here), not the
weights. `test_load_check_folds_to_the_reference_with_default_options` covers the
default-options path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ALL_MODEL_FIXTURES, INPUT_SHAPE, cnn, make_model, model_ops, weights
from onnx import TensorProto, helper, numpy_helper
from references import adjusted_reference, initializer, plain_options

from oppass import codec, faults, formats, modelio, protect, protected_models, runtime, schema
from oppass.errors import OppassError

CNN_WEIGHTS = ("conv1.w", "conv2.w", "fc1.w", "fc2.w")
# Output-channel axis of each CNN weight (Gemm fc2 has transB = 0).
CNN_AXES = {"conv1.w": 0, "conv2.w": 0, "fc1.w": 0, "fc2.w": 1}


# ----------------------------------------------------------------------------- helpers


def feeds_for(model: onnx.ModelProto, batch: int = 2, cond: bool = True) -> dict[str, np.ndarray]:
    x_type = model.graph.input[0].type.tensor_type.elem_type
    shape = [batch, *INPUT_SHAPE[1:]]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape).astype(np.uint8) if x_type == TensorProto.UINT8 \
        else rng.standard_normal(shape).astype(np.float32)
    feeds = {"x": x}
    if any(value.name == "cond" for value in model.graph.input):
        feeds["cond"] = np.array(cond)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, protected: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), plain_options(protected))
    names = [output.name for output in model.graph.output]
    return session.run(names, feeds)


def decode_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == schema.DOMAIN]


def io_signature(model: onnx.ModelProto) -> list[tuple[str, bytes]]:
    values = list(model.graph.input) + list(model.graph.output)
    return [(value.name, value.type.SerializeToString()) for value in values]


# ----------------------------------------------------------------------------- every fixture model


@pytest.mark.parametrize("fixture_name", ALL_MODEL_FIXTURES)
def test_output_passes_full_check_and_keeps_graph_io(fixture_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protected = protect.transform(model, ops=model_ops(fixture_name))
    onnx.checker.check_model(protected, full_check=True)
    assert io_signature(protected) == io_signature(model)
    assert decode_nodes(protected)
    assert any(entry.domain == schema.DOMAIN and entry.version == 1 for entry in protected.opset_import)


@pytest.mark.parametrize("fixture_name", ALL_MODEL_FIXTURES)
def test_decode_outputs_have_value_info(fixture_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protected = protect.transform(model, ops=model_ops(fixture_name), report_faults=True)
    value_info = {info.name: info.type.tensor_type for info in protected.graph.value_info}
    for node in decode_nodes(protected):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights_info, masked_info = value_info[node.output[0]], value_info[node.output[1]]
        assert weights_info.elem_type == attributes["output_type"]
        assert [dim.dim_value for dim in weights_info.shape.dim] == attributes["shape"]
        assert masked_info.elem_type == TensorProto.INT64 and not masked_info.shape.dim


def test_input_model_is_not_modified(cnn_model: onnx.ModelProto) -> None:
    before = cnn_model.SerializeToString()
    protect.transform(cnn_model, format="int8", report_faults=True)
    assert cnn_model.SerializeToString() == before


# ----------------------------------------------------------------------------- bit-exact outputs


@pytest.mark.parametrize("fmt", ["keep", "fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("word", ["weight", "32", "64", "512"])
@pytest.mark.parametrize("flip", formats.FLIP_STRATEGIES)
def test_fault_free_output_equals_original_with_adjusted_weights(
    cnn_model: onnx.ModelProto, custom_op_library: str, fmt: str, word: str, flip: str
) -> None:
    protected = protect.transform(cnn_model, format=fmt, word=word, flip=flip)
    reference = adjusted_reference(cnn_model, CNN_WEIGHTS, fmt, word, flip, CNN_AXES)
    feeds = feeds_for(cnn_model)
    expected_outputs = run(reference, feeds, protected=False)
    for expected, actual in zip(expected_outputs, run(protected, feeds, protected=True), strict=True):
        assert expected.tobytes() == actual.tobytes()


@pytest.mark.parametrize("fixture_name, names", [
    ("shared_weight_model", ("shared.w",)),
    ("constant_node_model", ("const.w",)),
    ("qdq_model", ("q.w",)),
    ("conv_integer_model", ("ci.w",)),
    ("if_model", ("outer.w", "inner.w")),
])
@pytest.mark.parametrize("check", schema.CHECK_MODES[:3])
def test_special_models_match_their_adjusted_reference(
    fixture_name: str, names: tuple[str, ...], check: str, custom_op_library: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(fixture_name)
    protected = protect.transform(model, ops=model_ops(fixture_name), word="32", check=check)
    if fixture_name == "constant_node_model":
        reference = adjusted_constant_reference(model)
    else:
        reference = adjusted_reference(model, names, "keep", "32", "word-lsb")
    for cond in (True, False):
        feeds = feeds_for(model, cond=cond)
        assert run(protected, feeds, protected=True)[0].tobytes() == run(reference, feeds, protected=False)[0].tobytes()


def adjusted_constant_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    attribute = copy.graph.node[0].attribute[0]
    adjusted = codec.encode(numpy_helper.to_array(attribute.t), 32).adjusted
    attribute.t.CopyFrom(numpy_helper.from_array(adjusted, attribute.t.name))
    return copy


@pytest.mark.parametrize("check", ["load", "load-custom"])
def test_load_check_folds_to_the_reference_with_default_options(
    check: str, cnn_model: onnx.ModelProto, custom_op_library: str
) -> None:
    protected = protect.transform(cnn_model, check=check)
    reference = adjusted_reference(cnn_model, CNN_WEIGHTS, "keep", "64", "word-lsb")
    feeds = feeds_for(cnn_model)
    expected = ort.InferenceSession(reference.SerializeToString()).run(None, feeds)[0]
    assert runtime.load_session(protected).run(None, feeds)[0].tobytes() == expected.tobytes()


def test_decoded_weights_are_the_adjusted_weights(cnn_model: onnx.ModelProto, custom_op_library: str) -> None:
    protected = protect.transform(cnn_model, format="bf16", word="128", flip="min-error")
    protected.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in CNN_WEIGHTS)
    decoded = run(protected, feeds_for(cnn_model), protected=True)[1:]
    for name, values in zip(CNN_WEIGHTS, decoded, strict=True):
        stored, _ = codec.to_format(initializer(cnn_model, name), "bf16")
        assert np.array_equal(values, codec.encode(stored, 128, "min-error").adjusted.astype(np.float32))


# ----------------------------------------------------------------------------- special cases


def test_shared_weight_gets_one_packed_tensor_and_one_decode(shared_weight_model: onnx.ModelProto) -> None:
    protected = protect.transform(shared_weight_model)
    (decode,) = decode_nodes(protected)
    assert decode.output[0] == "shared.w"
    assert [t.name for t in protected.graph.initializer] == ["shared.w::op_packed"]
    assert [node.input[1] for node in protected.graph.node if node.op_type == "Conv"] == ["shared.w", "shared.w"]


def test_constant_node_is_replaced_by_the_decode(constant_node_model: onnx.ModelProto) -> None:
    protected = protect.transform(constant_node_model)
    assert [node.op_type for node in protected.graph.node] == ["ParityCheckUnpack", "Conv"]
    assert protected.graph.node[0].output[0] == "const.w"


def test_qdq_weight_is_protected_as_int8_and_dequantize_stays(qdq_model: onnx.ModelProto) -> None:
    protected = protect.transform(qdq_model)
    (tensor,) = protected_models.inspect(protected)
    assert (tensor.name, tensor.format, tensor.output_type) == ("q.w", "int8", "INT8")
    assert [node.op_type for node in protected.graph.node] == ["ParityCheckUnpack", "DequantizeLinear", "Conv"]
    assert {t.name for t in protected.graph.initializer} == {"q.w::op_packed", "q.scale", "q.zero"}


def test_qdq_weight_with_an_explicit_float_format_is_an_error(qdq_model: onnx.ModelProto) -> None:
    with pytest.raises(OppassError, match="'q.w'.*INT8.*bf16"):
        protect.transform(qdq_model, format="bf16")


def test_conv_integer_weights_keep_uint8(conv_integer_model: onnx.ModelProto) -> None:
    (tensor,) = protected_models.inspect(protect.transform(conv_integer_model, ops=["ConvInteger"], word="weight"))
    assert (tensor.format, tensor.word_bits, tensor.packed_dtype) == ("uint8", 8, "uint8")


def test_subgraph_weights_are_decoded_in_the_main_graph(if_model: onnx.ModelProto) -> None:
    protected = protect.transform(if_model)
    assert {node.output[0] for node in decode_nodes(protected)} == {"outer.w", "inner.w"}
    else_branch = next(a.g for a in protected.graph.node[-1].attribute if a.name == "else_branch")
    assert not else_branch.initializer
    assert [node.input[1] for node in else_branch.node] == ["inner.w"]


def test_initializer_that_is_a_graph_input_is_skipped_with_a_warning(
    input_initializer_model: onnx.ModelProto,
) -> None:
    with pytest.warns(UserWarning, match="'user.w'.*graph input"):
        protected = protect.transform(input_initializer_model)
    assert [tensor.name for tensor in protected_models.inspect(protected)] == ["fixed.w"]
    assert "user.w" in {t.name for t in protected.graph.initializer}


def test_weight_without_a_format_is_skipped_under_keep_and_an_error_when_explicit() -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w64"], ["y"])], {"w64": np.ones([6, 2])},
                       output_shape=["batch", 3, 6, 2], element_type=TensorProto.DOUBLE)
    with pytest.warns(UserWarning, match="'w64'.*DOUBLE"), pytest.warns(UserWarning, match="written unprotected"):
        protected = protect.transform(model, ops=["MatMul"], allow_unprotected=True)
    assert not decode_nodes(protected)
    with pytest.raises(OppassError, match="'w64'.*DOUBLE.*fp16"):
        protect.transform(model, ops=["MatMul"], format="fp16")


def test_zero_size_weights_are_skipped() -> None:
    model = make_model([helper.make_node("MatMul", ["x", "empty.w"], ["y"])], {"empty.w": np.zeros([6, 0], np.float32)},
                       output_shape=["batch", 3, 6, 0])
    with pytest.warns(UserWarning, match="weight of MatMul was found"):
        assert not decode_nodes(protect.transform(model, ops=["MatMul"], allow_unprotected=True))


def test_int8_inserts_per_channel_dequantize_on_the_output_axis(cnn_model: onnx.ModelProto) -> None:
    protected = protect.transform(cnn_model, format="int8")
    dequantize = {node.output[0]: node for node in protected.graph.node if node.op_type == "DequantizeLinear"}
    assert set(dequantize) == set(CNN_WEIGHTS)
    for name, axis in CNN_AXES.items():
        node = dequantize[name]
        assert node.input[0] == f"{name}::op_int8"
        assert helper.get_attribute_value(node.attribute[0]) == axis
        _, scales = codec.to_format(initializer(cnn_model, name), "int8", axis=axis)
        assert np.array_equal(initializer(protected, node.input[1]), scales)
        assert not initializer(protected, node.input[2]).any()


def test_int8_needs_opset_13() -> None:
    with pytest.raises(OppassError, match="opset >= 13"):
        protect.transform(cnn(opset=12), format="int8")


def test_already_protected_model_is_rejected(cnn_model: onnx.ModelProto) -> None:
    with pytest.raises(OppassError, match="already protected"):
        protect.transform(protect.transform(cnn_model))


@pytest.mark.parametrize("keyword, value", [
    ("format", "int4"), ("word", "48"), ("word", "8"), ("flip", "random"), ("check", "never"), ("ops", ["Relu"]),
])
def test_bad_options_are_one_line_errors(cnn_model: onnx.ModelProto, keyword: str, value: object) -> None:
    with pytest.raises(OppassError) as raised:
        protect.transform(cnn_model, **{keyword: value})
    assert "\n" not in str(raised.value)


def test_more_op_types_through_ops() -> None:
    nodes = [helper.make_node("MatMul", ["x", "mm.w"], ["m"]),
             helper.make_node("ConvTranspose", ["m", "ct.w"], ["y"])]
    model = make_model(nodes, {"mm.w": weights([6, 5], 15), "ct.w": weights([3, 2, 2, 2], 16)},
                       output_shape=["batch", 2, 7, 6])
    with pytest.raises(OppassError, match="no weight of Conv, Gemm was found to protect"):
        protect.transform(model)
    tensors = protected_models.inspect(protect.transform(model, ops=["MatMul", "ConvTranspose"]))
    assert [tensor.name for tensor in tensors] == ["mm.w", "ct.w"]


# ----------------------------------------------------------------------------- check modes, report, faults


def test_check_none_packs_without_adjustment(cnn_model: onnx.ModelProto) -> None:
    protected, report = protect.transform_with_report(cnn_model, word="weight", check="none")
    assert report.changed_words == 0 and report.max_weight_change == 0.0
    stripped = protected_models.strip(protected)
    for name in CNN_WEIGHTS:
        assert initializer(stripped, name).tobytes() == initializer(cnn_model, name).tobytes()


def test_report_counts_match_the_codec(cnn_model: onnx.ModelProto) -> None:
    _, report = protect.transform_with_report(cnn_model, format="fp16", word="256", flip="largest")
    assert [tensor.name for tensor in report.tensors] == list(CNN_WEIGHTS)
    for tensor in report.tensors:
        original = initializer(cnn_model, tensor.name)
        stored, _ = codec.to_format(original, "fp16")
        encoded = codec.encode(stored, 256, "largest")
        assert tensor.changed_words == encoded.changed_words
        assert tensor.bytes_before == original.nbytes and tensor.bytes_after == encoded.packed.nbytes
        changed = stored != encoded.adjusted
        relative = np.abs(encoded.adjusted[changed].astype(np.float64) - stored[changed]) / np.abs(stored[changed])
        assert tensor.max_weight_change == pytest.approx(relative.max(), rel=1e-6)
        assert tensor.subnormals_before == codec.subnormal_count(original)
        assert tensor.subnormals_after == 0 == codec.subnormal_count(encoded.adjusted, np.float32)  # fp16 read as fp32
        assert tensor.nonfinite_weights == 0
        error = np.abs(stored.astype(np.float64) - original).max() / np.abs(original).max()
        assert tensor.max_conversion_error == error
    assert report.changed_words == sum(tensor.changed_words for tensor in report.tensors)


def test_report_faults_counts_masked_words(cnn_model: onnx.ModelProto, custom_op_library: str) -> None:
    protected = protect.transform(cnn_model, report_faults=True)
    assert protected.graph.output[-1].name == schema.MASKED_WORDS_OUTPUT
    feeds = feeds_for(cnn_model)
    assert run(protected, feeds, protected=True)[-1] == 0
    faulty, flips = protected_models.inject(protected, 0.01, seed=4)
    odd = sum(int(codec.odd_words(initializer(faulty, node.input[0])).sum()) for node in decode_nodes(faulty))
    assert flips > 0 and odd > 0
    masked = run(faulty, feeds, protected=True)[-1]
    assert masked.dtype == np.int64 and masked.shape == () and masked == odd


def test_inject_flips_exactly_the_drawn_positions_reproducibly(cnn_model: onnx.ModelProto) -> None:
    protected = protect.transform(cnn_model, word="128")
    first, flips = protected_models.inject(protected, 0.003, seed=11)
    again, flips_again = protected_models.inject(protected, 0.003, seed=11)
    other, _ = protected_models.inject(protected, 0.003, seed=12)
    names = [node.input[0] for node in decode_nodes(protected)]

    def stream(model: onnx.ModelProto) -> np.ndarray:
        return np.concatenate([initializer(model, name).view(np.uint8).reshape(-1) for name in names])

    changed = np.flatnonzero(np.unpackbits(stream(protected) ^ stream(first), bitorder="little"))
    expected = faults.draw_flip_positions(np.random.default_rng(11), stream(protected).size * 8, 0.003)
    assert flips == flips_again == changed.size > 0
    assert np.array_equal(changed, expected)
    assert stream(first).tobytes() == stream(again).tobytes() != stream(other).tobytes()


def test_inject_into_an_unprotected_model_is_an_error(cnn_model: onnx.ModelProto) -> None:
    with pytest.raises(OppassError, match="not protected"):
        protected_models.inject(cnn_model, 0.1, seed=0)


@pytest.mark.parametrize("fmt", ["keep", "bf16", "int8"])
def test_strip_round_trips(cnn_model: onnx.ModelProto, fmt: str, custom_op_library: str) -> None:
    protected = protect.transform(cnn_model, format=fmt, word="32", report_faults=True)
    stripped = protected_models.strip(protected)
    onnx.checker.check_model(stripped, full_check=True)
    assert io_signature(stripped) == io_signature(cnn_model)
    assert not decode_nodes(stripped)
    assert all(entry.domain != schema.DOMAIN for entry in stripped.opset_import)
    feeds = feeds_for(cnn_model)
    assert run(stripped, feeds, protected=False)[0].tobytes() == run(protected, feeds, protected=True)[0].tobytes()


def test_strip_of_a_plain_model_is_an_error(cnn_model: onnx.ModelProto) -> None:
    with pytest.raises(OppassError, match="not protected"):
        protected_models.strip(cnn_model)


def test_inspect_describes_each_packed_tensor(cnn_model: onnx.ModelProto) -> None:
    tensors = protected_models.inspect(protect.transform(cnn_model, format="fp16", word="256", check="load"))
    conv1 = tensors[0]
    assert (conv1.name, conv1.format, conv1.word_bits, conv1.shape) == ("conv1.w", "fp16", 256, (4, 3, 3, 3))
    assert (conv1.check, conv1.output_type, conv1.packed_dtype) == ("load", "FLOAT", "uint64")
    assert conv1.packed_shape == codec.packed_shape(4 * 3 * 3 * 3, "fp16", 256)


# ----------------------------------------------------------------------------- fault primitives


def test_draw_flip_positions_are_sorted_distinct_and_in_range() -> None:
    positions = faults.draw_flip_positions(np.random.default_rng(1), 10_000, 0.05)
    assert positions.dtype == np.int64 and 0 < positions.size < 10_000
    assert np.all(np.diff(positions) > 0) and positions[0] >= 0 and positions[-1] < 10_000
    assert faults.draw_flip_positions(np.random.default_rng(1), 64, 0.0).size == 0
    assert np.array_equal(faults.draw_flip_positions(np.random.default_rng(1), 64, 1.0), np.arange(64))


def test_flip_bits_follows_the_little_endian_stream() -> None:
    buffers = [np.zeros(3, np.uint16), np.zeros((2, 1), np.uint64), np.zeros(1, np.uint8)]
    positions = np.array([0, 1, 17, 48, 63, 175, 176, 183])
    faults.flip_bits(buffers, positions)
    stream = int.from_bytes(b"".join(buffer.tobytes() for buffer in buffers), "little")
    assert stream == sum(1 << int(p) for p in positions)


@pytest.mark.parametrize("seed", range(20))
def test_flip_bits_inverts_each_position_given_as_often_as_given(seed: int) -> None:
    """Random buffers and positions with repeats (a position given twice is inverted twice) against a bit array."""
    rng = np.random.default_rng(seed)
    buffers = [rng.integers(0, 256, int(size), dtype=np.uint8) for size in rng.integers(0, 40, size=4)]
    if not any(buffer.size for buffer in buffers):
        buffers.append(np.zeros(1, np.uint8))
    bits = np.unpackbits(np.concatenate(buffers), bitorder="little")
    positions = rng.integers(0, bits.size, size=int(rng.integers(0, 80)))
    np.bitwise_xor.at(bits, positions, 1)
    faults.flip_bits(buffers, positions)
    assert np.array_equal(np.concatenate(buffers), np.packbits(bits, bitorder="little"))


@pytest.mark.parametrize("ber", [-0.1, 1.5])
def test_bad_bit_error_rate_is_an_error(ber: float) -> None:
    with pytest.raises(OppassError, match="bit error rate"):
        faults.draw_flip_positions(np.random.default_rng(0), 8, ber)


def test_flip_bits_rejects_positions_outside_the_stream() -> None:
    with pytest.raises(OppassError, match="bit positions"):
        faults.flip_bits([np.zeros(1, np.uint8)], np.array([8]))


# ----------------------------------------------------------------------------- model files


def test_external_data_is_read_and_written_back_as_external(
    external_data_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 256)
    source = modelio.read_model(external_data_model)
    assert source.data_files == (tmp_path / "cnn.onnx.data",)
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()
    modelio.save_model(protect.transform(external_data_model), output, source=source)
    assert (output.parent / "protected.onnx.data").stat().st_size > 0
    reread = modelio.read_model(output)
    assert reread.data_files == (output.parent / "protected.onnx.data",)
    assert [t.name for t in protected_models.inspect(reread.model)] == list(CNN_WEIGHTS)
    assert sorted(p.name for p in output.parent.iterdir()) == ["protected.onnx", "protected.onnx.data"]


def test_large_models_are_saved_with_external_data(
    cnn_model: onnx.ModelProto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 256)
    modelio.save_model(cnn_model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").stat().st_size < 1000 < (tmp_path / "big.onnx.data").stat().st_size
    assert modelio.load_model(tmp_path / "big.onnx").SerializeToString() == cnn_model.SerializeToString()


@pytest.mark.parametrize("location, message", [  # onnx's checks, see tests/test_hostile_models.py for more
    ("../escape.data", "points outside the directory"),
    ("/etc/passwd", "it is an absolute path"),
    ("missing.data", "it is not regular file"),
])
def test_unsafe_or_missing_external_data_is_an_error(external_data_model: Path, location: str, message: str) -> None:
    model = onnx.load_model(external_data_model, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    (external_data_model.parent.parent / "escape.data").write_bytes(b"\0" * 4096)
    onnx.save_model(model, external_data_model)
    with pytest.raises(OppassError, match=message):
        modelio.read_model(external_data_model)


def test_truncated_external_data_is_an_error(external_data_model: Path) -> None:
    data = external_data_model.parent / "cnn.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OppassError, match="too short"):
        modelio.read_model(external_data_model)


@pytest.mark.parametrize("payload", [b"", b"not a model at all", None])
def test_unreadable_model_files_are_one_line_errors(cnn_model: onnx.ModelProto, tmp_path: Path, payload) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(cnn_model.SerializeToString()[:200] if payload is None else payload)
    with pytest.raises(OppassError, match="not a valid ONNX model") as raised:
        modelio.read_model(path)
    assert "\n" not in str(raised.value)


def test_saving_over_the_input_is_refused(external_data_model: Path) -> None:
    source = modelio.read_model(external_data_model)
    before = external_data_model.read_bytes()
    for target in (external_data_model, external_data_model.parent / "cnn.onnx"):
        with pytest.raises(OppassError, match="overwrite the input"):
            modelio.save_model(source.model, target, source=source)
    assert external_data_model.read_bytes() == before


def test_external_data_input_with_only_small_tensors_writes_no_data_file(
    external_data_model: Path, tmp_path: Path
) -> None:
    source = modelio.read_model(external_data_model)
    output = tmp_path / "small.onnx"
    modelio.save_model(source.model, output, source=source)
    assert not (tmp_path / "small.onnx.data").exists()
    assert modelio.load_model(output).SerializeToString() == source.model.SerializeToString()


# ----------------------------------------------------------------------------- one tensor at a time


def protected_quietly(model: onnx.ModelProto | Path | modelio.ModelFile, **options: object) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return protect.transform(model, **options)


@pytest.mark.parametrize("fixture_name", ALL_MODEL_FIXTURES)
def test_saved_files_hold_the_bytes_protobuf_would_write(
    fixture_name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 0)  # stream every initializer's raw data
    model = request.getfixturevalue(fixture_name)
    for proto in (model, protected_quietly(model, ops=model_ops(fixture_name))):
        modelio.save_model(proto, tmp_path / "model.onnx")
        assert (tmp_path / "model.onnx").read_bytes() == proto.SerializeToString()


@pytest.mark.parametrize("fixture_name", ALL_MODEL_FIXTURES)
def test_reading_tensors_one_at_a_time_gives_the_model_onnx_reads(
    fixture_name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    path = tmp_path / "model.onnx"
    onnx.save_model(request.getfixturevalue(fixture_name), path)
    assert modelio.load_model(path).SerializeToString() == onnx.load_model(path).SerializeToString()
    source = modelio.read_model(path, defer=True)
    deferred = [t for t in source.model.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert len(deferred) == sum(1 for t in onnx.load_model(path).graph.initializer if t.raw_data)
    assert source.data_files == ()
    for tensor in deferred:
        assert source.tensor_bytes(tensor) == initializer(onnx.load_model(path), tensor.name).tobytes()


@pytest.mark.parametrize("fixture_name", ALL_MODEL_FIXTURES)
def test_protecting_a_file_in_place_writes_what_protecting_the_proto_gives(
    fixture_name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 0)
    model = request.getfixturevalue(fixture_name)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    expected = protected_quietly(model, ops=model_ops(fixture_name), report_faults=True).SerializeToString()
    source = modelio.read_model(path, defer=True)
    protected = protected_quietly(source, ops=model_ops(fixture_name), report_faults=True)
    assert protected is source.model
    modelio.save_model(protected, tmp_path / "out.onnx", source=source)
    assert (tmp_path / "out.onnx").read_bytes() == expected
    from_path = protected_quietly(path, ops=model_ops(fixture_name), report_faults=True)  # a path: the whole model
    assert from_path.SerializeToString() == expected


def test_inplace_protects_the_given_proto(cnn_model: onnx.ModelProto) -> None:
    expected = protect.transform(cnn_model, format="int8").SerializeToString()
    protected = protect.transform(cnn_model, format="int8", inplace=True)
    assert protected is cnn_model
    assert cnn_model.SerializeToString() == expected


def test_a_deferred_external_data_model_is_copied_from_its_data_file(
    external_data_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 256)
    expected = protect.transform(modelio.load_model(external_data_model)).SerializeToString()
    source = modelio.read_model(external_data_model, defer=True)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in source.model.graph.initializer)
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()
    modelio.save_model(protect.transform(source), output, source=source)
    assert (output.parent / "protected.onnx.data").stat().st_size > 0
    assert modelio.load_model(output).SerializeToString() == expected


def test_an_input_changed_before_the_save_is_an_error_that_writes_nothing(
    cnn_model: onnx.ModelProto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    path = tmp_path / "model.onnx"
    onnx.save_model(cnn_model, path)
    source = modelio.read_model(path, defer=True)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OppassError, match="changed while read"):
        modelio.save_model(source.model, tmp_path / "out.onnx", source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_fields_unknown_to_onnx_are_saved(
    cnn_model: onnx.ModelProto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 0)
    model = onnx.ModelProto()
    model.CopyFrom(cnn_model)
    model.MergeFromString(b"\xa0\x06\x05")  # field 100, varint 5
    model.graph.MergeFromString(b"\xa2\x06\x03abc")  # field 100, 3 bytes
    model.graph.initializer[0].MergeFromString(b"\xa5\x06\x01\x02\x03\x04")  # field 100, fixed32
    modelio.save_model(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == model.SerializeToString()


def test_a_deferred_model_saved_without_its_source_is_an_error(
    cnn_model: onnx.ModelProto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    onnx.save_model(cnn_model, tmp_path / "model.onnx")
    source = modelio.read_model(tmp_path / "model.onnx", defer=True)
    with pytest.raises(OppassError, match="deferred tensors"):
        modelio.save_model(source.model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_lazy_copy_reads_the_original_until_loaded(cnn_model: onnx.ModelProto, tmp_path: Path) -> None:
    copy = modelio.lazy_copy(cnn_model)
    first = copy.model.graph.initializer[0]
    assert not first.HasField("raw_data")
    assert copy.tensor_bytes(first) == cnn_model.graph.initializer[0].raw_data
    with pytest.raises(OppassError, match="deferred tensors"):
        modelio.save_model(copy.model, tmp_path / "out.onnx")
    assert copy.load_deferred().SerializeToString() == cnn_model.SerializeToString()


@pytest.mark.parametrize("location, message", [
    ("\0original model", "invalid location"),  # the LazyCopy marker: no file can claim it
    ("\0model file", "invalid location"),  # the marker of deferred tensors before they became standard
    ("", "should not be empty"),
])
def test_external_data_with_an_internal_marker_location_is_refused(
    external_data_model: Path, location: str, message: str
) -> None:
    model = onnx.load_model(external_data_model, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, external_data_model)
    with pytest.raises(OppassError, match=message):
        modelio.read_model(external_data_model)
