"""`--code secded` and `--range-check` in the pass, the protected-model tools and the command line (no kernel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from references import initializer, with_weights

from oppass import cli, codec, formats, protect, protected_models, schema
from oppass.errors import OppassError

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
