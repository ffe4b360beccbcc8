"""Loads the ParityCheckUnpack custom-op library into onnxruntime and opens protected models."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from oppass import edit, modelio
from oppass.errors import OppassError
from oppass.formats import WEIGHT_WORD
from oppass.modelio import PROTOBUF_LIMIT, is_protobuf_file, load_model, read_model, save_model
from oppass.modelio.fields import copy_without
from oppass.native import LIBRARY_ENV, LIBRARY_NAME, library_path
from oppass.protect import (
    KEEP_FORMAT,
    RUNTIME_OPS,
    WeightLayout,
    conversion_dequantizers,
    transform_with_report,
    weight_readers,
)
from oppass.schema import (
    DOMAIN,
    FORMAT_OF_ONNX_TYPE,
    MASKED_WORDS_OUTPUT,
    DecodeNode,
    is_decode_node,
    read_decode_nodes,
)

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


# Standard ops onnxruntime's CPU optimisation may turn a weight's consumer into (MatMul + Add: Gemm), which
# `load_session` protects again where the file protected the first.
FUSED_INTO = {"MatMul": ("Gemm",)}


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
    With `optimize_runtime_checks`, a model whose decode nodes are all runtime-mode is
    re-protected for this CPU: its words are checked and decoded once (faulty words masked,
    with a warning), the plain model is optimised by onnxruntime for this machine
    (`optimize_for_cpu`: NCHWc layout, fused activations, MatMulInteger fused with its input's
    quantization) and the weights of that graph are protected again in runtime mode, each in
    its decode node's format, word size, code and range check. A weight the pass converted to
    int8 (`format="int8"`) is dequantized at load too and re-protected as fp32, in words of at
    least 32 bits with its code and range check, so onnxruntime runs its fp32 kernels on it (4x
    the resident words of int8); the model's own int8 (QDQ) and uint8 weights stay integers. The
    session then checks parity (or SEC-DED) on every run on the re-protected words, while
    keeping onnxruntime's fast kernels. What it checks on every run is those words: a fault in
    the file is caught once, at load. The re-protected words group the reordered weights
    differently, so their parity adjustment may change one more LSB per word: outputs are
    as close to the file's as the file's are to the unprotected model's, not bit-identical.
    A model keeps its decode nodes when it has load-mode ones, is already optimised, when
    onnxruntime rewrites none of its weights (uint8 ConvInteger/MatMulInteger models: its graph
    of the file is then the optimised one), or when a weight cannot be found again: one the
    optimised graph does not read under its name through an op the pass protects (onnxruntime
    folded it or fused its consumer into an operator such as QLinearConv), or a renamed fp32
    weight that matches no weight of the file in a model with several fp32 layouts.
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
    `load_session`), or None when it does not qualify.

    Each weight keeps its decode node's layout, found by the weight's name in the optimised graph.
    onnxruntime renames the fp32 weights it rewrites: those take the layout of the fp32-output
    decodes whose names are gone when that is one; with several, each is found by its values
    (NCHWc only reorders and zero-pads a weight), and a weight that matches none (a BatchNorm
    folded into it) makes the model not qualify. Nor does it qualify when another weight of the
    file is not a weight of the optimised graph under its name (onnxruntime folded it, or fused
    its consumer into an operator the pass does not protect, such as QLinearConv), when the pass
    finds fewer weights there, or when every weight keeps its name: onnxruntime rewrote none
    (the model's own int8 weights behind DequantizeLinear, uint8 ones of ConvInteger and
    MatMulInteger), so its graph of the file is the optimised graph already.
    """
    from oppass import protected_models

    if not decodes or any(decode.check != "runtime" for decode in decodes):
        return None
    if any((node.domain, node.op_type) in RUNTIME_OPS for node in proto.graph.node):
        return None  # already optimised (transform --optimize-for-cpu)
    readers = weight_readers(proto.graph)
    protected_ops = {op for decode in decodes for op in readers.get(decode.output, ())}
    if not protected_ops:
        return None
    ops = sorted(protected_ops | {fused for op in protected_ops for fused in FUSED_INTO.get(op, ())})
    first: dict[tuple, DecodeNode] = {}
    for decode in decodes:
        first.setdefault(_decoding(decode), decode)
    distinct = list(first.values())  # the fold runs these, and their outputs name the decoded weights
    layouts = {decode.output: _layout(decode) for decode in distinct}  # by the name of each weight in `plain`
    floats = {decode.output for decode in distinct if decode.output_type == TensorProto.FLOAT}
    plain = _fold_decode_nodes(proto, decodes, threads, lambda decode: True)
    for codes, weight in _fold_conversion_dequantizers(plain.graph, set(layouts)).items():
        layouts[weight] = _fp32_layout(layouts.pop(codes))
        floats.add(weight)
    counts = {name for decode in decodes for name in (decode.masked_output, decode.corrected_output) if name}
    report_faults = any(output.name == MASKED_WORDS_OUTPUT for output in plain.graph.output)
    protected_models.remove_count_sums(plain.graph, counts)
    edit.remove_initializers(plain.graph, counts)
    optimized = optimize_for_cpu(plain)
    initializers = {tensor.name for tensor in optimized.graph.initializer}
    still_read = {name for name, types in weight_readers(optimized.graph).items() if set(types) & set(ops)}
    named = {name: layout for name, layout in layouts.items() if name in initializers & still_read}
    missing = [name for name in layouts if name not in named]
    if any(name not in floats for name in missing):
        return None  # an integer or 16-bit weight onnxruntime folded, renamed or fused into an op the pass skips
    renamed = {layouts[name] for name in missing}  # fp32 weights onnxruntime rewrote (NCHWc, folds)
    if not renamed:
        return None  # onnxruntime rewrote no weight: its graph of the file is this one
    if len(renamed) > 1:
        reordered = _reordered_layouts(plain, optimized, {name: layouts[name] for name in missing},
                                       initializers & still_read - set(named))
        if reordered is None:
            return None
        named |= reordered
    default = next(iter(renamed))
    with warnings.catch_warnings():  # what the pass says about the plain model was said when it was protected
        warnings.simplefilter("ignore")
        result, report = transform_with_report(
            optimized, format=default.format, word=default.word, code=default.code, range_check=default.range_check,
            ops=ops, check="runtime", report_faults=report_faults, inplace=True, layouts=named)
    if len(report.tensors) < len(distinct):
        return None  # onnxruntime folded a weight into another (one it made constant is protected too)
    return result


def _reordered_layouts(plain: onnx.ModelProto, optimized: onnx.ModelProto, layouts: Mapping[str, WeightLayout],
                       names: set[str]) -> dict[str, WeightLayout] | None:
    """The layouts of the weights `names` of `optimized`, which onnxruntime renamed, found by their values among
    the weights of `plain` that `layouts` names: NCHWc reorders a weight and pads it with zeros, so its sorted
    nonzero values are the original's. None when a weight matches none, or weights in two layouts look alike."""
    tensors = {tensor.name: tensor for tensor in plain.graph.initializer}
    by_values: dict[bytes, WeightLayout] = {}
    for name, layout in layouts.items():
        if by_values.setdefault(_nonzero_values(tensors[name]), layout) != layout:
            return None
    found = {tensor.name: by_values.get(_nonzero_values(tensor))
             for tensor in optimized.graph.initializer if tensor.name in names}
    return None if any(layout is None for layout in found.values()) else \
        {name: layout for name, layout in found.items() if layout is not None}


def _nonzero_values(tensor: onnx.TensorProto) -> bytes:
    """A weight's nonzero values, sorted, as bytes (with its element type)."""
    values = numpy_helper.to_array(tensor).reshape(-1)
    return bytes([tensor.data_type]) + np.sort(values[values != 0]).tobytes()


def _fold_conversion_dequantizers(graph: onnx.GraphProto, decoded: set[str]) -> dict[str, str]:
    """Replaces each DequantizeLinear the pass added after an int8 conversion of a weight whose codes are in
    `decoded` by its fp32 result, computed as onnxruntime's kernel does ((code - zero point) * scale in float32);
    gives each int8 codes' name the weight's."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = [node for node in conversion_dequantizers(graph) if node.input[0] in decoded
             and all(name in initializers for name in node.input)]
    for node in nodes:
        codes, scale, zero_point = (numpy_helper.to_array(initializers[name]) for name in node.input)
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1) % codes.ndim
        shape = [-1 if dim == axis else 1 for dim in range(codes.ndim)]
        centred = codes.astype(np.int32) - zero_point.astype(np.int32).reshape(shape)
        weight = centred.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
    names = {node.name for node in nodes}
    edit.remove_nodes(graph, lambda node: node.name in names)
    edit.remove_initializers(graph, {name for node in nodes for name in node.input})
    edit.remove_value_info(graph, {node.input[0] for node in nodes})
    return {node.input[0]: node.output[0] for node in nodes}


def _fp32_layout(layout: WeightLayout) -> WeightLayout:
    """The layout of an int8 weight's dequantized fp32 values: its code and range check, in words of at least
    32 bits (an fp32 weight's own size)."""
    word = 32 if layout.word == WEIGHT_WORD or int(layout.word) < 32 else layout.word
    return WeightLayout(format=KEEP_FORMAT, word=word, code=layout.code, range_check=layout.range_check)


def _layout(decode: DecodeNode) -> WeightLayout:
    """The layout the pass stores a decode node's weight in when it protects the decoded tensor again."""
    kept = FORMAT_OF_ONNX_TYPE.get(decode.output_type) == decode.format  # bf16/fp16 widened to fp32 are converted
    word = WEIGHT_WORD if decode.word_bits == decode.weight_format.bits else decode.word_bits
    return WeightLayout(format=KEEP_FORMAT if kept else decode.format, word=word, code=decode.code,
                        range_check=decode.range_max is not None)


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
