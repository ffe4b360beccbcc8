"""Loads the ParityCheckUnpack custom-op library into onnxruntime and opens protected models."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from oppass.errors import OppassError
from oppass.modelio import load_model

LIBRARY_ENV = "OPPASS_CUSTOM_OP_LIBRARY"
LIBRARY_NAME = "liboppass_ops.so"
DOMAIN = "ai.oppass"
OP_TYPE = "ParityCheckUnpack"


def custom_op_library() -> str:
    """Path of the compiled ParityCheckUnpack library ($OPPASS_CUSTOM_OP_LIBRARY overrides)."""
    override = os.environ.get(LIBRARY_ENV)
    path = Path(override) if override else Path(__file__).parent / "_lib" / LIBRARY_NAME
    if not path.is_file():
        raise OppassError(f"custom-op library not found at {path}: reinstall oppass (pip install .)")
    return str(path)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime SessionOptions with the ParityCheckUnpack library registered."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(custom_op_library())
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def load_session(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    threads: int | None = None,
    fold_load_checks: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for a (protected or plain) model.

    With `fold_load_checks`, decode nodes in `check=load` mode are run once here by the
    C kernel, which checks parity and masks corrupted words, and their results replace
    them as constant initializers: the consumers then get onnxruntime's weight
    prepacking exactly as in the unprotected model. Runtime-mode nodes are left alone.
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    load_checked = [i for i, n in enumerate(proto.graph.node) if _is_decode(n) and _check_mode(n) == "load"]
    if fold_load_checks and load_checked:
        proto = _fold_decode_nodes(proto, load_checked, threads)
    return ort.InferenceSession(proto.SerializeToString(), session_options(threads))


def _is_decode(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def _check_mode(node: onnx.NodeProto) -> str | None:
    """The decode node's `check` attribute."""
    for attribute in node.attribute:
        if attribute.name == "check":
            return helper.get_attribute_value(attribute).decode()
    return None


def _fold_decode_nodes(proto: onnx.ModelProto, indices: list[int], threads: int | None) -> onnx.ModelProto:
    """Runs the decode nodes at `indices` once and replaces them by initializers of their outputs."""
    nodes = [proto.graph.node[i] for i in indices]
    packed_names = {node.input[0] for node in nodes}
    outputs = [name for node in nodes for name in node.output if name]
    decoder = helper.make_model(
        helper.make_graph(
            nodes=nodes,
            name="oppass_load_time_check",
            inputs=[],
            outputs=[helper.make_empty_tensor_value_info(name) for name in outputs],
            initializer=[t for t in proto.graph.initializer if t.name in packed_names],
        ),
        opset_imports=list(proto.opset_import),
        ir_version=proto.ir_version,
    )
    session = ort.InferenceSession(decoder.SerializeToString(), session_options(threads))
    decoded = dict(zip(outputs, session.run(outputs, {})))
    masked = sum(int(decoded[n.output[1]]) for n in nodes if len(n.output) > 1 and n.output[1])
    if masked:
        warnings.warn(f"oppass: {masked} corrupted weight words were masked at load", stacklevel=3)

    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    graph = folded.graph
    for i in sorted(indices, reverse=True):
        del graph.node[i]
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in packed_names or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in decoded.items())
    return folded
