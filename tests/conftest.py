"""Shared fixtures: small hand-built ONNX models covering the graph pass's cases, and the C library.

Every model has float input `x` (`[batch, 3, 6, 6]`, batch dynamic) and output `y`,
except where noted, and uses opset 17 with IR version 8.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from oppass import runtime
from oppass.errors import OppassError

# Python subprocesses started by tests (CLI runs, hostile models, killed campaigns) must import
# the same oppass as this process, not a source tree that happens to be their working folder.
os.environ["PYTHONSAFEPATH"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCE = REPO_ROOT / "custom_ops" / "parity_check_unpack.c"
TEST_BUILD = REPO_ROOT / "build" / "pytest"
OPSET = 17
IR_VERSION = 8
INPUT_SHAPE = ["batch", 3, 6, 6]


def weights(shape: list[int], seed: int, dtype: type = np.float32) -> np.ndarray:
    """Seeded normal weights of the given shape."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def make_model(
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    *,
    inputs: list[onnx.ValueInfoProto] | None = None,
    output_shape: list[int | str] | None = None,
    element_type: int = TensorProto.FLOAT,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """A checked model: input `x` and output `y` (of `element_type` unless `inputs` is given), nodes, initializers."""
    tensors = [numpy_helper.from_array(value, name) for name, value in initializers.items()]
    graph = helper.make_graph(
        nodes,
        "test",
        inputs or [helper.make_tensor_value_info("x", element_type, INPUT_SHAPE)],
        [helper.make_tensor_value_info("y", element_type, output_shape)],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn(opset: int = OPSET) -> onnx.ModelProto:
    """Conv+bias -> Relu -> Conv -> Flatten -> Gemm(transB=1) -> Gemm(transB=0)."""
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], strides=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["g1"], transB=1),
        helper.make_node("Gemm", ["g1", "fc2.w"], ["y"]),
    ]
    initializers = {
        "conv1.w": weights([4, 3, 3, 3], 1),
        "conv1.b": weights([4], 2),
        "conv2.w": weights([5, 4, 3, 3], 3),
        "fc1.w": weights([7, 20], 4),
        "fc1.b": weights([7], 5),
        "fc2.w": weights([7, 3], 6),
    }
    return make_model(nodes, initializers, output_shape=["batch", 3], opset=opset)


@pytest.fixture
def cnn_model() -> onnx.ModelProto:
    return cnn()


@pytest.fixture
def shared_weight_model() -> onnx.ModelProto:
    """One 3x3x1x1 initializer read by two Convs."""
    nodes = [
        helper.make_node("Conv", ["x", "shared.w"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "shared.w"], ["y"]),
    ]
    return make_model(nodes, {"shared.w": weights([3, 3, 1, 1], 7)}, output_shape=INPUT_SHAPE)


@pytest.fixture
def constant_node_model() -> onnx.ModelProto:
    """The Conv weight comes from a Constant node."""
    value = numpy_helper.from_array(weights([2, 3, 3, 3], 8), "const.w.value")
    nodes = [
        helper.make_node("Constant", [], ["const.w"], value=value),
        helper.make_node("Conv", ["x", "const.w"], ["y"]),
    ]
    return make_model(nodes, {}, output_shape=["batch", 2, 4, 4])


@pytest.fixture
def qdq_model() -> onnx.ModelProto:
    """int8 initializer -> DequantizeLinear (per channel) -> Conv weight."""
    nodes = [
        helper.make_node("DequantizeLinear", ["q.w", "q.scale", "q.zero"], ["q.w.dq"], axis=0),
        helper.make_node("Conv", ["x", "q.w.dq"], ["y"]),
    ]
    initializers = {
        "q.w": np.random.default_rng(9).integers(-127, 128, [4, 3, 3, 3]).astype(np.int8),
        "q.scale": np.array([0.01, 0.02, 0.03, 0.04], dtype=np.float32),
        "q.zero": np.zeros(4, dtype=np.int8),
    }
    return make_model(nodes, initializers, output_shape=["batch", 4, 4, 4])


@pytest.fixture
def conv_integer_model() -> onnx.ModelProto:
    """uint8 input and weights: ConvInteger -> Cast to float."""
    nodes = [
        helper.make_node("ConvInteger", ["x", "ci.w", "ci.x_zero", "ci.w_zero"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT),
    ]
    initializers = {
        "ci.w": np.random.default_rng(10).integers(0, 256, [2, 3, 3, 3]).astype(np.uint8),
        "ci.x_zero": np.array(128, dtype=np.uint8),
        "ci.w_zero": np.array(128, dtype=np.uint8),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, INPUT_SHAPE)]
    return make_model(nodes, initializers, inputs=inputs, output_shape=["batch", 2, 4, 4])


@pytest.fixture
def if_model() -> onnx.ModelProto:
    """If(cond): the then-branch Conv reads an outer-scope initializer, the else-branch its own."""
    branch_output = ["batch", 2, 4, 4]
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "outer.w"], ["then.y"])], "then", [],
        [helper.make_tensor_value_info("then.y", TensorProto.FLOAT, branch_output)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "inner.w"], ["else.y"])], "else", [],
        [helper.make_tensor_value_info("else.y", TensorProto.FLOAT, branch_output)],
        [numpy_helper.from_array(weights([2, 3, 3, 3], 12), "inner.w")],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    return make_model(nodes, {"outer.w": weights([2, 3, 3, 3], 11)}, inputs=inputs, output_shape=branch_output)


@pytest.fixture
def input_initializer_model() -> onnx.ModelProto:
    """`user.w` is an initializer and also a graph input (overridable); `fixed.w` is a plain initializer."""
    nodes = [
        helper.make_node("Conv", ["x", "user.w"], ["a"]),
        helper.make_node("Conv", ["a", "fixed.w"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE),
        helper.make_tensor_value_info("user.w", TensorProto.FLOAT, [3, 3, 1, 1]),
    ]
    initializers = {"user.w": weights([3, 3, 1, 1], 13), "fixed.w": weights([3, 3, 1, 1], 14)}
    return make_model(nodes, initializers, inputs=inputs, output_shape=INPUT_SHAPE)


@pytest.fixture
def external_data_model(tmp_path: Path) -> Path:
    """The CNN saved with all its tensors in `cnn.onnx.data` next to `cnn.onnx`."""
    path = tmp_path / "cnn.onnx"
    onnx.save_model(cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="cnn.onnx.data", size_threshold=0)
    return path


ALL_MODEL_FIXTURES = (
    "cnn_model",
    "shared_weight_model",
    "constant_node_model",
    "qdq_model",
    "conv_integer_model",
    "if_model",
    "input_initializer_model",
)


def model_ops(fixture_name: str) -> tuple[str, ...]:
    """The `ops` argument that protects the weights of a fixture model."""
    return ("ConvInteger",) if fixture_name == "conv_integer_model" else ("Conv", "Gemm")


@pytest.fixture(scope="session", autouse=True)
def custom_op_library() -> str:
    """Path of the ParityCheckUnpack library, built with CMake when none is configured or installed.

    The path is exported in $OPPASS_CUSTOM_OP_LIBRARY for the rest of the session so that
    `oppass.runtime` finds it. A failed build fails the tests that need it.
    """
    configured_or_installed = _existing_library()
    if configured_or_installed:
        yield configured_or_installed
        return
    assert KERNEL_SOURCE.is_file(), f"{KERNEL_SOURCE} does not exist yet: cannot build the kernel"
    configure = ["cmake", "-S", str(REPO_ROOT / "custom_ops"), "-B", str(TEST_BUILD), "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(TEST_BUILD)], check=True, capture_output=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(runtime.LIBRARY_ENV, str(TEST_BUILD / runtime.LIBRARY_NAME))
        yield runtime.custom_op_library()


def _existing_library() -> str | None:
    """The configured library (an error if $OPPASS_CUSTOM_OP_LIBRARY names a missing file), else an installed one."""
    if os.environ.get(runtime.LIBRARY_ENV):
        return runtime.custom_op_library()
    try:
        return runtime.custom_op_library()
    except OppassError:
        return None
