"""The `oppass` command line: output of each subcommand, and one-line errors that leave no file behind."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO_ROOT

from oppass import cli, modelio, protect, protected_models, runtime, schema


@pytest.fixture
def model_file(cnn_model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(cnn_model, path)
    return path


@pytest.fixture
def protected_file(cnn_model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "protected.onnx"
    onnx.save_model(protect.transform(cnn_model, word="32"), path)
    return path


def summary(text: str) -> dict[str, str]:
    """The transform summary table as {row label: value}."""
    rows = [line.split("  ", 1) for line in text.splitlines()]
    return {label.strip(): value.strip() for label, value in rows}


def test_transform_prints_the_report_and_the_drift(
    model_file: Path, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out.onnx"
    assert cli.main(["transform", str(model_file), str(output), "--format", "bf16", "--word", "128"]) == 0
    table = summary(capsys.readouterr().out)
    _, report = protect.transform_with_report(model_file, format="bf16", word="128")
    assert table["tensors protected"] == "4"
    assert table["weights"] == f"{report.weights:,}"
    assert table["stored bytes before"] == f"{report.bytes_before:,}"
    assert table["stored bytes after"] == f"{report.bytes_after:,}" != table["stored bytes before"]
    assert table["words changed by the encoding"] == f"{report.changed_words:,}"
    assert table["largest relative weight change"] == f"{report.max_weight_change:.3g}"
    assert table["subnormal weights before / after"] == f"{report.subnormals_before:,} / {report.subnormals_after:,}"
    assert table["non-finite weights (NaN, inf)"] == "0"
    assert table["largest conversion error (x max|w|)"] == f"{report.max_conversion_error:.3g}"
    drift = table["fault-free output drift"]
    assert drift.endswith("(max abs, one random input)") and float(drift.split()[0]) > 0
    assert [t.name for t in protected_models.inspect(output)] == ["conv1.w", "conv2.w", "fc1.w", "fc2.w"]


def with_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` with initializer `name` replaced by `values`."""
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tensor = next(t for t in copy.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    return copy


def test_transform_of_negative_zeros_reports_no_subnormal_before_or_after(
    cnn_model: onnx.ModelProto, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    """Half the weights at -0.0 (a pruned export): the zeros' sign flips make no subnormal, in any strategy."""
    source = tmp_path / "pruned.onnx"
    conv = next(t for t in cnn_model.graph.initializer if t.name == "conv2.w")
    pruned = onnx.numpy_helper.to_array(conv).copy()
    pruned.reshape(-1)[::2] = -0.0
    onnx.save_model(with_initializer(cnn_model, "conv2.w", pruned), source)
    for flip in ("word-lsb", "largest", "min-error"):
        output = tmp_path / f"{flip}.onnx"
        assert cli.main(["transform", str(source), str(output), "--flip", flip, "--word", "weight"]) == 0
        table = summary(capsys.readouterr().out)
        assert table["subnormal weights before / after"] == "0 / 0"
        assert table["non-finite weights (NaN, inf)"] == "0"
        stripped = protected_models.strip(modelio.load_model(output))
        decoded = onnx.numpy_helper.to_array(next(t for t in stripped.graph.initializer if t.name == "conv2.w"))
        assert np.count_nonzero(decoded.reshape(-1)[::2]) == 0


def test_transform_reports_and_warns_about_nonfinite_weights(
    cnn_model: onnx.ModelProto, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "nan.onnx"
    fc2 = onnx.numpy_helper.to_array(next(t for t in cnn_model.graph.initializer if t.name == "fc2.w")).copy()
    fc2[0, 0], fc2[1, 1] = np.nan, np.inf
    onnx.save_model(with_initializer(cnn_model, "fc2.w", fc2), source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx")]) == 0
    captured = capsys.readouterr()
    assert summary(captured.out)["non-finite weights (NaN, inf)"] == "2"
    assert "oppass: warning: 2 protected weights are NaN or infinite (kept as they are)" in captured.err
    drift = float(summary(captured.out)["fault-free output drift"].split()[0])
    assert np.isfinite(drift) and "NaN or infinite values" not in captured.err  # the same NaNs and infinities


def test_drift_warns_when_not_finite_or_large(
    cnn_model: onnx.ModelProto, tmp_path: Path, custom_op_library: str
) -> None:
    original, scaled, broken = tmp_path / "original.onnx", tmp_path / "scaled.onnx", tmp_path / "broken.onnx"
    onnx.save_model(cnn_model, original)
    fc2 = onnx.numpy_helper.to_array(next(t for t in cnn_model.graph.initializer if t.name == "fc2.w"))
    onnx.save_model(with_initializer(cnn_model, "fc2.w", fc2 * 1.5), scaled)
    with_nan = fc2.copy()
    with_nan[0, 0] = np.nan
    onnx.save_model(with_initializer(cnn_model, "fc2.w", with_nan), broken)
    with pytest.warns(UserWarning) as caught:
        assert cli._drift_text(original, original).startswith("0 ")
        large = cli._drift_text(original, scaled)
        assert cli._drift_text(original, broken).startswith("inf ")
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2
    assert f"exceeds {cli.DRIFT_WARNING:.0%} of the largest output magnitude" in messages[0]
    assert large.split()[0] in messages[0]
    assert "differ from the original's in NaN or infinite values" in messages[1]


def test_transform_options_reach_the_pass(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out.onnx"
    arguments = ["transform", str(model_file), str(output), "--format", "fp16", "--word", "weight", "--flip",
                 "min-error", "--ops", "Conv", "--check", "load", "--report-faults", "--no-verify"]
    assert cli.main(arguments) == 0
    assert summary(capsys.readouterr().out)["fault-free output drift"] == "skipped (--no-verify)"
    tensors = protected_models.inspect(output)
    assert [(t.name, t.format, t.word_bits, t.check) for t in tensors] == [
        ("conv1.w", "fp16", 16, "load"), ("conv2.w", "fp16", 16, "load")]
    assert modelio.load_model(output).graph.output[-1].name == schema.MASKED_WORDS_OUTPUT


def test_transform_optimize_for_cpu_protects_the_optimized_graph(
    model_file: Path, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out.onnx"
    assert cli.main(["transform", str(model_file), str(output), "--optimize-for-cpu"]) == 0
    table = summary(capsys.readouterr().out)
    expected = protected_models.inspect(protect.transform(runtime.optimize_for_cpu(model_file)))
    assert protected_models.inspect(output) == expected and table["tensors protected"] == str(len(expected)) == "4"
    assert float(table["fault-free output drift"].split()[0]) < 1e-4


def test_drift_is_skipped_with_a_note_when_the_model_cannot_run(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("OPPASS_CUSTOM_OP_LIBRARY", str(tmp_path / "no-such-library.so"))
    assert cli.main(["transform", str(model_file), str(tmp_path / "out.onnx")]) == 0
    assert summary(capsys.readouterr().out)["fault-free output drift"].startswith("skipped: model could not be run")


def test_drift_check_failing_in_onnxruntime_is_one_line_without_its_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A model that cannot run on the check's random input (a Reshape of its length-1 symbolic axis): the
    summary says so, and onnxruntime's own error log (written to the process's stderr) stays quiet."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal([3, 4]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "rows"], ["y"]), helper.make_node("Gemm", ["y", "w"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([2, -1], np.int64), "rows")])
    source = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx")]) == 0
    captured = capfd.readouterr()
    assert summary(captured.out)["fault-free output drift"].startswith("skipped: model could not be run")
    assert "onnxruntime" not in captured.err, captured.err


def test_drift_check_gives_longer_dynamic_axes_to_a_model_that_needs_them(
    tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    """A reflect Pad of 4 needs at least 5 samples (speech models pad their audio so): the batch stays 1, the
    time axis gets the first of DYNAMIC_DIM_SIZES the model runs on, and the drift is measured."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal([2, 1, 3]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
         helper.make_node("Conv", ["padded", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "time"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "frames"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([0, 0, 4, 0, 0, 4], np.int64), "pads")])
    source = tmp_path / "padded.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx")]) == 0
    drift = summary(capsys.readouterr().out)["fault-free output drift"]
    assert drift.endswith("(max abs, one random input)") and np.isfinite(float(drift.split()[0])), drift


def test_inspect_lists_the_protected_tensors(protected_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", str(protected_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["tensor", "format", "word", "bits", "code", "range", "max", "shape", "check",
                                "decoded", "by", "output", "packed"]
    assert lines[1].split() == ["conv1.w", "fp32", "32", "parity", "-", "[4,", "3,", "3,", "3]", "runtime",
                                "ParityCheckUnpack", "FLOAT", "uint32", "[108,", "1]"]
    assert len(lines) == 5


def test_inject_prints_the_number_of_flips(protected_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "faulty.onnx"
    assert cli.main(["inject", str(protected_file), str(output), "--ber", "0.01", "--seed", "5"]) == 0
    _, flips = protected_models.inject(protected_file, 0.01, 5)
    assert capsys.readouterr().out == f"{flips} bits flipped\n"
    assert flips > 0
    faulty = np.frombuffer(b"".join(t.raw_data for t in modelio.load_model(output).graph.initializer), np.uint8)
    clean = np.frombuffer(b"".join(t.raw_data for t in modelio.load_model(protected_file).graph.initializer), np.uint8)
    differing_bits = int(np.unpackbits(faulty ^ clean).sum())
    assert differing_bits == flips


def test_strip_writes_a_plain_model(protected_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "plain.onnx"
    assert cli.main(["strip", str(protected_file), str(output)]) == 0
    plain = modelio.load_model(output)
    onnx.checker.check_model(plain, full_check=True)
    assert not protected_models.inspect(plain)


@pytest.mark.parametrize("case", [
    "garbage input", "truncated input", "missing input", "same path", "already protected",
    "bad ber", "plain model to strip", "missing output folder", "bad format for weights",
])
def test_errors_are_one_line_exit_2_no_output_and_input_untouched(
    case: str, model_file: Path, protected_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:150])
    qdq = tmp_path / "qdq.onnx"
    onnx.save_model(protected_models.strip(protect.transform(model_file, format="int8")), qdq)
    output = tmp_path / "out.onnx"
    arguments = {
        "garbage input": ["transform", str(garbage), str(output)],
        "truncated input": ["transform", str(truncated), str(output)],
        "missing input": ["transform", str(tmp_path / "nowhere.onnx"), str(output)],
        "same path": ["transform", str(model_file), str(model_file)],
        "already protected": ["transform", str(protected_file), str(output)],
        "bad ber": ["inject", str(protected_file), str(output), "--ber", "2", "--seed", "1"],
        "plain model to strip": ["strip", str(model_file), str(output)],
        "missing output folder": ["transform", str(model_file), str(tmp_path / "nowhere" / "out.onnx")],
        "bad format for weights": ["transform", str(qdq), str(output), "--format", "bf16"],
    }[case]
    inputs = {path: path.read_bytes() for path in tmp_path.iterdir()}
    assert cli.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("oppass: error: ") and captured.err.count("\n") == 1
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == inputs


def test_unknown_choices_are_rejected_by_argparse(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["transform", str(model_file), str(tmp_path / "out.onnx"), "--word", "48"])
    assert raised.value.code == 2
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("module", ["oppass", "oppass.cli"])
def test_command_line_errors_print_no_traceback(module: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"garbage")
    command = [sys.executable, "-m", module, "transform", str(garbage), str(tmp_path / "out.onnx")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("oppass: error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_warnings_are_printed_on_one_line(input_initializer_model: onnx.ModelProto, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "in.onnx"
    onnx.save_model(input_initializer_model, path)
    assert cli.main(["transform", str(path), str(tmp_path / "out.onnx"), "--no-verify"]) == 0
    assert capsys.readouterr().err == "oppass: warning: weight 'user.w' left unprotected: " \
                                      "it is also a graph input, which may override it\n"


def test_subcommands_dispatch_to_their_run_functions() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["transform", "a.onnx", "b.onnx"]).run is cli.run_transform
    assert parser.parse_args(["inspect", "a.onnx"]).run is cli.run_inspect
    assert parser.parse_args(["inject", "a.onnx", "b.onnx", "--ber", "0", "--seed", "0"]).run is cli.run_inject
    assert parser.parse_args(["strip", "a.onnx", "b.onnx"]).run is cli.run_strip


def test_transform_imports_nothing_of_the_campaign(model_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.onnx"
    code = ("import sys\nfrom oppass import cli\n"
            f"assert cli.main(['transform', {str(model_file)!r}, {str(output)!r}, '--no-verify']) == 0\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'scipy', 'matplotlib') "
            "or m.startswith('oppass.campaign')]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO_ROOT)
    assert output.stat().st_size > 0


def test_a_command_line_gets_the_arguments_of_its_subcommand_only() -> None:
    def arguments(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
        (subcommands,) = [action for action in parser._actions if action.dest == "command"]
        return {name: [a.dest for a in sub._actions if a.dest != "help"] for name, sub in subcommands.choices.items()}

    everything = arguments(cli.build_parser())
    assert list(everything) == [command.name for command in cli.COMMANDS]
    assert all(everything.values())
    for name in everything:
        assert arguments(cli.build_parser([name, "--help"])) == {other: everything[name] if other == name else []
                                                                  for other in everything}
    assert not any(arguments(cli.build_parser(["--help"])).values())


def test_transform_of_an_external_data_model_measures_the_drift_from_the_files(
    external_data_model: Path, tmp_path: Path, custom_op_library: str, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()
    assert cli.main(["transform", str(external_data_model), str(output)]) == 0
    drift = summary(capsys.readouterr().out)["fault-free output drift"]
    assert drift.endswith("(max abs, one random input)") and float(drift.split()[0]) > 0
    assert [t.name for t in protected_models.inspect(output)] == ["conv1.w", "conv2.w", "fc1.w", "fc2.w"]
