"""Hostile and unusual models through the command line (issue 5).

Each case gets what a user would want: either one line `oppass: error: ...` on stderr, exit
status 2, no new file and every existing file untouched, or a correct result. Cases already
covered elsewhere (garbage, truncated and missing files, same input and output path, already
protected models, external data escaping its folder, zero-size and float64 weights, Constant
nodes, shared weights, If subgraphs) live in tests/test_cli.py and tests/test_graph.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import INPUT_SHAPE, make_model, weights
from onnx import TensorProto, helper, numpy_helper
from references import adjusted_reference, plain_options

from oppass import cli, modelio, protect, protected_models, schema


def conv_model(opset: int, weight_shape: tuple[int, ...] = (2, 3, 3, 3)) -> onnx.ModelProto:
    pad = (weight_shape[2] - 1) // 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4)
    return make_model([node], {"w": weights(list(weight_shape), 1)}, output_shape=["batch", weight_shape[0], 6, 6],
                      opset=opset)


def loop_model() -> onnx.ModelProto:
    """A Loop whose body runs a Conv on the loop-carried tensor with an outer-scope weight."""
    body = helper.make_graph(
        [helper.make_node("Conv", ["carried_in", "loop.w"], ["carried_out"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, None)],
    )
    nodes = [helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(np.array(2, np.int64))),
             helper.make_node("Constant", [], ["go"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)]
    return make_model(nodes, {"loop.w": weights([3, 3, 3, 3], 2)}, output_shape=INPUT_SHAPE)


def duplicate_initializer_model() -> onnx.ModelProto:
    model = conv_model(17)
    model.graph.initializer.append(numpy_helper.from_array(weights([2, 3, 3, 3], 9), "w"))
    return model


def empty_graph_model() -> onnx.ModelProto:
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([], "empty", [value], [value]),
                             opset_imports=[helper.make_opsetid("", 17)])


def tampered(attribute: str, value: object | None) -> Callable[[Path], onnx.ModelProto]:
    """A protected conv model whose decode node has `attribute` set to `value` (None: removed)."""
    def make(folder: Path) -> onnx.ModelProto:
        model = protect.transform(conv_model(17))
        node = next(n for n in model.graph.node if n.domain == schema.DOMAIN)
        kept = [a for a in node.attribute if a.name != attribute]
        del node.attribute[:]
        node.attribute.extend(kept)
        if value is not None:
            node.attribute.append(helper.make_attribute(attribute, value))
        return model
    return make


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def assert_user_error(arguments: list[str], folder: Path, capsys: pytest.CaptureFixture, message: str) -> None:
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert cli.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("oppass: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(("case", "message"), [
    ("empty file", "not a valid ONNX model"),
    ("directory as input", "is a directory, not a model file"),
    ("output inside a file", "is not a folder"),
    ("output is a directory", "is a directory"),
    ("same file through a symlink", "would overwrite the input"),
])
def test_bad_paths_are_one_line_errors(case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write(conv_model(17), tmp_path / "model.onnx")
    empty = tmp_path / "empty.onnx"
    empty.touch()
    (tmp_path / "folder").mkdir()
    (tmp_path / "alias.onnx").symlink_to(model)
    source, destination = {
        "empty file": (empty, tmp_path / "out.onnx"),
        "directory as input": (tmp_path / "folder", tmp_path / "out.onnx"),
        "output inside a file": (model, model / "out.onnx"),
        "output is a directory": (model, tmp_path / "folder"),
        "same file through a symlink": (model, tmp_path / "alias.onnx"),
    }[case]
    assert_user_error(["transform", str(source), str(destination), "--no-verify"], tmp_path, capsys, message)


@pytest.mark.parametrize(("attribute", "value", "message"), [
    ("shape", [4, 3, 3, 3], "does not match its packed tensor"),  # larger than the packed data
    ("shape", [1, 3, 3, 3], "does not match its packed tensor"),  # smaller than the packed data
    ("shape", [-2, 3, 3, 3], "negative"),
    ("format", "fp64", "has format 'fp64', expected one of fp32"),
    ("word_bits", 128, "does not match its packed tensor"),     # the packed lanes are 64-bit words
    ("word_bits", 24, "has word_bits 24, expected one of 32, 64"),
    ("word_bits", None, "lacks attribute 'word_bits'"),
    ("format", None, "lacks attribute 'format'"),
])
@pytest.mark.parametrize("command", ["inspect", "strip", "inject"])
def test_tampered_decode_attributes_are_one_line_errors(
    attribute: str, value: object, message: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = write(tampered(attribute, value)(tmp_path), tmp_path / "tampered.onnx")
    arguments = {"inspect": ["inspect", str(model)],
                 "strip": ["strip", str(model), str(tmp_path / "out.onnx")],
                 "inject": ["inject", str(model), str(tmp_path / "out.onnx"), "--ber", "1e-3", "--seed", "0"]}[command]
    assert_user_error(arguments, tmp_path, capsys, message)


def test_duplicate_initializer_names_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write(duplicate_initializer_model(), tmp_path / "dup.onnx")
    assert_user_error(["transform", str(model), str(tmp_path / "out.onnx"), "--no-verify"], tmp_path, capsys,
                      "initializer 'w' is defined more than once")


def test_a_graph_with_nothing_to_protect_is_written_with_a_warning(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    model = write(empty_graph_model(), tmp_path / "empty_graph.onnx")
    assert cli.main(["transform", str(model), str(tmp_path / "out.onnx"), "--no-verify"]) == 0
    assert "oppass: warning: no weight" in capsys.readouterr().err
    assert not protected_models.inspect(tmp_path / "out.onnx")


@pytest.mark.parametrize(("name", "make"), [
    ("opset 7", lambda: conv_model(7)),
    ("opset 11", lambda: conv_model(11)),
    ("opset 21", lambda: conv_model(21)),
    ("21 weights: not a multiple of the word", lambda: conv_model(17, (7, 3, 1, 1))),
    ("conv inside a Loop body", loop_model),
])
@pytest.mark.parametrize("word", ["64", "256"])
def test_unusual_models_protect_correctly(name: str, make: Callable[[], onnx.ModelProto], word: str,
                                         tmp_path: Path) -> None:
    model = make()
    source = write(model, tmp_path / "model.onnx")
    destination = tmp_path / "protected.onnx"
    assert cli.main(["transform", str(source), str(destination), "--word", word, "--no-verify"]) == 0
    protected = onnx.load(destination)
    onnx.checker.check_model(protected, full_check=True)
    names = tuple(t.name for t in protected_models.inspect(protected))
    assert names
    reference = adjusted_reference(model, names, "keep", word, "word-lsb")
    x = np.random.default_rng(0).standard_normal([1, *INPUT_SHAPE[1:]]).astype(np.float32)
    expected = ort.InferenceSession(reference.SerializeToString(), plain_options(False)).run(None, {"x": x})
    actual = ort.InferenceSession(protected.SerializeToString(), plain_options(True)).run(None, {"x": x})
    assert [a.tobytes() for a in actual] == [e.tobytes() for e in expected]


def test_the_newest_onnx_opset_is_protected_even_when_onnxruntime_cannot_run_it(tmp_path: Path) -> None:
    newest = onnx.defs.onnx_opset_version()
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = helper.make_model(
        helper.make_graph([node], "newest", [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weights([2, 3, 3, 3], 1), "w")]),
        opset_imports=[helper.make_opsetid("", newest)])
    source = write(model, tmp_path / "newest.onnx")
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx")]) == 0
    assert protected_models.inspect(tmp_path / "out.onnx")[0].name == "w"


@pytest.mark.parametrize("defer_threshold", [1, 2**20])
def test_a_weight_with_the_wrong_number_of_bytes_is_a_one_line_error(
    defer_threshold: int, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio, "DEFER_THRESHOLD", defer_threshold)  # read from the file, or parsed with the model
    model = conv_model(17)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = write(model, tmp_path / "short.onnx")
    assert_user_error(["transform", str(path), str(tmp_path / "out.onnx"), "--no-verify"], tmp_path, capsys,
                      "has 212 bytes of data, expected 216")


def test_a_model_reached_through_a_symlink_is_read_from_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(modelio, "DEFER_THRESHOLD", 1)  # the weights are read from the file after the model
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    model = conv_model(17)
    target = write(model, tmp_path / "real" / "model.onnx")
    (tmp_path / "links" / "model.onnx").symlink_to(target)
    output = tmp_path / "out.onnx"
    assert cli.main(["transform", str(tmp_path / "links" / "model.onnx"), str(output), "--no-verify"]) == 0
    assert output.read_bytes() == protect.transform(model).SerializeToString()
