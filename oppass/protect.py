"""The ONNX graph pass: packs Conv/Gemm weights into protected words (parity or SEC-DED, optionally range-checked)
behind ParityCheckUnpack nodes.

For every protected weight the pass

1. finds it: input 1 of a Conv/Gemm/... node that is an initializer, a Constant node's
   output, or the output of a DequantizeLinear fed by one (QDQ: the int8/uint8 tensor is
   protected and the DequantizeLinear stays);
2. replaces its definition by a packed initializer `<name>::op_packed` (docs/FORMAT.md)
   and one `ParityCheckUnpack` node whose output keeps the weight's name, so consumers,
   graph inputs and graph outputs are untouched (a weight converted to int8 gets a
   DequantizeLinear after the decode, which then produces the name);
3. records value_info (type and shape) for every decode output.

With `check="load"` the decode is not a ParityCheckUnpack node but its standard-op chain
(oppass/standard_decode.py), listed in the metadata entry `oppass.standard_decodes`
(schema.py); the model is first converted to opset 26 with onnx's version converter when it
is older. Every other mode emits ParityCheckUnpack nodes (`check="load-custom"`: the node's
`check` attribute is "load").

All decode nodes go at the front of the main graph: their only inputs are initializers,
so the node list stays topologically sorted, and weights of If/Loop subgraphs become
outer-scope values of those subgraphs. One masked-word counter per decode can be summed
into the graph output `oppass_masked_words`, and with SEC-DED one corrected-word counter
per decode into `oppass_corrected_words`. With the range check each decode node stores its
weight's fault-free maximum |w| (`range_max`); a weight holding a NaN or an infinity gets none.

Weights the pass leaves alone, with a warning: initializers that are also graph inputs
(the user may feed them), names defined in several graph scopes, tensors whose dtype has
no weight format (float64, int32, ...) when `format="keep"`. With an explicit `format`,
a weight that cannot be stored in it (anything but fp32 or that format itself) is an error.

The pass edits the ONNX protobuf directly instead of round-tripping through
onnx-graphsurgeon: graphsurgeon 0.6.1's export moved an outer-scope initializer used in
an If branch into the branch and kept only the producer fields, IR version and opsets of
the model, dropping the rest of its metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from oppass import codec, edit, modelio, tensorio
from oppass.encoder import CHUNK_WEIGHTS, Figures, ReferenceNeeded, TensorEncoder
from oppass.errors import OppassError
from oppass.formats import CODES, DEFAULT_OPS, FLIP_STRATEGIES, FORMATS, PARITY, SECDED
from oppass.reports import TensorReport, TransformReport
from oppass.schema import (
    CHECK_MODES,
    CORRECTED_WORDS_OUTPUT,
    CORRECTED_WORDS_SUM,
    DOMAIN,
    DOMAIN_VERSION,
    FORMAT_OF_ONNX_TYPE,
    MASKED_WORDS_OUTPUT,
    MASKED_WORDS_SUM,
    NODE_CHECKS,
    ONNX_TYPES,
    STANDARD_DECODES_KEY,
    STANDARD_OPS_CHECK,
    DecodeNode,
    chain_prefix,
    has_standard_decodes,
    make_decode_node,
    standard_decode_chain,
    standard_decodes_metadata,
    tensor_type_name,
)
from oppass.standard_decode import IR_VERSION, OPSET

# `format="keep"`: each weight stays in its own format.
KEEP_FORMAT = "keep"
FORMAT_CHOICES = (KEEP_FORMAT, *(name for name, weight_format in FORMATS.items() if weight_format.converted_from_fp32))
PER_AXIS_DEQUANTIZE_OPSET = 13
# onnxruntime folds no node whose output exceeds this many bytes (its default
# optimization.constant_folding_max_output_size_in_bytes).
FOLDING_LIMIT = 2**30

# Bytes per write of a packed weight: on this project's machine (Linux 6, ext4) one 4 MiB write() took
# 7.5 s per GiB where the same bytes in 256 KiB writes took 0.65 s (tools/bench, large-transform).
WRITE_SLICE = 256 * 1024

# Weight input index of each op type the pass can protect.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "Gemm": 1, "MatMul": 1, "MatMulInteger": 1}
# onnxruntime's own kernels found in models it has optimised (`runtime.optimize_for_cpu`), and the
# standard op whose weight input and output-channel axis each has: its NCHWc-blocked Conv, Conv and
# Gemm fused with an activation, and MatMulInteger fused with the quantization of its input
# (DynamicQuantizeMatMul) or with the scaling of its result (MatMulIntegerToFloat).
RUNTIME_OPS = {
    ("com.microsoft.nchwc", "Conv"): "Conv",
    ("com.microsoft", "FusedConv"): "Conv",
    ("com.microsoft", "FusedGemm"): "Gemm",
    ("com.microsoft", "DynamicQuantizeMatMul"): "MatMulInteger",
    ("com.microsoft", "MatMulIntegerToFloat"): "MatMulInteger",
}


@dataclass(frozen=True)
class WeightLayout:
    """How one weight is stored, where `transform(layouts=...)` overrides the options for it: its format
    (KEEP_FORMAT or one to convert fp32 to), word size, code and whether its decode has the range check."""

    format: str = KEEP_FORMAT
    word: str | int = "64"
    code: str = PARITY
    range_check: bool = False


@dataclass(frozen=True)
class _Options:
    format: str
    word: str | int
    flip: str | None
    ops: tuple[str, ...]
    check: str
    report_faults: bool
    code: str
    range_check: bool

    @property
    def counts_corrections(self) -> bool:
        """Whether the decode nodes report corrected words (SEC-DED with --report-faults)."""
        return self.report_faults and self.code == SECDED

    def laid_out(self, layout: WeightLayout) -> _Options:
        """These options with `layout`'s format, word size, code and range check (a flip strategy only for parity)."""
        return _validated_options(layout.format, layout.word, self.flip if layout.code == PARITY else None, self.ops,
                                  self.check, self.report_faults, layout.code, layout.range_check)


@dataclass
class _Site:
    """A weight tensor to protect: where it is defined and which protected nodes read it."""

    name: str
    graph: onnx.GraphProto
    tensor: TensorProto
    constant_node: onnx.NodeProto | None
    quantized: bool
    axes: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Protected:
    """The nodes, initializers and value_info that replace one weight; `packed` becomes its first initializer."""

    packed: _PackedWeight
    decode: DecodeNode
    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]
    value_info: list[onnx.ValueInfoProto]


_WeightSource = modelio.ModelFile | modelio.LazyCopy | None  # where weights not in the tensors are read


@dataclass
class _PackedWeight:
    """A weight's packed initializer, encoded when its bytes are written (a `modelio.Producer`).

    `write` reads the weight from `source` in chunks, converts and encodes each and writes it
    before reading the next (`oppass.encoder`), and leaves the weight's `report`. `range_max` is
    the range check's bound, measured beforehand by `fault_free_max` (None: no range check, or
    a weight is NaN or infinite).
    """

    site: _Site
    options: _Options
    source: _WeightSource
    source_format: str
    target: str
    word_bits: int
    axis: int
    output_type: int
    shape: tuple[int, ...]
    packed_dtype: np.dtype
    packed_shape: tuple[int, int]
    scales: np.ndarray | None
    range_max: float | None = None
    placeholder: TensorProto | None = None
    report: TensorReport | None = None

    @property
    def nbytes(self) -> int:
        return self.packed_dtype.itemsize * math.prod(self.packed_shape)

    def fault_free_max(self) -> float | None:
        """The largest |w| a fault-free decode outputs (None when a weight is NaN or infinite), by a first pass
        that encodes the weight chunk by chunk and keeps none of its bytes."""
        return self._encode(lambda packed: None, measure_range=True).fault_free_max

    def write(self, stream: BinaryIO) -> None:
        def write_slices(packed: memoryview) -> None:
            for start in range(0, len(packed), WRITE_SLICE):
                stream.write(packed[start:start + WRITE_SLICE])

        figures = self._encode(write_slices, measure_range=False)
        self.report = TensorReport(
            name=self.site.name,
            source_format=self.source_format,
            stored_format=self.target,
            word_bits=self.word_bits,
            code=self.options.code,
            range_max=self.range_max,
            weights=math.prod(self.shape),
            bytes_before=FORMATS[self.source_format].dtype.itemsize * math.prod(self.shape),
            bytes_after=self.nbytes + (0 if self.scales is None else self.scales.nbytes),
            changed_words=figures.changed_words,
            max_weight_change=figures.max_weight_change,
            max_conversion_error=figures.max_conversion_error,
            subnormals_before=figures.subnormals_before,
            subnormals_after=figures.subnormals_after,
            nonfinite_weights=figures.nonfinite_weights,
        )

    def _encode(self, sink: Callable[[memoryview], None], *, measure_range: bool) -> Figures:
        """Reads, encodes and hands `sink` the packed bytes chunk by chunk, the padding last; the figures."""
        encoder = self._encoder(measure_range=measure_range)
        try:
            for chunk in _weight_chunks(self.site.tensor, self.source, encoder.chunk_weights):
                sink(encoder.encode(chunk).data)
        except ReferenceNeeded:  # the codec raises the error, worded as for every other weight
            reference = self._encoder(measure_range=measure_range, reference=True)
            reference.encode(_weights(self.site.tensor, self.source).reshape(-1))
            raise RuntimeError(f"the chunked encoder and the numpy codec disagree on weight {self.site.name!r}") \
                from None
        sink(memoryview(encoder.tail))
        return encoder.figures()

    def _encoder(self, *, measure_range: bool, reference: bool = False) -> TensorEncoder:
        return TensorEncoder(
            name=self.site.name, source_format=self.source_format, target_format=self.target,
            word_bits=self.word_bits, code=self.options.code, flip=self.options.flip,
            checked=self.options.check != "none", output_dtype=helper.tensor_dtype_to_np_dtype(self.output_type),
            shape=self.shape, axis=self.axis, scales=self.scales, measure_range=measure_range, reference=reference,
        )


def transform(
    model: onnx.ModelProto | modelio.ModelFile | str | os.PathLike,
    *,
    format: str = KEEP_FORMAT,
    word: str | int = "64",
    flip: str | None = None,
    ops: Sequence[str] = DEFAULT_OPS,
    check: str = "runtime",
    report_faults: bool = False,
    inplace: bool = False,
    code: str = PARITY,
    range_check: bool = False,
    allow_unprotected: bool = False,
    layouts: Mapping[str, WeightLayout] | None = None,
) -> onnx.ModelProto:
    """A protected copy of `model` (see the module docstring); the input is not modified unless asked.

    `model` is a ModelProto, a path, or a `modelio.ModelFile`. Each weight is read, encoded
    and replaced one at a time, and the copy made of a ModelProto gets only the weights the
    pass keeps (`modelio.lazy_copy`); a path is read the same way from the file. With
    `inplace`, a ModelProto is protected in place and returned. A ModelFile is always
    protected in place, its weights still in the files (read with `defer=True`) read one at
    a time: save it with `modelio.save_model(..., source=it)`. After an error, a model
    protected in place may be left half protected.

    `code` is `parity` (opportunistic parity; `flip` chooses the weight, default word-lsb) or
    `secded` (SEC-DED inside each word; `flip` must be None). `range_check` adds the range
    check to every decode node. A model with no weight to protect is an error, unless
    `allow_unprotected` (then it is returned unprotected, with a warning). `layouts` stores the
    weights it names (by their tensor's name) in their own layout instead of the options' format,
    word size, code and range check; a name that is not a weight the pass protects is an error.
    """
    protected, _ = transform_with_report(
        model, format=format, word=word, flip=flip, ops=ops, check=check, report_faults=report_faults,
        inplace=inplace, code=code, range_check=range_check, allow_unprotected=allow_unprotected, layouts=layouts,
    )
    return protected


def transform_with_report(
    model: onnx.ModelProto | modelio.ModelFile | str | os.PathLike,
    *,
    format: str = KEEP_FORMAT,
    word: str | int = "64",
    flip: str | None = None,
    ops: Sequence[str] = DEFAULT_OPS,
    check: str = "runtime",
    report_faults: bool = False,
    inplace: bool = False,
    code: str = PARITY,
    range_check: bool = False,
    allow_unprotected: bool = False,
    layouts: Mapping[str, WeightLayout] | None = None,
) -> tuple[onnx.ModelProto, TransformReport]:
    """Like `transform`, also returning what was done to each weight."""
    options = _validated_options(format, word, flip, ops, check, report_faults, code, range_check)
    site_options = {name: options.laid_out(layout) for name, layout in (layouts or {}).items()}
    source: modelio.ModelFile | modelio.LazyCopy | None  # where weights not in the tensors are read
    if isinstance(model, onnx.ModelProto):
        source = None if inplace else modelio.lazy_copy(model)  # the weights the pass replaces are never copied
        result = model if source is None else source.model
    else:
        source = model if isinstance(model, modelio.ModelFile) else modelio.read_model(model, defer=True)
        result = source.model
    packed_weights = _protect_in_place(result, options, source, allow_unprotected, site_options)
    for packed in packed_weights:  # one weight's arrays at a time
        assert packed.placeholder is not None
        modelio.fill_placeholder(packed.placeholder, packed)
        packed.site.tensor.ClearField("raw_data")  # its packed form exists; its definition is gone
    if source is not None and source is not model:
        source.load_deferred()  # a model read or copied here is returned whole
    return result, _report(packed_weights)


def transform_to_placeholders(
    model: str | os.PathLike,
    *,
    format: str = KEEP_FORMAT,
    word: str | int = "64",
    flip: str | None = None,
    ops: Sequence[str] = DEFAULT_OPS,
    check: str = "runtime",
    report_faults: bool = False,
    code: str = PARITY,
    range_check: bool = False,
    allow_unprotected: bool = False,
) -> tuple[onnx.ModelProto, dict[str, modelio.Producer]]:
    """The model file `model` protected (options as in `transform`) with each packed initializer left a
    placeholder (`modelio.is_placeholder`, its dims and type set), and the producer of each by its name: the
    caller has each weight encoded where it wants it, one at a time, from the file (which must stay as it is
    until then). The model's other tensors are loaded. `allow_unprotected` as in `transform`."""
    options = _validated_options(format, word, flip, ops, check, report_faults, code, range_check)
    read = modelio.read_model(model, defer=True)
    packed_weights = _protect_in_place(read.model, options, read, allow_unprotected)
    for tensor in modelio.all_tensors(read.model):
        if external_data_helper.uses_external_data(tensor) and not modelio.is_placeholder(tensor):
            read.load_stored(tensor)
    producers: dict[str, modelio.Producer] = {}
    for packed in packed_weights:
        assert packed.placeholder is not None
        producers[packed.placeholder.name] = packed
    return read.model, producers


def transform_file(
    model: modelio.ModelFile | str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str = KEEP_FORMAT,
    word: str | int = "64",
    flip: str | None = None,
    ops: Sequence[str] = DEFAULT_OPS,
    check: str = "runtime",
    report_faults: bool = False,
    code: str = PARITY,
    range_check: bool = False,
    allow_unprotected: bool = False,
    layouts: Mapping[str, WeightLayout] | None = None,
) -> TransformReport:
    """Protects the model file `model` into the file `output` (options as in `transform`), streaming.

    Each weight is read, encoded and written before the next is read: the packed weights are
    encoded while the output is written (`modelio.ProducingModelFile`), so memory holds the
    model's structure and one chunk of one weight, whatever the model's size: the C encoder
    encodes parity chunks, the numpy codec SEC-DED ones (and parity ones without the C encoder).
    With `range_check` each weight is encoded twice, a first pass measuring the bound its decode
    node holds, which is written before the packed bytes; an int8 conversion reads each weight
    twice, a first pass measuring its per-channel scales.
    The input is never modified; the output (model and data file) is published atomically, with
    external data when the input had some or it exceeds 2 GB. A `ModelFile` (read with
    `defer=True`) is protected in place. `layouts` as in `transform`.
    """
    options = _validated_options(format, word, flip, ops, check, report_faults, code, range_check)
    site_options = {name: options.laid_out(layout) for name, layout in (layouts or {}).items()}
    read = model if isinstance(model, modelio.ModelFile) else modelio.read_model(model, defer=True)
    modelio.check_destination(output, read)
    packed_weights = _protect_in_place(read.model, options, read, allow_unprotected, site_options)
    produced = {packed_name(packed.site.name): packed for packed in packed_weights}
    source = modelio.ProducingModelFile(read.model, read.path, read.data_files, deferred=True, produced=produced)
    modelio.save_model(read.model, output, source=source)
    return _report(packed_weights)


def _protect_in_place(
    model: onnx.ModelProto, options: _Options, source: _WeightSource, allow_unprotected: bool,
    site_options: Mapping[str, _Options] | None = None,
) -> list[_PackedWeight]:
    """Replaces the weights of `model` by decode nodes and packed placeholders, to be filled from the result;
    `site_options` are the options of the weights they name, instead of `options`."""
    if any(node.domain == DOMAIN for graph in modelio.all_graphs(model.graph) for node in graph.node):
        raise OppassError("model is already protected (it has ai.oppass nodes)")
    if has_standard_decodes(model):
        raise OppassError("model is already protected (it has standard-op load checks)")
    if options.check == STANDARD_OPS_CHECK:
        _lift_to_standard_decode_opset(model)
    _refuse_duplicate_initializers(model)
    per_site = dict(site_options or {})
    skipped: list[str] = []
    sites = _find_sites(model, options, per_site, skipped)
    skipped = list(dict.fromkeys(skipped))  # a weight read by several nodes is named once
    unknown = sorted(set(per_site) - {site.name for site in sites})
    if unknown:
        raise OppassError(f"layouts name weights the pass does not protect: {', '.join(map(repr, unknown[:3]))}")
    if not sites and not allow_unprotected:  # one line: the first weight skipped, if any, says why
        found = f"no weight of {', '.join(options.ops)} was found to protect"
        why = f" ({skipped[0]}{f'; {len(skipped) - 1} more' if len(skipped) > 1 else ''})" if skipped else ""
        raise OppassError(f"{found}{why}: nothing written (use --ops to name other op types, or --allow-unprotected "
                          "to write the model unprotected)")
    for message in skipped:
        warnings.warn(message, stacklevel=3)
    if not sites:
        warnings.warn(f"no weight of {', '.join(options.ops)} was found to protect: the model is written unprotected",
                      stacklevel=3)
    return _replace_sites(model, sites, options, source, per_site)


def _report(packed_weights: list[_PackedWeight]) -> TransformReport:
    reports = [packed.report for packed in packed_weights]
    if any(report is None for report in reports):
        raise OppassError("the protected weights were not all encoded")
    return TransformReport(tuple(report for report in reports if report is not None))


def _lift_to_standard_decode_opset(model: onnx.ModelProto) -> None:
    """Converts the model in place to the opset the standard-op decode needs (BitCast), when it is older.

    onnx's version converter copies tensors that are still in a file (deferred) as references,
    so their bytes are still read one at a time.
    """
    from onnx import version_converter

    opset = _default_opset(model)
    if opset < OPSET:
        try:
            converted = version_converter.convert_version(model, OPSET)
        except Exception as error:  # onnx raises its own and C++ exception types
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise OppassError(f"onnx's version converter cannot lift the model from opset {opset} to {OPSET}, which "
                              f"the portable load check needs ({reason}): use --check load-custom (the same check "
                              "by the oppass custom-op library, folded at load by oppass.load_session), or convert "
                              f"the model to opset {OPSET} yourself") from None
        model.CopyFrom(converted)
    model.ir_version = max(model.ir_version, IR_VERSION)


def _refuse_duplicate_initializers(model: onnx.ModelProto) -> None:
    for graph in modelio.all_graphs(model.graph):
        names = [tensor.name for tensor in graph.initializer]
        if len(names) != len(set(names)):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise OppassError(f"initializer {duplicate!r} is defined more than once in graph {graph.name!r}")


def packed_name(weight: str) -> str:
    """Name of the initializer holding the packed words of `weight` in a transformed model."""
    return f"{weight}::op_packed"


# ----------------------------------------------------------------------------- options and lookup


def _validated_options(
    fmt: str, word: str | int, flip: str | None, ops: Sequence[str], check: str, report_faults: bool, code: str,
    range_check: bool,
) -> _Options:
    if fmt not in FORMAT_CHOICES:
        raise OppassError(f"unknown format {fmt!r}: expected one of {', '.join(FORMAT_CHOICES)}")
    if code not in CODES:
        raise OppassError(f"unknown code {code!r}: expected one of {', '.join(CODES)}")
    if code == SECDED and flip is not None:
        raise OppassError(f"a flip strategy applies to code {PARITY} only: drop --flip {flip} with --code {SECDED}")
    if flip is not None and flip not in FLIP_STRATEGIES:
        raise OppassError(f"unknown flip strategy {flip!r}: expected one of {', '.join(FLIP_STRATEGIES)}")
    if check not in CHECK_MODES:
        raise OppassError(f"unknown check mode {check!r}: expected one of {', '.join(CHECK_MODES)}")
    op_types = tuple(ops)
    unknown = [op for op in op_types if op not in WEIGHT_INPUT]
    if unknown or not op_types:
        raise OppassError(f"cannot protect op types {unknown or '(none)'}: expected some of {', '.join(WEIGHT_INPUT)}")
    narrowest = min(FORMATS, key=lambda name: FORMATS[name].bits)
    codec.word_bits(narrowest, word)  # rejects sizes no format allows; per-format limits are checked per weight
    if check == STANDARD_OPS_CHECK and (code != PARITY or range_check):
        option = f"--code {code}" if code != PARITY else "--range-check"
        raise OppassError(f"{option} is not available with --check load (standard ONNX operators): use --check "
                          "load-custom (the same load-time check by the oppass custom-op library) or --check runtime")
    return _Options(fmt, word, flip, op_types, check, report_faults, code, range_check)


# ----------------------------------------------------------------------------- finding weights


@dataclass(frozen=True)
class _Definition:
    """Where a name is defined: a graph, and the initializer or node producing it."""

    graph: onnx.GraphProto
    initializer: TensorProto | None
    node: onnx.NodeProto | None
    is_graph_input: bool


def _definitions(model: onnx.ModelProto) -> dict[str, list[_Definition]]:
    """Every name defined anywhere in the model (graph inputs, initializers, node outputs)."""
    table: dict[str, list[_Definition]] = {}
    for graph in modelio.all_graphs(model.graph):
        inputs = {value.name for value in graph.input}
        initializers = {tensor.name for tensor in graph.initializer}
        for tensor in graph.initializer:
            table.setdefault(tensor.name, []).append(_Definition(graph, tensor, None, tensor.name in inputs))
        for value in graph.input:
            if value.name not in initializers:
                table.setdefault(value.name, []).append(_Definition(graph, None, None, True))
        for node in graph.node:
            for output in node.output:
                if output:
                    table.setdefault(output, []).append(_Definition(graph, None, node, False))
    return table


def _find_sites(model: onnx.ModelProto, options: _Options, site_options: Mapping[str, _Options],
                skipped: list[str]) -> list[_Site]:
    """The weights to protect, each once however many nodes read it, in graph order (`site_options`: the
    options of the weights they name); each weight left unprotected adds a line to `skipped`."""
    definitions = _definitions(model)
    opset = _default_opset(model)
    sites: dict[str, _Site] = {}
    for graph in modelio.all_graphs(model.graph):
        for node in graph.node:
            op = _standard_op(node)
            weight_input = WEIGHT_INPUT.get(op) if op in options.ops else None
            if weight_input is None or len(node.input) <= weight_input:
                continue
            found = _site_for(node.input[weight_input], definitions, sites, skipped)
            if found is not None:
                site, permutation = found
                axis = _output_channel_axis(node, site)  # of the weight input, so of the transposed weight if one
                site.axes.add(axis if permutation is None else permutation[axis])
    usable = [site for site in sites.values()
              if _usable(site, site_options.get(site.name, options), opset, skipped)]
    return usable


def weight_readers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Every name read as a weight in `graph` (not its subgraphs), each with the op types of WEIGHT_INPUT that
    read it (onnxruntime's own as RUNTIME_OPS names them): a node's weight input, or the input of the
    DequantizeLinear or Transpose that produces it, which the pass follows to the weight."""
    producers = {output: node for node in graph.node for output in node.output if output}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        op = _standard_op(node)
        if op not in WEIGHT_INPUT or len(node.input) <= WEIGHT_INPUT[op]:
            continue
        name = node.input[WEIGHT_INPUT[op]]
        producer = producers.get(name)
        if producer is not None and producer.input and any(_is_standard(producer, followed)
                                                           for followed in ("DequantizeLinear", "Transpose")):
            name = producer.input[0]
        readers.setdefault(name, set()).add(op)
    return readers


def _standard_op(node: onnx.NodeProto) -> str | None:
    """The standard ONNX operator a node computes: its op_type in the default domain, see RUNTIME_OPS otherwise."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return RUNTIME_OPS.get((node.domain, node.op_type))


def _site_for(
    name: str, definitions: dict[str, list[_Definition]], sites: dict[str, _Site], skipped: list[str]
) -> tuple[_Site, list[int] | None] | None:
    """The site of a weight input; None if not constant.

    Follows a DequantizeLinear to its quantized tensor, or a Transpose to the tensor it transposes
    (exporters write a Linear layer as MatMul of a Transpose of its weight): then also gives the
    Transpose's permutation, which maps the weight input's axes to the site's.
    """
    definition = _single_definition(name, definitions, skipped)
    if definition is None:
        return None
    producer = definition.node
    quantized = _is_standard(producer, "DequantizeLinear")
    transposed = _is_standard(producer, "Transpose")
    if producer is not None and (quantized or transposed) and producer.input:
        name = producer.input[0]
        definition = _single_definition(name, definitions, skipped)
        if definition is None:
            return None
    site = sites.get(name)
    if site is None:
        tensor = _constant_tensor(definition, name, skipped)
        if tensor is None:
            return None
        site = _Site(name, definition.graph, tensor, definition.node, quantized)
    permutation = _permutation(producer, len(site.tensor.dims)) if transposed else None
    if transposed and permutation is None:
        return None
    sites[name] = site
    return site, permutation


def _is_standard(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _permutation(transpose: onnx.NodeProto | None, rank: int) -> list[int] | None:
    """A Transpose node's `perm` (default: the axes reversed); None when it is not a permutation of `rank` axes."""
    assert transpose is not None
    attributes = [a for a in transpose.attribute if a.name == "perm"]
    if not attributes:
        return list(reversed(range(rank)))
    permutation = list(attributes[0].ints)
    valid = attributes[0].type == onnx.AttributeProto.INTS and sorted(permutation) == list(range(rank))
    return permutation if valid else None


def _single_definition(name: str, definitions: dict[str, list[_Definition]], skipped: list[str]
                       ) -> _Definition | None:
    found = definitions.get(name, [])
    if len(found) > 1 and any(d.initializer is not None or _is_constant_node(d.node) for d in found):
        skipped.append(_left_unprotected(name, "it is defined in several graph scopes"))
        return None
    return found[0] if len(found) == 1 else None


def _left_unprotected(name: str, reason: str) -> str:
    return f"weight {name!r} left unprotected: {reason}"


def _is_constant_node(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _constant_tensor(definition: _Definition, name: str, skipped: list[str]) -> TensorProto | None:
    """The tensor behind an initializer or a Constant node's `value`; None for anything computed."""
    if definition.initializer is not None:
        if definition.is_graph_input:
            skipped.append(_left_unprotected(name, "it is also a graph input, which may override it"))
            return None
        return definition.initializer
    if definition.node is not None and _is_constant_node(definition.node):
        values = [a.t for a in definition.node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        return values[0] if values else None
    return None


def _output_channel_axis(node: onnx.NodeProto, site: _Site) -> int:
    """Axis of the weight that indexes output channels (used for int8 per-channel scales)."""
    rank = len(site.tensor.dims)
    op = _standard_op(node)
    if op == "Gemm":
        transposed = any(a.name == "transB" and a.type == onnx.AttributeProto.INT and a.i for a in node.attribute)
        return 0 if transposed else 1
    if op in ("MatMul", "MatMulInteger"):
        return max(rank - 1, 0)
    if op == "ConvTranspose":
        return 1
    return 0


def _usable(site: _Site, options: _Options, opset: int, skipped: list[str]) -> bool:
    """Whether to protect the site (a weight whose type has no format adds a line to `skipped`); raises when the
    user's explicit format cannot apply to it."""
    if 0 in site.tensor.dims:
        return False
    source = FORMAT_OF_ONNX_TYPE.get(site.tensor.data_type)
    target = _target_format(site, options)
    if source is None and options.format == KEEP_FORMAT:
        type_name = tensor_type_name(site.tensor.data_type)
        skipped.append(_left_unprotected(site.name, f"its type {type_name} has no weight format"))
        return False
    if source != target and source != "fp32":
        type_name = tensor_type_name(site.tensor.data_type)
        raise OppassError(f"cannot store weight {site.name!r} ({type_name}) as {target}: "
                          "only fp32 weights are converted; use --format keep")
    if source != target and target == "int8":
        _check_int8_conversion(site, opset)
    return True


def _target_format(site: _Site, options: _Options) -> str | None:
    """The format the weight is stored in; None when it is kept and its type has no format."""
    return FORMAT_OF_ONNX_TYPE.get(site.tensor.data_type) if options.format == KEEP_FORMAT else options.format


def _check_int8_conversion(site: _Site, opset: int) -> None:
    if opset < PER_AXIS_DEQUANTIZE_OPSET:
        raise OppassError(f"--format int8 needs per-axis DequantizeLinear (opset >= {PER_AXIS_DEQUANTIZE_OPSET}); "
                          f"the model uses opset {opset}")
    if len(site.axes) != 1:
        raise OppassError(f"weight {site.name!r} is read along different output-channel axes {sorted(site.axes)}; "
                          "cannot choose int8 scales: use another --format")


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return versions[0] if versions else 1


# ----------------------------------------------------------------------------- protecting one weight


def _protect(site: _Site, options: _Options, source: _WeightSource) -> _Protected:
    """The replacement of one weight: its decode node (and DequantizeLinear), and its packed initializer, to encode.

    Only a conversion to int8 reads the weight here, chunk by chunk: its scales, initializers of their own.
    """
    source_format = FORMAT_OF_ONNX_TYPE[site.tensor.data_type]
    target = source_format if options.format == KEEP_FORMAT else options.format
    axis = next(iter(site.axes))
    shape = tuple(int(dim) for dim in site.tensor.dims)
    scales = None
    if target != source_format and target == "int8":
        scales = codec.int8_scales(_weight_chunks(site.tensor, source, CHUNK_WEIGHTS), shape, axis, site.name)
    width = codec.word_bits(target, options.word, options.code)
    decode_output = _decode_output(site, options)
    output_type = ONNX_TYPES[target] if scales is not None else site.tensor.data_type  # bf16/fp16 of fp32: FLOAT
    masked_output = _masked_output(site, options)
    corrected_output = _corrected_name(site) if options.counts_corrections else None
    standard_ops = options.check == STANDARD_OPS_CHECK
    decode = DecodeNode(
        name=chain_prefix(site.name),
        packed=packed_name(site.name),
        output=decode_output,
        masked_output=masked_output,
        format=target,
        word_bits=width,
        shape=shape,
        check="load" if standard_ops else NODE_CHECKS[options.check],
        output_type=output_type,
        code=options.code,
        range_max=None,
        corrected_output=corrected_output,
        standard_ops=standard_ops,
    )
    packed = _PackedWeight(
        site=site, options=options, source=source, source_format=source_format, target=target, word_bits=width,
        axis=axis, output_type=output_type, shape=shape, packed_dtype=codec.storage_dtype(width),
        packed_shape=codec.packed_shape(math.prod(shape), target, width),
        scales=scales,
    )
    if options.range_check:  # the node holds the bound, so it is known before the packed bytes are written
        packed.range_max = packed.fault_free_max()
        decode = dataclasses.replace(decode, range_max=packed.range_max)
    if standard_ops:
        chain = standard_decode_chain(decode)
        nodes, initializers = chain.nodes, chain.initializers
        _warn_if_too_large_to_fold(site.name, packed.nbytes, decode)
    else:
        nodes, initializers = [make_decode_node(decode)], []
    value_info = [helper.make_tensor_value_info(decode_output, output_type, list(shape))]
    for count in (masked_output, corrected_output):
        if count:
            value_info.append(helper.make_tensor_value_info(count, TensorProto.INT64, []))
    if scales is not None:
        dequantize, quantization = _dequantize(site, decode_output, scales, axis)
        nodes.append(dequantize)
        initializers.extend(quantization)
        value_info.append(helper.make_tensor_value_info(site.name, TensorProto.FLOAT, list(shape)))
    return _Protected(packed, decode, nodes, initializers, value_info)


def _warn_if_too_large_to_fold(name: str, packed_bytes: int, decode: DecodeNode) -> None:
    """Warns when onnxruntime's default folding limit would leave a standard-op chain to run on every inference.

    The chain's largest value is its lane split, (lane bits / weight bits) times the packed
    bytes, or the decoded weights (oppass/standard_decode.py).
    """
    lane_bits = min(decode.word_bits, 64)
    largest = max(packed_bytes * (lane_bits // decode.weight_format.bits),
                  decode.weights * helper.tensor_dtype_to_np_dtype(decode.output_type).itemsize)
    if largest > FOLDING_LIMIT:
        warnings.warn(f"weight {name!r} is too large for onnxruntime to fold its load check at session creation "
                      f"({largest:,} bytes in one step, the default limit is {FOLDING_LIMIT:,}): it would be checked "
                      "on every run; use --check load-custom, or raise the session option "
                      "optimization.constant_folding_max_output_size_in_bytes", stacklevel=2)


def _weight_chunks(tensor: TensorProto, source: _WeightSource, chunk_weights: int) -> Iterator[np.ndarray]:
    """A weight's values, flat, in chunks of `chunk_weights`: read from the file one chunk at a time if still there."""
    if isinstance(source, modelio.ModelFile) and source.deferred and external_data_helper.uses_external_data(tensor) \
            and sys.byteorder == "little":
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        _check_length(tensor, source.stored_length(tensor), dtype)
        for chunk in source.stored_chunks(tensor, chunk_weights * dtype.itemsize):
            yield np.frombuffer(chunk, dtype)
        return
    values = _weights(tensor, source).reshape(-1)
    for start in range(0, max(values.size, 1), chunk_weights):
        yield values[start:start + chunk_weights]


def _check_length(tensor: TensorProto, length: int, dtype: np.dtype) -> None:
    expected = dtype.itemsize * math.prod(tensor.dims)
    if length != expected:
        raise OppassError(f"weight {tensor.name!r} has {length} bytes of data, expected "
                          f"{expected} for {dtype} {list(tensor.dims)}")


def _weights(tensor: TensorProto, source: modelio.ModelFile | modelio.LazyCopy | None) -> np.ndarray:
    """A weight tensor's values, viewing its bytes without a copy (read from the file if still there)."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    raw = source.tensor_bytes(tensor) if source is not None else \
        tensor.raw_data if tensor.HasField("raw_data") else None
    if raw is not None:
        _check_length(tensor, len(raw), dtype)
        values = np.frombuffer(raw, dtype)
        return (values.byteswap() if sys.byteorder == "big" else values).reshape(shape)
    return tensorio.to_array(tensor, "weight")


def _decode_output(site: _Site, options: _Options) -> str:
    """The decode node's output: the weight's name, or its int8 codes when the pass quantizes it."""
    quantizes = _target_format(site, options) == "int8" and FORMAT_OF_ONNX_TYPE.get(site.tensor.data_type) != "int8"
    return f"{site.name}::op_int8" if quantizes else site.name


def conversion_dequantizers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The DequantizeLinear nodes the pass added after the weights it converted to int8 (`format="int8"`): each
    reads `<weight>::op_int8` with the initializers `<weight>::op_scale` and `<weight>::op_zero_point` and
    gives `<weight>`."""
    return [node for node in graph.node if _is_standard(node, "DequantizeLinear") and len(node.output) == 1
            and node.name == f"{node.output[0]}::op_dequantize"
            and list(node.input) == [f"{node.output[0]}::op_{suffix}" for suffix in ("int8", "scale", "zero_point")]]


def _masked_output(site: _Site, options: _Options) -> str | None:
    """The decode node's masked-word count output, when the pass reports faults."""
    return _masked_name(site) if options.report_faults else None


def _masked_name(site: _Site) -> str:
    return f"{site.name}::op_masked"


def _corrected_name(site: _Site) -> str:
    return f"{site.name}::op_corrected"


def _new_names(site: _Site, options: _Options) -> set[str]:
    """Names of the values and initializers the pass adds for `site` (the weight's own name aside)."""
    names = {packed_name(site.name), _decode_output(site, options)}
    if options.report_faults:
        names.add(_masked_name(site))
    if options.counts_corrections:
        names.add(_corrected_name(site))
    if _decode_output(site, options) != site.name:
        names.update({f"{site.name}::op_scale", f"{site.name}::op_zero_point"})
    return names - {site.name}


def _dequantize(
    site: _Site, codes_name: str, scales: np.ndarray, axis: int
) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """DequantizeLinear(codes, scales, zero points) -> the weight's original name."""
    scale = numpy_helper.from_array(scales, f"{site.name}::op_scale")
    zero_point = numpy_helper.from_array(np.zeros(scales.shape, dtype=np.int8), f"{site.name}::op_zero_point")
    node = helper.make_node(
        "DequantizeLinear",
        [codes_name, scale.name, zero_point.name],
        [site.name],
        name=f"{site.name}::op_dequantize",
        axis=axis,
    )
    return node, [scale, zero_point]


# ----------------------------------------------------------------------------- editing the model


def _replace_sites(
    model: onnx.ModelProto, sites: list[_Site], options: _Options, source: _WeightSource,
    site_options: Mapping[str, _Options],
) -> list[_PackedWeight]:
    """Swaps each site's definition for its replacement, a placeholder for its packed initializer; wires the
    optional fault counters. Returns the packed weights, in the order of their placeholders."""
    graph = model.graph
    options_of = {site.name: site_options.get(site.name, options) for site in sites}
    masked_outputs = [_masked_name(site) for site in sites if options.report_faults]
    tail = _count_sum(masked_outputs, MASKED_WORDS_OUTPUT, MASKED_WORDS_SUM) if options.report_faults else []
    correcting = [_corrected_name(site) for site in sites if options_of[site.name].counts_corrections]
    counts_corrections = options.counts_corrections or bool(correcting)
    if counts_corrections:
        tail += _count_sum(correcting, CORRECTED_WORDS_OUTPUT, CORRECTED_WORDS_SUM)
    new_names = {name for site in sites for name in _new_names(site, options_of[site.name])}
    new_names.update(output for node in tail for output in node.output)
    standard_prefixes = tuple(chain_prefix(site.name) for site in sites) if options.check == STANDARD_OPS_CHECK else ()
    _reject_taken_names(model, new_names - {site.name for site in sites}, standard_prefixes)
    _remove_value_info_everywhere(model, {site.name for site in sites})
    new_nodes: list[onnx.NodeProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    packed_weights: list[_PackedWeight] = []
    decodes: list[DecodeNode] = []
    for site in sites:
        replacement = _protect(site, options_of[site.name], source)
        packed = replacement.packed
        packed.placeholder = modelio.add_placeholder(
            graph, packed_name(site.name), helper.np_dtype_to_tensor_dtype(packed.packed_dtype), packed.packed_shape)
        graph.initializer.extend(replacement.initializers)
        new_nodes.extend(replacement.nodes)
        value_info.extend(replacement.value_info)
        packed_weights.append(packed)
        decodes.append(replacement.decode)
    _remove_definitions(sites)
    kept_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + kept_nodes + tail)
    graph.value_info.extend(value_info)
    if options.report_faults:
        graph.output.append(helper.make_tensor_value_info(MASKED_WORDS_OUTPUT, TensorProto.INT64, []))
    if counts_corrections:
        graph.output.append(helper.make_tensor_value_info(CORRECTED_WORDS_OUTPUT, TensorProto.INT64, []))
    _record_standard_decodes(model, [decode for decode in decodes if decode.standard_ops])
    if any(not decode.standard_ops for decode in decodes):
        _import_domain(model)
    return packed_weights


def _record_standard_decodes(model: onnx.ModelProto, decodes: list[DecodeNode]) -> None:
    """Sets the STANDARD_DECODES_KEY metadata entry to these chains (an entry left by a folded model goes)."""
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == STANDARD_DECODES_KEY:
            del model.metadata_props[index]
    if decodes:
        entry = model.metadata_props.add()
        entry.key, entry.value = STANDARD_DECODES_KEY, standard_decodes_metadata(decodes)


def _import_domain(model: onnx.ModelProto) -> None:
    """Makes the model import ai.oppass once, at DOMAIN_VERSION. An import already there (onnxruntime's optimised
    models name every domain registered in the process, ai.oppass at version 1000 once the kernel library is
    loaded) is set to that version in place."""
    entries = [index for index, entry in enumerate(model.opset_import) if entry.domain == DOMAIN]
    if not entries:
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        return
    model.opset_import[entries[0]].version = DOMAIN_VERSION
    for index in reversed(entries[1:]):
        del model.opset_import[index]


def _reject_taken_names(model: onnx.ModelProto, new_names: set[str], new_prefixes: tuple[str, ...]) -> None:
    """The names the pass introduces (`new_names`, and any starting with one of `new_prefixes`) must be new to
    the model."""
    taken: set[str] = set()
    for graph in modelio.all_graphs(model.graph):
        taken.update(value.name for value in graph.input)
        taken.update(value.name for value in graph.output)
        taken.update(tensor.name for tensor in graph.initializer)
        taken.update(output for node in graph.node for output in node.output)
    clashes = sorted((new_names & taken) | {name for name in taken if name.startswith(new_prefixes)})
    if clashes:
        raise OppassError(f"the model already uses names oppass needs: {', '.join(clashes[:3])}")


def _remove_definitions(sites: list[_Site]) -> None:
    """Removes the initializer or Constant node defining each site."""
    for graph in {id(site.graph): site.graph for site in sites}.values():
        here = [site for site in sites if site.graph is graph]
        constants = {site.name for site in here if site.constant_node is not None}
        edit.remove_nodes(graph, functools.partial(_defines_one_of, constants))
        edit.remove_initializers(graph, {site.name for site in here if site.constant_node is None})


def _defines_one_of(names: set[str], node: onnx.NodeProto) -> bool:
    """Whether the node is a Constant node defining one of `names`."""
    return _is_constant_node(node) and len(node.output) == 1 and node.output[0] in names


def _remove_value_info_everywhere(model: onnx.ModelProto, names: set[str]) -> None:
    for graph in modelio.all_graphs(model.graph):
        edit.remove_value_info(graph, names)


def _count_sum(counts: list[str], total: str, prefix: str) -> list[onnx.NodeProto]:
    """Nodes adding the decode nodes' int64 counts `counts` into the value `total`, named with `prefix`."""
    if not counts:
        zero = numpy_helper.from_array(np.array(0, dtype=np.int64))
        return [helper.make_node("Constant", [], [total], name=f"{prefix}sum", value=zero)]
    if len(counts) == 1:
        return [helper.make_node("Identity", counts, [total], name=f"{prefix}sum")]
    nodes = []
    running = counts[0]
    for index, term in enumerate(counts[1:], start=1):
        partial = total if index == len(counts) - 1 else f"{prefix}partial_{index}"
        nodes.append(helper.make_node("Add", [running, term], [partial], name=f"{prefix}sum_{index}"))
        running = partial
    return nodes


