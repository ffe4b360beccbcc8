"""Loads the ParityCheckUnpack custom-op library into onnxruntime and opens protected models."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from oppass.errors import OppassError
from oppass.modelio import load_model, save_model
from oppass.native import LIBRARY_ENV, LIBRARY_NAME, library_path
from oppass.schema import DOMAIN, DecodeNode, is_decode_node, read_decode_nodes

__all__ = ["LIBRARY_ENV", "LIBRARY_NAME", "custom_op_library", "load_session", "optimize_for_cpu", "session_options"]


def custom_op_library() -> str:
    """Path of the compiled ParityCheckUnpack library ($OPPASS_CUSTOM_OP_LIBRARY overrides)."""
    path = library_path()
    if not path.is_file():
        raise OppassError(f"custom-op library not found at {path}: reinstall oppass (pip install .)")
    return str(path)


def session_options(threads: int | None = None, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """SessionOptions of onnxruntime with the ParityCheckUnpack library registered, `threads` intra-op
    threads and the session config entries `config` (e.g. {"session.intra_op.allow_spinning": "0"})."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(custom_op_library())
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def load_session(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    threads: int | None = None,
    config: Mapping[str, str] | None = None,
    fold_load_checks: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for a (protected or plain) model.

    With `fold_load_checks`, decode nodes in `check=load` mode are run once here by the
    C kernel, which checks parity and masks corrupted words, and their results replace
    them as constant initializers: the consumers then get onnxruntime's weight
    prepacking exactly as in the unprotected model. Runtime-mode nodes are left alone.
    `threads` and `config` are as in `session_options`.
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    decodes = read_decode_nodes(proto)  # refuses what the kernel would refuse, in one line
    if fold_load_checks and any(decode.check == "load" for decode in decodes):
        proto = _fold_decode_nodes(proto, decodes, threads)
    return ort.InferenceSession(proto.SerializeToString(), session_options(threads, config))


def optimize_for_cpu(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The model as onnxruntime's CPU provider rewrites it on this machine, to protect in that form.

    onnxruntime converts Convs with constant weights to its NCHWc-blocked Conv (with the weights
    reordered once) and fuses activations into them; a Conv whose weight comes from a decode node
    keeps the slower plain kernel. Protecting the optimised model instead keeps the fast kernels in
    runtime check mode. The result holds onnxruntime-only operators and a weight layout that
    depends on this CPU's vector width: it runs on onnxruntime, on machines like this one.
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if any(is_decode_node(node) for node in proto.graph.node):
        raise OppassError("the model is already protected: optimise the original model, then transform it")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime warns that the result is hardware-specific: that is the point
    with tempfile.TemporaryDirectory(prefix="oppass-optimize-") as folder:
        source = Path(folder) / "source.onnx"
        save_model(proto, source)
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise OppassError(f"onnxruntime cannot optimise the model: {str(error).splitlines()[0]}") from None
        return load_model(options.optimized_model_filepath)


def _fold_decode_nodes(proto: onnx.ModelProto, decodes: list[DecodeNode], threads: int | None) -> onnx.ModelProto:
    """Runs the load-mode decode nodes once and replaces them by initializers of their outputs."""
    positions = [i for i, node in enumerate(proto.graph.node) if node.domain == DOMAIN]  # where `decodes` are
    folding = [(i, decode) for i, decode in zip(positions, decodes, strict=True) if decode.check == "load"]
    nodes = [proto.graph.node[i] for i, _ in folding]
    packed_names = {decode.packed for _, decode in folding}
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
    decoded = dict(zip(outputs, session.run(outputs, {}), strict=True))
    masked = sum(int(decoded[decode.masked_output]) for _, decode in folding if decode.masked_output is not None)
    if masked:
        warnings.warn(f"oppass: {masked} corrupted weight words were masked at load", stacklevel=3)

    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    graph = folded.graph
    for i, _ in reversed(folding):
        del graph.node[i]
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in packed_names or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in decoded.items())
    return folded
