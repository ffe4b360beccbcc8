"""`--code secded` and `--range-check` in the pass, the protected-model tools and the command line; the tests
taking `custom_op_library` run the models through the C kernel and compare with the codec and code_vectors.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from references import adjusted_reference, initializer, plain_options, with_weights

from oppass import cli, codec, faults, formats, protect, protected_models, runtime, schema
from oppass.errors import OppassError

CODE_VECTORS = [case for case in json.loads((Path(__file__).parent / "vectors" / "code_vectors.json").read_text())
                if "error" not in case]

CNN_WEIGHTS = ("conv1.w", "conv2.w", "fc1.w", "fc2.w")
CNN_AXES = {"conv1.w": 0, "conv2.w": 0, "fc1.w": 0, "fc2.w": 1}


def decode_of(model: onnx.ModelProto, weight: str) -> schema.DecodeNode:
    return next(decode for decode in schema.read_decode_nodes(model) if decode.output.split("::")[0] == weight)


def stored_weights(model: onnx.ModelProto, name: str, fmt: str) -> np.ndarray:
    original = initializer(model, name)
    target = codec.format_of(original.dtype) if fmt == "keep" else fmt
    return codec.to_format(original, target, name=name, axis=CNN_AXES[name])[0]


@pytest.mark.parametrize("fmt", ["keep", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("range_check", [False, True])
def test_secded_stores_the_codec_encoding_and_reports_its_rounding(
    cnn_model: onnx.ModelProto, fmt: str, range_check: bool
) -> None:
    protected, report = protect.transform_with_report(cnn_model, format=fmt, word="64", code="secded",
                                                      range_check=range_check)
    onnx.checker.check_model(protected)
    for tensor in report.tensors:
        stored = stored_weights(cnn_model, tensor.name, fmt)
        encoded = codec.encode(stored, 64, code="secded")
        decode = decode_of(protected, tensor.name)
        packed = initializer(protected, decode.packed)
        assert (decode.code, tensor.code) == ("secded", "secded")
        np.testing.assert_array_equal(packed, encoded.packed)
        assert tensor.changed_words == encoded.changed_words > 0
        changed = stored != encoded.adjusted
        relative = np.abs(encoded.adjusted[changed].astype(np.float64) - stored[changed]) / np.abs(stored[changed])
        assert tensor.max_weight_change == pytest.approx(relative.max(), rel=1e-6)
        expected_range = codec.max_magnitude(encoded.adjusted) if range_check else None
        assert decode.range_max == tensor.range_max == expected_range
    assert report.range_checked == (len(CNN_WEIGHTS) if range_check else 0)


@pytest.mark.parametrize("check", schema.CHECK_MODES)
def test_parity_range_check_stores_the_maximum_after_the_parity_adjustment(
    cnn_model: onnx.ModelProto, check: str
) -> None:
    protected = protect.transform(cnn_model, word="32", range_check=True, check=check)
    for name in CNN_WEIGHTS:
        stored = stored_weights(cnn_model, name, "keep")
        decoded = codec.encode(stored, 32).adjusted if check != "none" else stored
        decode = decode_of(protected, name)
        assert decode.code == "parity" and decode.range_max == codec.max_magnitude(decoded)
        assert "code" not in {a.name for a in next(n for n in protected.graph.node if n.name == decode.name).attribute}


def test_a_tensor_holding_a_nan_gets_no_range_check(cnn_model: onnx.ModelProto) -> None:
    weights = initializer(cnn_model, "conv2.w").copy()
    weights.reshape(-1)[5] = np.nan
    model = with_weights(cnn_model, {"conv2.w": weights})
    protected, report = protect.transform_with_report(model, code="secded", range_check=True)
    assert decode_of(protected, "conv2.w").range_max is None
    assert [tensor.range_max is None for tensor in report.tensors] == [False, True, False, False]
    assert report.range_checked == 3


def test_check_none_with_secded_keeps_the_encoding(cnn_model: onnx.ModelProto) -> None:
    protected = protect.transform(cnn_model, code="secded", check="none")
    stored = stored_weights(cnn_model, "fc1.w", "keep")
    np.testing.assert_array_equal(initializer(protected, "fc1.w::op_packed"),
                                  codec.encode(stored, 64, code="secded").packed)


def test_report_faults_with_secded_adds_the_corrected_words_output(cnn_model: onnx.ModelProto) -> None:
    protected = protect.transform(cnn_model, code="secded", report_faults=True)
    onnx.checker.check_model(protected, full_check=True)
    assert [output.name for output in protected.graph.output][-2:] == [schema.MASKED_WORDS_OUTPUT,
                                                                      schema.CORRECTED_WORDS_OUTPUT]
    for decode in schema.read_decode_nodes(protected):
        assert (decode.masked_output, decode.corrected_output) == (f"{decode.output}::op_masked",
                                                                   f"{decode.output}::op_corrected")
    sums = [node for node in protected.graph.node if node.name.startswith(schema.CORRECTED_WORDS_SUM)]
    assert [node.op_type for node in sums] == ["Add"] * 3 and sums[-1].output[0] == schema.CORRECTED_WORDS_OUTPUT
    parity = protect.transform(cnn_model, report_faults=True)
    assert schema.CORRECTED_WORDS_OUTPUT not in {output.name for output in parity.graph.output}


@pytest.mark.parametrize("fmt", ["keep", "bf16", "int8"])
def test_strip_of_a_secded_model_gives_the_rounded_weights(cnn_model: onnx.ModelProto, fmt: str) -> None:
    protected = protect.transform(cnn_model, format=fmt, code="secded", range_check=True, report_faults=True)
    stripped = protected_models.strip(protected)
    onnx.checker.check_model(stripped, full_check=True)
    assert [output.name for output in stripped.graph.output] == [output.name for output in cnn_model.graph.output]
    assert not any(node.name.startswith(schema.CORRECTED_WORDS_SUM) for node in stripped.graph.node)
    for name in CNN_WEIGHTS:
        rounded = codec.encode(stored_weights(cnn_model, name, fmt), 64, code="secded").adjusted
        decoded_name = name if fmt != "int8" else f"{name}::op_int8"
        np.testing.assert_array_equal(initializer(stripped, decoded_name), rounded.astype(
            initializer(stripped, decoded_name).dtype))


def test_inspect_shows_the_code_and_the_range(cnn_model: onnx.ModelProto) -> None:
    tensors = protected_models.inspect(protect.transform(cnn_model, format="fp16", code="secded", range_check=True))
    assert {tensor.code for tensor in tensors} == {"secded"}
    assert all(tensor.range_max is not None and tensor.range_max > 0 for tensor in tensors)
    plain = protected_models.inspect(protect.transform(cnn_model))
    assert {(tensor.code, tensor.range_max) for tensor in plain} == {("parity", None)}


def test_inject_into_a_secded_model_is_corrected_by_the_decode(cnn_model: onnx.ModelProto) -> None:
    """Faults injected at a low rate: words with one flip decode bit for bit, words with two are zeroed."""
    protected = protect.transform(cnn_model, code="secded", word="128")
    faulty, flips = protected_models.inject(protected, 2e-3, seed=3)
    corrected = masked = 0
    for decode in schema.read_decode_nodes(faulty):
        clean, dirty = initializer(protected, decode.packed), initializer(faulty, decode.packed)
        flips_per_word = np.unpackbits((clean ^ dirty).view(np.uint8).reshape(clean.shape[0], -1), axis=1).sum(1)
        result = codec.decode(dirty, decode.format, decode.word_bits, decode.shape, code="secded")
        expected = codec.decode(clean, decode.format, decode.word_bits, decode.shape, code="secded").weights
        per_word = decode.word_bits // formats.FORMATS[decode.format].bits
        words = np.repeat(flips_per_word, per_word)[: expected.size].reshape(expected.shape)
        assert result.corrected_words == np.count_nonzero(flips_per_word % 2 == 1)
        np.testing.assert_array_equal(result.weights[words <= 1], expected[words <= 1])
        assert not result.weights[words == 2].any()
        corrected, masked = corrected + result.corrected_words, masked + result.masked_words
    assert flips > 0 and corrected > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"code": "secded", "flip": "largest"}, "a flip strategy applies to code parity only"),
    ({"code": "hamming"}, "unknown code 'hamming'"),
    ({"code": "secded", "format": "bf16", "word": "weight"}, "secded does not fit bf16 in 16-bit words"),
    ({"code": "secded", "format": "int8", "word": "weight"}, "it fits int8 in 16, 32, 64, 128, 256 or 512-bit words"),
])
def test_bad_code_options_are_one_line_errors(cnn_model: onnx.ModelProto, options: dict, message: str) -> None:
    with pytest.raises(OppassError, match=message) as error:
        protect.transform(cnn_model, **options)
    assert "\n" not in str(error.value)


def summary(text: str) -> dict[str, str]:
    rows = [line.split("  ", 1) for line in text.splitlines()]
    return {label.strip(): value.strip() for label, value in rows}


def test_transform_command_takes_code_and_range_check(
    cnn_model: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, output = tmp_path / "model.onnx", tmp_path / "secded.onnx"
    onnx.save_model(cnn_model, source)
    assert cli.main(["transform", str(source), str(output), "--code", "secded", "--range-check", "--format", "bf16",
                     "--no-verify"]) == 0
    table = summary(capsys.readouterr().out)
    _, report = protect.transform_with_report(cnn_model, format="bf16", code="secded", range_check=True)
    assert (table["code"], table["range check"]) == ("secded", "on (4 tensors)")
    assert table["words changed by the encoding"] == f"{report.changed_words:,}"
    assert table["largest relative weight change"] == f"{report.max_weight_change:.3g}"
    assert cli.main(["inspect", str(output)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:5] == ["conv1.w", "bf16", "64", "secded", f"{report.tensors[0].range_max:.9g}"]


def test_transform_command_reports_tensors_left_without_a_range_check(
    cnn_model: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = initializer(cnn_model, "fc2.w").copy()
    weights[0, 0] = np.inf
    source = tmp_path / "model.onnx"
    onnx.save_model(with_weights(cnn_model, {"fc2.w": weights}), source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx"), "--range-check", "--no-verify"]) == 0
    assert summary(capsys.readouterr().out)["range check"] == "on (3 tensors; none for 1 holding NaN or infinity)"


def test_flip_with_secded_on_the_command_line_is_one_line(
    cnn_model: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, output = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save_model(cnn_model, source)
    assert cli.main(["transform", str(source), str(output), "--code", "secded", "--flip", "largest"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "drop --flip largest with --code secded" in error
    assert not output.exists()


def test_the_protected_graph_declares_the_count_outputs_as_int64_scalars(cnn_model: onnx.ModelProto) -> None:
    protected = protect.transform(cnn_model, code="secded", report_faults=True)
    declared = {value.name: value for value in protected.graph.output}
    expected = helper.make_tensor_value_info(schema.CORRECTED_WORDS_OUTPUT, onnx.TensorProto.INT64, [])
    assert declared[schema.CORRECTED_WORDS_OUTPUT] == expected


# ----------------------------------------------------------------------------- through the C kernel


def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}


def run(model: onnx.ModelProto, *, protected: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), plain_options(protected))
    return session.run([output.name for output in model.graph.output], feeds())


def vector_model(case: dict, check: str) -> tuple[onnx.ModelProto, int]:
    """A one-node model decoding the case's packed words after its faults; returns it and output 0's type."""
    fmt, width = case["format"], case["word_bits"]
    shape = codec.packed_shape(len(case["weights"]), fmt, width)
    lanes = [int(lane) for word in case["packed"] for lane in word]
    packed = np.array(lanes, dtype=np.uint64).astype(codec.storage_dtype(width)).reshape(shape)
    faults.flip_bits([packed], np.array(case["decoded_after_faults"]["flipped_bits"], dtype=np.int64))
    output_type = TensorProto.FLOAT if fmt == "bf16" else schema.ONNX_TYPES[fmt]  # numpy has no bfloat16
    secded = case["code"] == "secded"
    node = schema.make_decode_node(schema.DecodeNode(
        "n", "p", "w", "m", fmt, width, tuple(case["shape"]), check, output_type, case["code"], case.get("range_max"),
        "c" if secded else None))
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output]
    graph = helper.make_graph([node], "vector", [], outputs, [numpy_helper.from_array(packed, "p")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.oppass", 1)])
    return model, output_type


@pytest.mark.parametrize("check", ["runtime", "load"])
@pytest.mark.parametrize("case", CODE_VECTORS, ids=[case["name"] for case in CODE_VECTORS])
def test_kernel_matches_code_vectors(case: dict, check: str, custom_op_library: str) -> None:
    model, output_type = vector_model(case, check)
    outputs = ort.InferenceSession(model.SerializeToString(), runtime.session_options()).run(None, {})
    expected = case["decoded_after_faults"]
    codes = outputs[0].reshape(-1).view(np.uint32) >> 16 if case["format"] == "bf16" else \
        outputs[0].reshape(-1).view(formats.FORMATS[case["format"]].code_dtype)
    assert codes.tolist() == expected["decoded"] and list(outputs[0].shape) == case["shape"]
    assert int(outputs[1]) == expected["masked_words"]
    if case["code"] == "secded":
        assert int(outputs[2]) == expected["corrected_words"]
    assert output_type == schema.ONNX_TYPES[case["format"]] or case["format"] == "bf16"


@pytest.mark.parametrize("fmt", ["keep", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("word", ["64", "512"])
@pytest.mark.parametrize("check", ["runtime", "load"])
def test_fault_free_secded_output_equals_the_original_with_rounded_weights(
    cnn_model: onnx.ModelProto, custom_op_library: str, fmt: str, word: str, check: str
) -> None:
    protected = protect.transform(cnn_model, format=fmt, word=word, check=check, code="secded", range_check=True)
    reference = adjusted_reference(cnn_model, CNN_WEIGHTS, fmt, word, None, CNN_AXES, code="secded")
    assert run(protected, protected=True)[0].tobytes() == run(reference, protected=False)[0].tobytes()


def test_load_folding_of_a_secded_model_equals_the_reference(
    cnn_model: onnx.ModelProto, custom_op_library: str
) -> None:
    protected = protect.transform(cnn_model, check="load", code="secded", range_check=True)
    reference = adjusted_reference(cnn_model, CNN_WEIGHTS, "keep", "64", None, code="secded")
    expected = ort.InferenceSession(reference.SerializeToString()).run(None, feeds())[0]
    assert runtime.load_session(protected).run(None, feeds())[0].tobytes() == expected.tobytes()


@pytest.mark.parametrize("code", formats.CODES)
def test_reported_counts_and_weights_under_faults_are_the_codecs(
    cnn_model: onnx.ModelProto, custom_op_library: str, code: str
) -> None:
    """Injected faults: the kernel's masked and corrected words, and the model output, are what the codec's
    decode (with the range check) gives."""
    protected = protect.transform(cnn_model, word="128", code=code, range_check=True, report_faults=True)
    faulty, flips = protected_models.inject(protected, 3e-3, seed=8)
    decoded, masked, corrected = {}, 0, 0
    for decode in schema.read_decode_nodes(faulty):
        result = codec.decode(initializer(faulty, decode.packed), decode.format, decode.word_bits, decode.shape,
                              code=code, range_max=decode.range_max)
        decoded[decode.output] = result.weights
        masked, corrected = masked + result.masked_words, corrected + result.corrected_words

    outputs = run(faulty, protected=True)

    assert flips > 0 and masked > 0 and (corrected > 0) == (code == "secded")
    assert int(outputs[1]) == masked
    if code == "secded":
        assert int(outputs[2]) == corrected
    assert outputs[0].tobytes() == run(with_weights(cnn_model, decoded), protected=False)[0].tobytes()


def test_the_range_check_zeroes_a_weight_that_parity_misses(cnn_model: onnx.ModelProto, custom_op_library: str) -> None:
    """Two flips in one word (the top exponent bits of two weights) pass parity; the range check zeroes both."""
    protected = protect.transform(cnn_model, word="64", range_check=True, report_faults=True)
    faulty = onnx.ModelProto()
    faulty.CopyFrom(protected)
    packed = initializer(faulty, "conv1.w::op_packed").copy()
    faults.flip_bits([packed], np.array([30, 62], dtype=np.int64))
    next(t for t in faulty.graph.initializer if t.name == "conv1.w::op_packed").CopyFrom(
        numpy_helper.from_array(packed, "conv1.w::op_packed"))
    faulty.graph.output.extend([helper.make_tensor_value_info("conv1.w", TensorProto.FLOAT, None)])
    unchecked = onnx.ModelProto()
    unchecked.CopyFrom(faulty)
    for attribute in unchecked.graph.node[0].attribute:
        if attribute.name == "range_max":
            unchecked.graph.node[0].attribute.remove(attribute)
            break

    checked_weights, unchecked_weights = run(faulty, protected=True)[-1], run(unchecked, protected=True)[-1]
    adjusted = codec.encode(initializer(cnn_model, "conv1.w"), 64).adjusted

    assert run(faulty, protected=True)[1] == 0  # parity saw nothing
    assert np.abs(unchecked_weights.reshape(-1)[:2]).min() > np.abs(adjusted).max()
    np.testing.assert_array_equal(checked_weights.reshape(-1)[:2], [0.0, 0.0])
    np.testing.assert_array_equal(checked_weights.reshape(-1)[2:], adjusted.reshape(-1)[2:])


def test_strip_of_a_secded_model_runs_as_the_protected_one(cnn_model: onnx.ModelProto, custom_op_library: str) -> None:
    protected = protect.transform(cnn_model, format="bf16", code="secded", range_check=True, report_faults=True)
    stripped = protected_models.strip(protected)
    assert run(stripped, protected=False)[0].tobytes() == run(protected, protected=True)[0].tobytes()


def test_transform_command_shows_the_secded_drift(
    cnn_model: onnx.ModelProto, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(cnn_model, source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx"), "--code", "secded", "--format", "int8"]) == 0
    drift = summary(capsys.readouterr().out)["fault-free output drift"]
    assert drift.endswith("(max abs, one random input)") and float(drift.split()[0]) > 0


def test_load_folding_warns_about_masked_and_corrected_words(
    cnn_model: onnx.ModelProto, custom_op_library: str
) -> None:
    protected = protect.transform(cnn_model, check="load", code="secded", report_faults=True)
    faulty = onnx.ModelProto()
    faulty.CopyFrom(protected)
    packed = initializer(faulty, "fc1.w::op_packed").copy()
    faults.flip_bits([packed], np.array([3, 64 + 5, 64 + 9, 128 + 1], dtype=np.int64))  # words 0, 2: one; word 1: two
    next(t for t in faulty.graph.initializer if t.name == "fc1.w::op_packed").CopyFrom(
        numpy_helper.from_array(packed, "fc1.w::op_packed"))
    with pytest.warns(UserWarning) as caught:
        session = runtime.load_session(faulty)
    messages = [str(warning.message) for warning in caught]
    assert "oppass: 1 corrupted weight words were masked at load" in messages
    assert "oppass: 2 weight words with a flipped bit were corrected at load" in messages
    names = [output.name for output in session.get_outputs()]
    counts = dict(zip(names, session.run(None, feeds()), strict=True))
    assert (counts[schema.MASKED_WORDS_OUTPUT], counts[schema.CORRECTED_WORDS_OUTPUT]) == (1, 2)
