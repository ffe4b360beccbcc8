"""Weights behind a Transpose (how exporters write Linear layers as MatMul): found, protected, and their
int8 channel axis mapped through the permutation. Hand-built models, no torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import weights
from onnx import TensorProto, helper, numpy_helper

from oppass import protected_models, runtime
from oppass.errors import OppassError
from oppass.protect import transform_with_report


def transposed_matmul(perm: list[int] | None, shared: bool = False) -> onnx.ModelProto:
    """The model y = x @ Transpose(w), w [5, 4] (Linear's [out, in]); with `shared`, w is also gathered."""
    attributes = {} if perm is None else {"perm": perm}
    nodes = [helper.make_node("Transpose", ["w"], ["w.t"], **attributes),
             helper.make_node("MatMul", ["x", "w.t"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])]
    initializers = [numpy_helper.from_array(weights([5, 4], 3), "w")]
    if shared:
        nodes.append(helper.make_node("Gather", ["w", "index"], ["rows"]))
        initializers.append(numpy_helper.from_array(np.array([4, 0], dtype=np.int64), "index"))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, [2, 4]))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, custom_ops: bool) -> list[np.ndarray]:
    options = runtime.session_options() if custom_ops else ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)})


@pytest.mark.parametrize("perm", [None, [1, 0]])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("fmt", ["keep", "bf16", "int8"])
def test_a_weight_behind_a_transpose_is_protected(perm, shared, fmt, custom_op_library):
    model = transposed_matmul(perm, shared)

    protected, report = transform_with_report(model, ops=("MatMul",), format=fmt)

    assert [tensor.name for tensor in report.tensors] == ["w"]
    for actual, expected in zip(run(protected, True), run(protected_models.strip(protected), False), strict=True):
        np.testing.assert_array_equal(actual, expected)
    if fmt == "int8":  # MatMul's output channels are the transposed weight's columns: w's rows, axis 0
        dequantize = next(node for node in protected.graph.node if node.op_type == "DequantizeLinear")
        assert helper.get_attribute_value(dequantize.attribute[0]) == 0
        scales = next(t for t in protected.graph.initializer if t.name == "w::op_scale")
        assert list(scales.dims) == [5]


def test_a_transpose_that_is_not_a_permutation_is_not_followed(custom_op_library):
    model = transposed_matmul([1, 0])
    model.graph.node[0].attribute[0].ints[:] = [1, 1]

    with pytest.raises(OppassError, match="no weight of MatMul was found to protect"):
        transform_with_report(model, ops=("MatMul",))
    with pytest.warns(UserWarning, match="no weight of MatMul"):
        _, report = transform_with_report(model, ops=("MatMul",), allow_unprotected=True)

    assert report.tensors == ()
