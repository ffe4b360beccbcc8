"""Loads the ParityCheckUnpack custom-op library into onnxruntime and opens protected models."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from oppass import edit, modelio, tensorio
from oppass.errors import OppassError
from oppass.formats import WEIGHT_WORD
from oppass.modelio import PROTOBUF_LIMIT, is_protobuf_file, load_model, read_model, save_model
from oppass.native import LIBRARY_ENV, LIBRARY_NAME, library_path
from oppass.protect import (
    KEEP_FORMAT,
    RUNTIME_OPS,
    WeightLayout,
    conversion_dequantizers,
    transform_file,
    weight_readers,
)
from oppass.schema import (
    DOMAIN,
    FORMAT_OF_ONNX_TYPE,
    MASKED_WORDS_OUTPUT,
    DecodeNode,
    StandardDecodes,
    is_decode_node,
    make_decode_node,
    read_decode_nodes,
    read_standard_decodes,
)

__all__ = ["DOMAIN", "LIBRARY_ENV", "LIBRARY_NAME", "RUN_ERRORS", "custom_op_library", "has_custom_ops",
           "load_session", "open_session", "optimize_for_cpu", "session_from_file", "session_options"]

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

    With `fold_load_checks`, decode nodes in `check=load` mode and standard-op load checks
    (`check="load"`) are run once here by the C kernel, which checks the words (parity or
    SEC-DED, and the range check), masks corrupted words and corrects single flips (SEC-DED),
    and their results replace them as constant initializers: the consumers then get
    onnxruntime's weight prepacking exactly as in the unprotected model. A standard-op chain
    runs as the ParityCheckUnpack node of its record, which computes the same weights bit for
    bit (docs/FORMAT.md), one weight at a time: onnxruntime's own folding of the chains keeps
    every intermediate of every chain until it ends (1034 MiB for one 64 MiB fp32 weight) and
    leaves a chain above its folding limit to run on every inference. Runtime-mode nodes are
    left alone.
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
    The session's library is registered only for a model still holding ParityCheckUnpack nodes.
    `threads` and `config` are as in `session_options`.
    The models it builds (folded, re-protected) are written to a temporary folder with external data and
    opened by path: onnxruntime maps their weights from the files, and each weight is decoded on its own
    (its packed words and its decoded values in memory, not the model's), so the peak memory is a few
    times the largest weight, not a few copies of the model.
    """
    with tempfile.TemporaryDirectory(prefix="oppass-session-") as name:
        folder = Path(name)
        if isinstance(model, onnx.ModelProto):
            save_model(model, folder / "input.onnx", external_data=True)
            model = folder / "input.onnx"
        source = read_model(model, defer=True)  # the weights stay in the files until needed
        decodes = read_decode_nodes(source.model)  # refuses what the kernel would refuse, in one line
        path = _with_runtime_checks_for_this_cpu(source, decodes, threads, folder) if optimize_runtime_checks \
            else None
        standard = read_standard_decodes(source.model) if fold_load_checks else StandardDecodes()
        if path is None and fold_load_checks and (standard.decodes or any(d.check == "load" for d in decodes)):
            path = _Fold(source, decodes, threads, lambda decode: decode.check == "load", standard).save(
                folder / "folded.onnx")
        opened = source if path is None else read_model(path, defer=True)
        options = session_options(threads, config, library=has_custom_ops(opened.model))
        return session_from_file(opened.path, options)  # onnxruntime maps the data files: they may go after


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


def session_from_file(path: str | os.PathLike, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session of the model file `path`, opened by path (onnxruntime maps its external data); a text-format
    model through its proto."""
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
    with tempfile.TemporaryDirectory(prefix="oppass-optimize-") as folder:
        source = Path(folder) / "source.onnx"
        save_model(proto, source)
        return load_model(_optimized_file(source, Path(folder) / "optimized.onnx"))


def _optimized_file(source: Path, target: Path) -> Path:
    """Writes onnxruntime's CPU optimisation of the plain model file `source` to `target`, its weights as
    external data in `<target>.data`; gives `target`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime warns that the result is hardware-specific: that is the point
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise OppassError(f"onnxruntime cannot optimise the model: {str(error).splitlines()[0]}") from None
    return target


def _with_runtime_checks_for_this_cpu(
    source: modelio.ModelFile, decodes: list[DecodeNode], threads: int | None, folder: Path
) -> Path | None:
    """The model re-protected in runtime mode on the graph onnxruntime optimises for this CPU (see
    `load_session`), written in `folder`, or None when it does not qualify.

    `source` is read with `defer=True`; the plain, optimised and re-protected models are files in
    `folder`, each weight read, decoded or encoded on its own. Each weight keeps its decode
    node's layout, found by the weight's name in the optimised graph.
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

    proto = source.model
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
    fold = _Fold(source, decodes, threads, lambda decode: True)
    for codes, weight in fold.dequantize_conversions(set(layouts)).items():
        layouts[weight] = _fp32_layout(layouts.pop(codes))
        floats.add(weight)
    plain_graph = fold.model.graph
    counts = {name for decode in decodes for name in (decode.masked_output, decode.corrected_output) if name}
    report_faults = any(output.name == MASKED_WORDS_OUTPUT for output in plain_graph.output)
    protected_models.remove_count_sums(plain_graph, counts)
    edit.remove_initializers(plain_graph, counts)
    plain = read_model(fold.save(folder / "plain.onnx"), defer=True)
    optimized = read_model(_optimized_file(plain.path, folder / "optimized.onnx"), defer=True)
    initializers = {tensor.name for tensor in optimized.model.graph.initializer}
    still_read = {name for name, types in weight_readers(optimized.model.graph).items() if set(types) & set(ops)}
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
    result = folder / "reprotected.onnx"
    with warnings.catch_warnings():  # what the pass says about the plain model was said when it was protected
        warnings.simplefilter("ignore")
        report = transform_file(
            optimized, result, format=default.format, word=default.word, code=default.code,
            range_check=default.range_check, ops=ops, check="runtime", report_faults=report_faults, layouts=named)
    if len(report.tensors) < len(distinct):
        return None  # onnxruntime folded a weight into another (one it made constant is protected too)
    return result


def _reordered_layouts(plain: modelio.ModelFile, optimized: modelio.ModelFile, layouts: Mapping[str, WeightLayout],
                       names: set[str]) -> dict[str, WeightLayout] | None:
    """The layouts of the weights `names` of `optimized`, which onnxruntime renamed, found by their values among
    the weights of `plain` that `layouts` names: NCHWc reorders a weight and pads it with zeros, so its sorted
    nonzero values are the original's. None when a weight matches none, or weights in two layouts look alike.
    Both models are read with `defer=True`: one weight at a time is read, and only its digest kept."""
    tensors = {tensor.name: tensor for tensor in plain.model.graph.initializer}
    by_values: dict[bytes, WeightLayout] = {}
    for name, layout in layouts.items():
        if by_values.setdefault(_nonzero_values(plain, tensors[name]), layout) != layout:
            return None
    found = {tensor.name: by_values.get(_nonzero_values(optimized, tensor))
             for tensor in optimized.model.graph.initializer if tensor.name in names}
    return None if any(layout is None for layout in found.values()) else \
        {name: layout for name, layout in found.items() if layout is not None}


def _nonzero_values(source: modelio.ModelFile, tensor: onnx.TensorProto) -> bytes:
    """The digest of a weight's nonzero values, sorted (with its element type)."""
    values = _array(source, tensor, "weight").reshape(-1)
    return hashlib.sha256(bytes([tensor.data_type]) + np.sort(values[values != 0]).tobytes()).digest()


def _array(source: modelio.ModelFile, tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """A tensor's values (read-only), read from the files if they are still there."""
    return tensorio.to_array(tensor, what, source.tensor_bytes(tensor) if tensor.data_location == TensorProto.EXTERNAL
                             else None)


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


class _Fold:
    """A model whose decode nodes for which `fold` holds, and the standard-op chains `standard`, are replaced by
    initializers of their outputs, each decoded by the C kernel when the model is saved (`save`): the consumers
    then get onnxruntime's weight prepacking exactly as in the unprotected model.

    `source` is read with `defer=True`. Decode nodes reading the same packed tensor with the same
    attributes give the same weights: one of them runs, and the consumers of the others read its
    output (one decoded copy, not one per node). Each runs on its own when the save reaches its
    weight: its packed words read from the file, fed to a session of that node alone in runtime
    mode (which checks them as the load check would), the decoded weight written and dropped.
    """

    def __init__(self, source: modelio.ModelFile, decodes: list[DecodeNode], threads: int | None,
                 fold: Callable[[DecodeNode], bool], standard: StandardDecodes | None = None) -> None:
        proto = source.model
        standard = StandardDecodes() if standard is None else standard
        positions = [i for i, node in enumerate(proto.graph.node) if node.domain == DOMAIN]  # where `decodes` are
        folding = [(i, decode) for i, decode in zip(positions, decodes, strict=True) if fold(decode)]
        # A standard-op chain runs as the ParityCheckUnpack node of the same attributes (FORMAT.md: the same words)
        kernel_nodes = [(proto.graph.node[i], decode) for i, decode in folding] + [
            (make_decode_node(dataclasses.replace(decode, standard_ops=False)), decode) for decode in standard.decodes]
        packed = {tensor.name: tensor for tensor in proto.graph.initializer}
        runs: dict[tuple, _Decoding] = {}
        for node, decode in kernel_nodes:
            if _decoding(decode) not in runs:
                runs[_decoding(decode)] = _Decoding(source, node, decode, packed[decode.packed], threads)
        self.source, self.runs = source, list(runs.values())
        self.model = edit.copy_model(proto)  # a skeleton: its large tensors are still in the files
        graph = self.model.graph
        for i, _ in reversed(folding):
            del graph.node[i]
        edit.remove_nodes(graph, lambda node: node.name in standard.nodes)
        edit.remove_initializers(graph, standard.constants)
        graph_outputs = {output.name for output in graph.output}
        produced: dict[str, _Decoded | _Dequantized] = {}
        renamed = {}  # output of a decode node that did not run: the same output of the one that did
        for _, decode in kernel_nodes:
            run = runs[_decoding(decode)]
            for index, (name, same) in enumerate(zip(_outputs(decode), _outputs(run.decode), strict=True)):
                if name is None or same is None:
                    continue
                if name == same or name in graph_outputs:
                    produced[name] = _Decoded(run, index)
                else:
                    renamed[name] = same
        graphs = list(modelio.all_graphs(graph))
        for subgraph in graphs:
            for node in subgraph.node:
                for index, name in enumerate(node.input):
                    if name in renamed:
                        node.input[index] = renamed[name]
        still_used = {name for subgraph in graphs for node in subgraph.node for name in node.input}
        edit.remove_initializers(graph, {decode.packed for _, decode in kernel_nodes} - still_used)
        for name, producer in produced.items():
            modelio.add_placeholder(graph, name, producer.data_type, producer.dims)
        self.produced = produced

    def dequantize_conversions(self, decoded: set[str]) -> dict[str, str]:
        """Replaces each DequantizeLinear the pass added after an int8 conversion of a weight whose codes are in
        `decoded` by its fp32 result, computed as onnxruntime's kernel does ((code - zero point) * scale in
        float32) when saved; gives each int8 codes' name the weight's."""
        graph = self.model.graph
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        nodes = [node for node in conversion_dequantizers(graph) if node.input[0] in decoded
                 and isinstance(self.produced.get(node.input[0]), _Decoded)
                 and all(name in initializers for name in node.input)]
        for node in nodes:
            codes = self.produced.pop(node.input[0])
            assert isinstance(codes, _Decoded)
            scale, zero_point = (_array(self.source, initializers[name], "quantization parameter")
                                 for name in node.input[1:3])
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
            weight = _Dequantized(codes, scale, zero_point, axis % len(codes.dims))
            modelio.add_placeholder(graph, node.output[0], weight.data_type, weight.dims)
            self.produced[node.output[0]] = weight
        names = {node.name for node in nodes}
        edit.remove_nodes(graph, lambda node: node.name in names)
        edit.remove_initializers(graph, {name for node in nodes for name in node.input})
        edit.remove_value_info(graph, {node.input[0] for node in nodes})
        return {node.input[0]: node.output[0] for node in nodes}

    def save(self, path: Path) -> Path:
        """Writes the model to `path` with external data, decoding each weight as the save reaches it, and warns of
        the words the checks masked or corrected; gives `path`."""
        kept = {tensor.name for tensor in self.model.graph.initializer}
        produced = {name: producer for name, producer in self.produced.items() if name in kept}
        modelio.save_model(self.model, path, external_data=True, source=modelio.ProducingModelFile(
            self.model, self.source.path, self.source.data_files, deferred=True, produced=produced))
        masked = sum(run.counts[0] for run in self.runs if run.counts is not None)
        if masked:
            warnings.warn(f"oppass: {masked} corrupted weight words were masked at load", stacklevel=4)
        corrected = sum(run.counts[1] for run in self.runs if run.counts is not None)
        if corrected:
            warnings.warn(f"oppass: {corrected} weight words with a flipped bit were corrected at load", stacklevel=4)
        return path


class _Decoding:
    """One decode node run on its packed words: a session of the node alone, in runtime mode, the words fed."""

    def __init__(self, source: modelio.ModelFile, node: onnx.NodeProto, decode: DecodeNode, packed: TensorProto,
                 threads: int | None) -> None:
        self.source, self.decode, self.packed, self.threads = source, decode, packed, threads
        self.node = onnx.NodeProto()
        self.node.CopyFrom(node)
        for attribute in self.node.attribute:
            if attribute.name == "check":
                attribute.s = b"runtime"  # the same check, of words fed instead of read at kernel creation
        self.counts: tuple[int, int] | None = None  # masked and corrected words, once run

    def run(self) -> list[np.ndarray | None]:
        """The decode node's outputs (weights, masked and corrected words; None where it has none)."""
        names = [name for name in _outputs(self.decode) if name is not None]
        model = helper.make_model(
            helper.make_graph([self.node], "oppass_load_time_check",
                              [helper.make_tensor_value_info(self.decode.packed, self.packed.data_type,
                                                             list(self.packed.dims))],
                              [helper.make_empty_tensor_value_info(name) for name in names]),
            opset_imports=list(self.source.model.opset_import), ir_version=self.source.model.ir_version)
        words = _array(self.source, self.packed, "packed tensor")
        results = dict(zip(names, _session(model.SerializeToString(), session_options(self.threads), None)
                           .run(names, {self.decode.packed: words}), strict=True))
        del words
        outputs = [None if name is None else results.pop(name) for name in _outputs(self.decode)]
        self.counts = tuple(0 if count is None else int(count) for count in outputs[1:])  # type: ignore[assignment]
        return outputs


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """Producer of output `index` of a decode node, which it runs (counts: once; weights: each time)."""

    run: _Decoding
    index: int

    @property
    def data_type(self) -> int:
        return self.run.decode.output_type if self.index == 0 else TensorProto.INT64

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.run.decode.shape) if self.index == 0 else ()

    @property
    def nbytes(self) -> int:
        """Bytes of the output."""
        return math.prod(self.dims) * helper.tensor_dtype_to_np_dtype(self.data_type).itemsize

    def write(self, stream: BinaryIO) -> None:
        """Writes the output's bytes."""
        if self.index:
            counts = self.run.counts
            if counts is None:
                self.run.run()
                counts = self.run.counts
            assert counts is not None
            stream.write(np.int64(counts[self.index - 1]).astype("<i8").tobytes())
            return
        _write_array(stream, self.values())

    def values(self) -> np.ndarray:
        """The decoded weights."""
        weights = self.run.run()[0]
        assert weights is not None
        return weights


@dataclasses.dataclass(frozen=True)
class _Dequantized:
    """Producer of the fp32 weights of a decoded int8 conversion: (code - zero point) * scale in float32."""

    codes: _Decoded
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    data_type = TensorProto.FLOAT

    @property
    def dims(self) -> tuple[int, ...]:
        return self.codes.dims

    @property
    def nbytes(self) -> int:
        """Bytes of the fp32 weights."""
        return math.prod(self.dims) * 4

    def write(self, stream: BinaryIO) -> None:
        """Writes the weights, computed in place of one float32 array (exact: codes and zero points are int8)."""
        codes = self.codes.values()
        shape = [-1 if dim == self.axis else 1 for dim in range(codes.ndim)]
        weights = codes.astype(np.float32)
        del codes
        weights -= self.zero_point.astype(np.float32).reshape(shape)
        weights *= self.scale.astype(np.float32).reshape(shape)
        _write_array(stream, weights)


def _write_array(stream: BinaryIO, array: np.ndarray) -> None:
    stream.write(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).reshape(-1)
                 .view(np.uint8).data)


def _outputs(decode: DecodeNode) -> tuple[str | None, str | None, str | None]:
    """A decode node's outputs: weights, masked and corrected words (None where it has none)."""
    return decode.output, decode.masked_output, decode.corrected_output


def _decoding(decode: DecodeNode) -> tuple:
    """What decides a decode node's outputs: its packed tensor and attributes (and which words it counts)."""
    return (decode.packed, decode.format, decode.word_bits, decode.shape, decode.output_type, decode.code,
            decode.range_max, decode.masked_output is not None, decode.corrected_output is not None)
