"""Every tensor of a model goes through one walk (issue 14.4).

A tensor whose bytes are external data, wherever it sits (a sparse initializer's values or
indices, a Constant's sparse value, a TENSORS attribute, a Constant inside a model function,
an initializer of a training graph, an If branch), is bounds-checked and copied into the output
like a main-graph weight: damaged references are one-line errors, and the output never reads
a file next to it named like the input's data file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, weights
from onnx import TensorProto, helper, numpy_helper

from oppass import cli, modelio

VALUES = np.arange(300, dtype=np.float32)  # 1,200 bytes: large enough to be moved to external data
INDICES = np.arange(0, 600, 2, dtype=np.int64)


def base_model() -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    return make_model([node], {"w": weights([2, 3, 3, 3], 1)}, output_shape=["batch", 2, 6, 6])


def sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(numpy_helper.from_array(VALUES, name), numpy_helper.from_array(INDICES), [600])


def in_sparse_initializer(model: onnx.ModelProto, part: str) -> onnx.TensorProto:
    model.graph.sparse_initializer.append(sparse("s"))
    return getattr(model.graph.sparse_initializer[0], part)


def in_sparse_constant(model: onnx.ModelProto) -> onnx.TensorProto:
    model.graph.node.append(helper.make_node("Constant", [], ["c"], sparse_value=sparse("c")))
    return model.graph.node[-1].attribute[0].sparse_tensor.values


def in_tensors_attribute(model: onnx.ModelProto) -> onnx.TensorProto:
    attribute = onnx.AttributeProto(name="list", type=onnx.AttributeProto.TENSORS)
    attribute.tensors.append(numpy_helper.from_array(VALUES, "listed"))
    model.graph.node.append(helper.make_node("Identity", ["x"], ["unused"], domain="example.custom"))
    model.graph.node[-1].attribute.append(attribute)
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    return model.graph.node[-1].attribute[0].tensors[0]


def in_function(model: onnx.ModelProto) -> onnx.TensorProto:
    constant = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(VALUES, "k"))
    function = helper.make_function("example.functions", "Offset", ["a"], ["b"],
                                    [constant, helper.make_node("Add", ["a", "k"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("example.functions", 1))
    return model.functions[0].node[0].attribute[0].t


def in_training_graph(model: onnx.ModelProto) -> onnx.TensorProto:
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(numpy_helper.from_array(VALUES, "trained"))
    return info.initialization.initializer[0]


def in_if_branch(model: onnx.ModelProto) -> onnx.TensorProto:
    branch = helper.make_graph([helper.make_node("Identity", ["inner"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(VALUES, "inner")])
    model.graph.node.append(helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))))
    model.graph.node.append(helper.make_node("If", ["flag"], ["unused_if"], then_branch=branch, else_branch=branch))
    return model.graph.node[-1].attribute[0].g.initializer[0]


PLACES: dict[str, Callable[[onnx.ModelProto], onnx.TensorProto]] = {
    "sparse initializer values": lambda m: in_sparse_initializer(m, "values"),
    "sparse initializer indices": lambda m: in_sparse_initializer(m, "indices"),
    "sparse Constant value": in_sparse_constant,
    "TENSORS attribute": in_tensors_attribute,
    "Constant in a model function": in_function,
    "training graph initializer": in_training_graph,
    "If branch initializer": in_if_branch,
}


def external_model(folder: Path, place: str, **entries: str) -> tuple[Path, bytes]:
    """A model with its extra tensor at `place` in `folder`/data.bin (other entries override the reference)."""
    model = base_model()
    tensor = PLACES[place](model)
    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(
        numpy_helper.to_array(tensor)).raw_data
    (folder / "data.bin").write_bytes(b"\0" * 64 + raw)
    tensor.ClearField("raw_data")
    del tensor.int64_data[:]
    reference = {"location": "data.bin", "offset": "64", "length": str(len(raw)), **entries}
    for key, value in reference.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, raw


def tensor_at(model: onnx.ModelProto, place: str) -> onnx.TensorProto:
    """The tensor at `place` in a model read back (the same walk the test models were built with)."""
    expected = base_model()
    target = PLACES[place](expected)
    index = next(i for i, t in enumerate(modelio.all_tensors(expected)) if t is target)
    return list(modelio.all_tensors(model))[index]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", ["transform", "inspect"])
@pytest.mark.parametrize(("entries", "message"), [
    ({"offset": "100000"}, "is too short for tensor"),
    ({"length": "100000"}, "is too short for tensor"),
    ({"location": "../data.bin"}, "points outside the directory"),
    ({"location": "missing.bin"}, "it is not regular file"),
    ({"offset": "-5"}, "offset must be non-negative"),
])
def test_external_data_anywhere_is_bounds_checked(place: str, command: str, entries: dict[str, str], message: str,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    path, _ = external_model(tmp_path / "model", place, **entries)
    (tmp_path / "data.bin").write_bytes(b"\1" * 2000)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    arguments = ["inspect", str(path)] if command == "inspect" else \
        ["transform", str(path), str(tmp_path / "out.onnx"), "--no-verify"]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: ") and error.count("\n") == 1 and message in error, error
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("place", PLACES)
def test_external_data_anywhere_is_copied_into_the_output(place: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    path, raw = external_model(tmp_path / "in", place)
    (tmp_path / "out" / "data.bin").write_bytes(b"\1" * len(raw) * 2)  # a decoy named like the input's data
    output = tmp_path / "out" / "protected.onnx"
    assert cli.main(["transform", str(path), str(output), "--no-verify"]) == 0
    written = onnx.load_model(output, load_external_data=False)
    assert "data.bin" not in {entry.value for tensor in modelio.all_tensors(written) for entry in
                              tensor.external_data}
    assert tensor_at(modelio.load_model(output), place).raw_data == raw
