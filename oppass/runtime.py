"""Loads the ParityCheckUnpack custom-op library into onnxruntime and opens protected models."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from oppass import edit, modelio
from oppass.errors import OppassError
from oppass.modelio import PROTOBUF_LIMIT, is_protobuf_file, load_model, read_model, save_model
from oppass.modelio.fields import copy_without
from oppass.native import LIBRARY_ENV, LIBRARY_NAME, library_path
from oppass.schema import DOMAIN, MASKED_WORDS_OUTPUT, DecodeNode, is_decode_node, read_decode_nodes

__all__ = ["DOMAIN", "LIBRARY_ENV", "LIBRARY_NAME", "RUN_ERRORS", "custom_op_library", "has_custom_ops",
           "load_session", "open_session", "optimize_for_cpu", "session_options"]

# What running a session on bad feeds raises: onnxruntime's own errors, and numpy-to-tensor conversions.
RUN_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.RuntimeException,
              ort_errors.NotImplemented, RuntimeError, ValueError, TypeError)


def custom_op_library() -> str:
    """Path of the compiled ParityCheckUnpack library ($OPPASS_CUSTOM_OP_LIBRARY overrides)."""
    path = library_path()
    if not path.is_file():
        raise OppassError(f"custom-op library not found at {path}: reinstall oppass (pip install .)")
    return str(path)


def session_options(
    threads: int | None = None, config: Mapping[str, str] | None = None, *, library: bool = True
) -> ort.SessionOptions:
    """SessionOptions of onnxruntime with the ParityCheckUnpack library registered (unless not `library`),
    `threads` intra-op threads and the session config entries `config` (e.g.
    {"session.intra_op.allow_spinning": "0"})."""
    options = ort.SessionOptions()
    if library:
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
    optimize_runtime_checks: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for a (protected or plain) model.

    With `fold_load_checks`, decode nodes in `check=load` mode are run once here by the
    C kernel, which checks the words (parity or SEC-DED, and the range check), masks corrupted
    words and corrects single flips (SEC-DED), and their results replace
    them as constant initializers: the consumers then get onnxruntime's weight
    prepacking exactly as in the unprotected model. Runtime-mode nodes are left alone.
    With `optimize_runtime_checks`, a model whose decode nodes are all runtime-mode, of one
    format (fp32, or bf16/fp16 decoded to float) and word size, is re-protected for this CPU:
    its words are checked and decoded once (faulty words masked, with a warning), the plain
    model is optimised by onnxruntime for this machine (`optimize_for_cpu`: NCHWc layout,
    fused activations) and the weights of that graph are protected again in runtime mode, in
    the same format and word size. The session then checks parity on every run while keeping
    onnxruntime's fast Conv kernels. The re-protected words group the reordered weights
    differently, so their parity adjustment may change one more LSB per word: outputs are
    as close to the file's as the file's are to the unprotected model's, not bit-identical.
    Other models (int8, mixed formats, already optimised ones) keep their decode nodes.
    Standard-op load checks need nothing: onnxruntime folds them itself, and the library is
    registered only for a model with ParityCheckUnpack nodes. `threads` and `config` are as in
    `session_options`.
    """
    if not isinstance(model, onnx.ModelProto):
        skeleton = read_model(model, defer=True).model  # the weights stay in the files until needed
        decodes = read_decode_nodes(skeleton)  # refuses what the kernel would refuse, in one line
        folds = fold_load_checks and any(decode.check == "load" for decode in decodes)
        if not folds and not (optimize_runtime_checks and any(decode.check == "runtime" for decode in decodes)):
            return _session_from_file(Path(model), session_options(threads, config, library=has_custom_ops(skeleton)))
        model = load_model(model)
    decodes = read_decode_nodes(model)
    # `model` is rebound, so that a model read here is freed once rewritten: one copy of the weights at a time
    optimized = _with_runtime_checks_for_this_cpu(model, decodes, threads) if optimize_runtime_checks else None
    if optimized is not None:
        model = optimized
    elif fold_load_checks and any(decode.check == "load" for decode in decodes):
        model = _fold_decode_nodes(model, decodes, threads, lambda decode: decode.check == "load")
    del optimized
    return open_session(model, session_options(threads, config, library=has_custom_ops(model)))


def has_custom_ops(model: onnx.ModelProto) -> bool:
    """Whether the model's main graph has ParityCheckUnpack nodes (which need the custom-op library)."""
    return any(is_decode_node(node) for node in model.graph.node)

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


def _with_runtime_checks_for_this_cpu(
    proto: onnx.ModelProto, decodes: list[DecodeNode], threads: int | None
) -> onnx.ModelProto | None:
    """The model re-protected in runtime mode on the graph onnxruntime optimises for this CPU (see
    `load_session`), or None when it does not qualify."""
    from oppass import protected_models
    from oppass.protect import KEEP_FORMAT, RUNTIME_OPS, WEIGHT_INPUT, transform

    layouts = {(decode.format, decode.word_bits, decode.output_type, decode.code, decode.range_max is not None)
               for decode in decodes}
    if not decodes or any(decode.check != "runtime" for decode in decodes) or len(layouts) != 1:
        return None
    fmt, word_bits, output_type, code, range_check = layouts.pop()
    if fmt not in ("fp32", "bf16", "fp16") or output_type != TensorProto.FLOAT:
        return None
    if any((node.domain, node.op_type) in RUNTIME_OPS for node in proto.graph.node):
        return None  # already optimised (transform --optimize-for-cpu)
    outputs = {decode.output for decode in decodes}
    ops = sorted({node.op_type for node in proto.graph.node if node.domain in ("", "ai.onnx")
                  and node.op_type in WEIGHT_INPUT and set(node.input) & outputs})
    if not ops:
        return None
    plain = _fold_decode_nodes(proto, decodes, threads, lambda decode: True)
    counts = {name for decode in decodes for name in (decode.masked_output, decode.corrected_output) if name}
    report_faults = any(output.name == MASKED_WORDS_OUTPUT for output in plain.graph.output)
    protected_models.remove_count_sums(plain.graph, counts)
    edit.remove_initializers(plain.graph, counts)
    with warnings.catch_warnings():  # what the pass says about the plain model was said when it was protected
        warnings.simplefilter("ignore")
        return transform(optimize_for_cpu(plain), format=KEEP_FORMAT if fmt == "fp32" else fmt, word=word_bits,
                         ops=ops, check="runtime", report_faults=report_faults, inplace=True, code=code,
                         range_check=range_check)


def _fold_decode_nodes(
    proto: onnx.ModelProto, decodes: list[DecodeNode], threads: int | None, fold: Callable[[DecodeNode], bool]
) -> onnx.ModelProto:
    """Runs the decode nodes for which `fold` holds once and replaces them by initializers of their outputs.

    Decode nodes reading the same packed tensor with the same attributes give the same weights:
    one of them runs, and the consumers of the others read its output (one decoded copy, not one
    per node, in the decoding session and in the result).
    """
    positions = [i for i, node in enumerate(proto.graph.node) if node.domain == DOMAIN]  # where `decodes` are
    folding = [(i, decode) for i, decode in zip(positions, decodes, strict=True) if fold(decode)]
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
    del session, decoder  # onnxruntime's copies of the packed tensors, and the decoding model's own
    masked = sum(int(decoded[decode.masked_output]) for decode in runs if decode.masked_output is not None)
    if masked:
        warnings.warn(f"oppass: {masked} corrupted weight words were masked at load", stacklevel=3)
    corrected = sum(int(decoded[decode.corrected_output]) for decode in runs if decode.corrected_output is not None)
    if corrected:
        warnings.warn(f"oppass: {corrected} weight words with a flipped bit were corrected at load", stacklevel=3)

    folded = copy_without(proto, ("graph",))  # without copying the packed tensors it drops
    folded.graph.CopyFrom(copy_without(proto.graph, ("initializer",)))
    graph = folded.graph
    for i, _ in reversed(folding):
        del graph.node[i]
    graph_outputs = {output.name for output in graph.output}
    renamed = {}  # output of a decode node that did not run: the same output of the one that did
    for _, decode in folding:
        ran = first[_decoding(decode)]
        for name, same in ((decode.output, ran.output), (decode.masked_output, ran.masked_output),
                           (decode.corrected_output, ran.corrected_output)):
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
    graph.initializer.extend(t for t in proto.graph.initializer if t.name not in packed_names or t.name in still_used)
    for name in list(decoded):  # one decoded weight at a time as a tensor: each array freed once copied
        graph.initializer.add().CopyFrom(numpy_helper.from_array(decoded.pop(name), name))
    return folded


def _decoding(decode: DecodeNode) -> tuple:
    """What decides a decode node's outputs: its packed tensor and attributes (and which words it counts)."""
    return (decode.packed, decode.format, decode.word_bits, decode.shape, decode.output_type, decode.code,
            decode.range_max, decode.masked_output is not None, decode.corrected_output is not None)
