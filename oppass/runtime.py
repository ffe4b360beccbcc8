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
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from oppass import modelio
from oppass.errors import OppassError
from oppass.modelio import PROTOBUF_LIMIT, is_protobuf_file, load_model, read_model, save_model
from oppass.schema import DOMAIN, DecodeNode, is_decode_node, read_decode_nodes

# What running a session on bad feeds raises: onnxruntime's own errors, and numpy-to-tensor conversions.
RUN_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.RuntimeException,
              ort_errors.NotImplemented, RuntimeError, ValueError, TypeError)
LIBRARY_ENV = "OPPASS_CUSTOM_OP_LIBRARY"
LIBRARY_NAME = "liboppass_ops.so"


def custom_op_library() -> str:
    """Path of the compiled ParityCheckUnpack library ($OPPASS_CUSTOM_OP_LIBRARY overrides)."""
    override = os.environ.get(LIBRARY_ENV)
    path = Path(override) if override else Path(__file__).parent / "_lib" / LIBRARY_NAME
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
    if not isinstance(model, onnx.ModelProto):
        skeleton = read_model(model, defer=True).model  # the weights stay in the files until needed
        decodes = read_decode_nodes(skeleton)  # refuses what the kernel would refuse, in one line
        if not (fold_load_checks and any(decode.check == "load" for decode in decodes)):
            return _session_from_file(Path(model), session_options(threads, config))
        model = load_model(model)
    proto = model
    decodes = read_decode_nodes(proto)
    if fold_load_checks and any(decode.check == "load" for decode in decodes):
        proto = _fold_decode_nodes(proto, decodes, threads)
    return open_session(proto, session_options(threads, config))


def open_session(model: onnx.ModelProto, options: ort.SessionOptions | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session of `model`: from its bytes, or, beyond one protobuf's 2 GB, from a temporary
    copy saved with external data (onnxruntime reads it while creating the session)."""
    if model.ByteSize() <= PROTOBUF_LIMIT:
        return _session(model.SerializeToString(), options, providers)
    with tempfile.TemporaryDirectory(prefix="oppass-session-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        return _session(str(path), options, providers)


def _session_from_file(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session opened by path (external data next to it); a text-format model through its proto."""
    if not is_protobuf_file(path):
        return open_session(load_model(path), options)
    return _session(str(path), options, None)


def _session(model: bytes | str, options: ort.SessionOptions | None, providers: list[str] | None
             ) -> ort.InferenceSession:
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


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
    """Runs the load-mode decode nodes once and replaces them by initializers of their outputs.

    Decode nodes reading the same packed tensor with the same attributes give the same weights:
    one of them runs, and the consumers of the others read its output (one decoded copy, not one
    per node, in the decoding session and in the result).
    """
    positions = [i for i, node in enumerate(proto.graph.node) if node.domain == DOMAIN]  # where `decodes` are
    folding = [(i, decode) for i, decode in zip(positions, decodes, strict=True) if decode.check == "load"]
    first: dict[tuple, DecodeNode] = {}
    for _, decode in folding:
        first.setdefault(_decoding(decode), decode)
    runs = list(first.values())
    running = {id(decode) for decode in runs}
    nodes = [proto.graph.node[i] for i, decode in folding if id(decode) in running]
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
    session = open_session(decoder, session_options(threads))
    decoded = dict(zip(outputs, session.run(outputs, {}), strict=True))
    masked = sum(int(decoded[decode.masked_output]) for decode in runs if decode.masked_output is not None)
    if masked:
        warnings.warn(f"oppass: {masked} corrupted weight words were masked at load", stacklevel=3)

    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    graph = folded.graph
    for i, _ in reversed(folding):
        del graph.node[i]
    graph_outputs = {output.name for output in graph.output}
    renamed = {}  # output of a decode node that did not run: the same output of the one that did
    for _, decode in folding:
        ran = first[_decoding(decode)]
        for name, same in ((decode.output, ran.output), (decode.masked_output, ran.masked_output)):
            if name is not None and same is not None and name != same:
                if name in graph_outputs:
                    decoded[name] = decoded[same]
                else:
                    renamed[name] = same
    graphs = list(modelio.all_graphs(graph))
    for subgraph in graphs:
        for node in subgraph.node:
            for index, name in enumerate(node.input):
                if name in renamed:
                    node.input[index] = renamed[name]
    still_used = {name for subgraph in graphs for node in subgraph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in packed_names or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in decoded.items())
    return folded


def _decoding(decode: DecodeNode) -> tuple:
    """What decides a decode node's outputs: its packed tensor and attributes (and whether it counts masked words)."""
    return (decode.packed, decode.format, decode.word_bits, decode.shape, decode.output_type,
            decode.masked_output is not None)
