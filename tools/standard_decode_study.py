"""Measures the standard-op load-time decode (oppass/standard_decode.py) in plain onnxruntime.

    python tools/standard_decode_study.py fold MODEL.onnx [--format fp32] [--word 64] [--report-faults] [--flips N]
    python tools/standard_decode_study.py latency MODEL.onnx [--threads 1] [--rounds 7] [--runs 20]
    python tools/standard_decode_study.py load-cost MODEL.onnx [--repeats 3] [--library liboppass_ops.so]
    python tools/standard_decode_study.py convert MODEL.onnx
    python tools/standard_decode_study.py large [--weights 16777216] [--limit BYTES]

Every Conv/ConvTranspose/Gemm/MatMul weight that is an fp32 initializer is stored packed
behind a standard-op decode (the model is lifted to opset 26 first with onnx's version
converter). The baseline is the same model with the weights a fault-free decode yields
(the parity LSB flips applied, faulty words zeroed), so both optimised graphs compute the same
values.

- `fold`: optimised graphs (onnxruntime basic/extended/all levels) of baseline and
  protected model: op counts, decode nodes and packed initializers left, outputs compared.
- `latency`: median run time of the baseline and the protected model, sessions created
  once, timed in alternating rounds; prints per-round ratios and their median.
- `load-cost`: session-creation time and peak RSS of each model in fresh subprocesses.
- `convert`: converts to opset 26 and compares outputs with the original model.
- `large`: one Gemm weight of the given size per format and word size: folded or not, under
  onnxruntime's folding size limit (`--limit`).

This is a study script (not part of the package): it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, version_converter

from oppass import codec
from oppass.standard_decode import IR_VERSION, OPSET, standard_decode

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MASKED_TOTAL = "oppass_masked_words"
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# ----------------------------------------------------------------------------- protecting a model


def lift(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset OPSET (converted by onnx's version converter when older) and IR >= IR_VERSION."""
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    lifted = version_converter.convert_version(model, OPSET) if opset < OPSET else model
    lifted.ir_version = max(lifted.ir_version, IR_VERSION)
    return lifted


def weight_names(model: onnx.ModelProto) -> list[str]:
    """fp32 initializers read as input 1 of a weight op in the main graph, not overridable graph inputs."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    graph_inputs = {value.name for value in model.graph.input}
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            if tensor.data_type == TensorProto.FLOAT and tensor.name not in graph_inputs:
                names[tensor.name] = None
    return list(names)


def protect(
    model: onnx.ModelProto, fmt: str, word: str, report_faults: bool, flips: int = 0
) -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    """(baseline, protected, masked words): both lifted to OPSET; the baseline holds the decoded weights as fp32.

    With `flips`, that many random stored bits of each packed weight are inverted; the
    baseline then holds what the codec decodes from the faulty words (odd words zeroed).
    """
    rng = np.random.default_rng(2)
    expected_masked = 0
    baseline = lift(model)
    protected = onnx.ModelProto()
    protected.CopyFrom(baseline)
    initializers = {tensor.name: tensor for tensor in baseline.graph.initializer}
    decode_nodes, counts, new_tensors = [], [], []
    removed = set()
    for name in weight_names(baseline):
        weights = numpy_helper.to_array(initializers[name])
        stored = codec.to_format(weights, fmt, name=name)[0]
        width = codec.word_bits(fmt, word)
        packed = codec.encode(stored, width, adjusted=False).packed
        stream = packed.reshape(-1).view(np.uint8)
        for bit in rng.choice(stream.size * 8, size=min(flips, stream.size * 8), replace=False):
            stream[bit // 8] ^= np.uint8(1 << (bit % 8))
        result = codec.decode(packed, fmt, width, weights.shape)
        decoded, expected_masked = result.weights, expected_masked + result.masked_words
        initializers[name].CopyFrom(numpy_helper.from_array(decoded.astype(np.float32), name))
        count = f"{name}::op_masked" if report_faults else None
        decode = standard_decode(name, f"{name}::op_packed", name, fmt, width, weights.shape, TensorProto.FLOAT, count)
        decode_nodes.extend(decode.nodes)
        new_tensors.append(numpy_helper.from_array(packed, f"{name}::op_packed"))
        new_tensors.extend(decode.initializers)
        if count:
            counts.append(count)
        removed.add(name)
    graph = protected.graph
    kept = [tensor for tensor in graph.initializer if tensor.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_tensors)
    if report_faults:
        decode_nodes.extend(masked_sum(counts))
        graph.output.append(helper.make_tensor_value_info(MASKED_TOTAL, TensorProto.INT64, []))
    nodes = decode_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return baseline, protected, expected_masked


def masked_sum(counts: list[str]) -> list[onnx.NodeProto]:
    """Add nodes summing the per-weight counts into MASKED_TOTAL."""
    if len(counts) == 1:
        return [helper.make_node("Identity", counts, [MASKED_TOTAL], name=f"{MASKED_TOTAL}::op_sum")]
    nodes, running = [], counts[0]
    for index, term in enumerate(counts[1:], start=1):
        total = MASKED_TOTAL if index == len(counts) - 1 else f"{MASKED_TOTAL}::op_partial_{index}"
        nodes.append(helper.make_node("Add", [running, term], [total], name=f"{MASKED_TOTAL}::op_sum_{index}"))
        running = total
    return nodes


# ----------------------------------------------------------------------------- sessions


def options(level: str = "all", threads: int = 0, optimized_path: Path | None = None) -> ort.SessionOptions:
    """Session options at an optimization level, with a thread count and where to save the optimised model."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = LEVELS[level]
    session_options.intra_op_num_threads = threads
    if optimized_path is not None:
        session_options.optimized_model_filepath = str(optimized_path)
    return session_options


INPUT_SHAPE: list[int] = []  # --input-shape: replaces the first graph input's dims


def feeds(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded normal inputs for every float graph input that is not an initializer; unknown dims -> batch."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    rng = np.random.default_rng(0)
    result = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [dim.dim_value if dim.dim_value > 0 else batch for dim in value.type.tensor_type.shape.dim]
        if INPUT_SHAPE and not result:
            dims = INPUT_SHAPE
        result[value.name] = rng.standard_normal(dims).astype(np.float32)
    return result


def session(model: onnx.ModelProto, **kwargs: object) -> ort.InferenceSession:
    """A CPU session with no custom-op library."""
    return ort.InferenceSession(model.SerializeToString(), options(**kwargs), providers=["CPUExecutionProvider"])


def optimized_graph(model: onnx.ModelProto, level: str, folder: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs after optimizing `model` at `level`."""
    path = folder / f"optimized_{level}.onnx"
    session(model, level=level, optimized_path=path)
    return onnx.load(path)


# ----------------------------------------------------------------------------- commands


def fold(args: argparse.Namespace) -> None:
    """Optimised graphs of baseline and protected model, and their outputs."""
    baseline, protected, expected_masked = protect(onnx.load(args.model), args.format, args.word, args.report_faults,
                                                   args.flips)
    onnx.checker.check_model(protected, full_check=True)
    print(f"onnx.checker.check_model(full_check=True): accepted; protected weights: {len(weight_names(baseline))}, "
          f"protected nodes: {len(protected.graph.node)} (baseline {len(baseline.graph.node)})")
    x = feeds(baseline)
    with tempfile.TemporaryDirectory() as folder:
        for level in LEVELS:
            graphs = {}
            for label, model in (("baseline", baseline), ("protected", protected)):
                sub = Path(folder) / label
                sub.mkdir(exist_ok=True)
                graphs[label] = optimized_graph(model, level, sub)
            counts = {label: Counter(f"{node.domain + '.' if node.domain else ''}{node.op_type}"
                                     for node in graph.graph.node) for label, graph in graphs.items()}
            left = [node.name for node in graphs["protected"].graph.node if "::op_" in node.name]
            packed_left = [t.name for t in graphs["protected"].graph.initializer if t.name.endswith("::op_packed")]
            total = [t for t in graphs["protected"].graph.initializer if t.name == MASKED_TOTAL]
            print(f"[{level}] same op counts: {counts['baseline'] == counts['protected']}; decode nodes left: "
                  f"{len(left)} {left[:3]}; packed initializers left: {len(packed_left)}; masked total folded: "
                  f"{bool(total)}")
            print(f"  baseline  {dict(sorted(counts['baseline'].items()))}")
            same_nodes = node_signature(graphs["baseline"]) == node_signature(graphs["protected"])
            same_tensors = initializer_signature(graphs["baseline"]) == initializer_signature(graphs["protected"])
            print(f"  same nodes (op, attributes, inputs, outputs) in order: {same_nodes}; same initializers "
                  f"(name, type, shape, bytes) apart from the masked total: {same_tensors}")
            if counts["baseline"] != counts["protected"]:
                print(f"  protected {dict(sorted(counts['protected'].items()))}")
            outputs = [output.name for output in baseline.graph.output]
            expected = session(baseline, level=level).run(outputs, x)
            got = session(protected, level=level).run(None, x)
            same = all(np.array_equal(a, b) for a, b in zip(expected, got[: len(outputs)], strict=True))
            masked = f", masked words {int(got[-1])} (codec: {expected_masked})" if args.report_faults else ""
            print(f"  outputs bit-identical to baseline: {same}{masked}")


def node_signature(model: onnx.ModelProto) -> list[tuple]:
    """Each node's domain, op type, attributes and input/output names, in graph order."""
    return [(node.domain, node.op_type, tuple(attribute.SerializeToString() for attribute in node.attribute),
             tuple(node.input), tuple(node.output)) for node in model.graph.node]


def initializer_signature(model: onnx.ModelProto) -> dict[str, tuple]:
    """Each initializer's type, shape and bytes, by name (the masked-word total left out)."""
    return {tensor.name: (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
            for tensor in model.graph.initializer if tensor.name != MASKED_TOTAL}


def latency(args: argparse.Namespace) -> None:
    """Run times of the original, the baseline (lifted, adjusted weights) and the protected model.

    Sessions are created once; each round runs every model `runs` times, interleaved one run
    at a time in a rotating order, and records wall time and (meaningful with one thread,
    which runs on the calling thread) the calling thread's CPU time, which a busy machine
    disturbs less. Ratios are of per-round medians.
    """
    baseline, protected, _ = protect(onnx.load(args.model), args.format, args.word, False)
    original = onnx.load(args.model)
    x = feeds(baseline, args.batch)
    sessions = {label: session(model, threads=args.threads)
                for label, model in (("original", original), ("baseline", baseline), ("protected", protected))}
    for current in sessions.values():
        for _ in range(3):
            current.run(None, x)
    labels = list(sessions)
    medians: dict[str, dict[str, list[float]]] = {clock: {label: [] for label in labels} for clock in ("wall", "cpu")}
    for round_index in range(args.rounds):
        samples: dict[str, dict[str, list[float]]] = {clock: {label: [] for label in labels} for clock in medians}
        for run_index in range(args.runs):
            shift = (round_index + run_index) % len(labels)
            for label in labels[shift:] + labels[:shift]:
                wall, cpu = time.perf_counter(), time.thread_time()
                sessions[label].run(None, x)
                samples["cpu"][label].append(time.thread_time() - cpu)
                samples["wall"][label].append(time.perf_counter() - wall)
        for clock in medians:
            for label in labels:
                medians[clock][label].append(statistics.median(samples[clock][label]))
    print(f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds x {args.runs} interleaved runs")
    for clock, per_label in medians.items():
        for label, values in per_label.items():
            print(f"  {clock:4s} {label:9s} median ms per round: {[round(v * 1e3, 1) for v in values]}")
        for reference in ("baseline", "original"):
            ratios = [p / b for p, b in zip(per_label["protected"], per_label[reference], strict=True)]
            print(f"  {clock:4s} protected/{reference}: per round {[round(r, 3) for r in ratios]}, "
                  f"median {statistics.median(ratios):.3f}")


# Peak RSS is VmHWM, which exec resets (ru_maxrss would include the parent's peak).
LOAD_PROBE = """
import json, sys, time
import onnxruntime as ort

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))

before = peak_mib()
options = ort.SessionOptions()
if len(sys.argv) > 2:
    options.register_custom_ops_library(sys.argv[2])
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": peak_mib(), "before_mib": before}))
"""


def load_cost(args: argparse.Namespace) -> None:
    """Session creation time and peak RSS in fresh subprocesses, the variants alternating.

    With `--library`, the ParityCheckUnpack load mode (`oppass.protect.transform(check="load")`,
    the kernel decoding at kernel creation) is measured too, in a session with the library.
    """
    baseline, protected, _ = protect(onnx.load(args.model), args.format, args.word, False)
    variants = {"baseline": baseline, "protected": protected}
    if args.library:
        from oppass import protect as oppass_protect

        variants["custom-op"] = oppass_protect.transform(onnx.load(args.model), format=args.format, word=args.word,
                                                ops=WEIGHT_OPS, check="load")
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for label, model in variants.items():
            paths[label] = Path(folder) / f"{label}.onnx"
            onnx.save_model(model, paths[label])
        results: dict[str, list[dict]] = {label: [] for label in paths}
        for _ in range(args.repeats):
            for label, path in paths.items():
                library = [str(args.library)] if label == "custom-op" else []
                run = subprocess.run([sys.executable, "-I", "-c", LOAD_PROBE, str(path), *library],
                                     capture_output=True, text=True, check=True)
                results[label].append(json.loads(run.stdout))
        for label, path in paths.items():
            seconds = [r["seconds"] for r in results[label]]
            peaks = [r["peak_mib"] for r in results[label]]
            print(f"{label:9s} file {path.stat().st_size / 2**20:.1f} MiB; session creation s "
                  f"{[round(s, 3) for s in seconds]} (median {statistics.median(seconds):.3f}); "
                  f"peak RSS MiB {[round(p) for p in peaks]} "
                  f"(before the session: {results[label][0]['before_mib']:.0f})")


def convert(args: argparse.Namespace) -> None:
    """Lifts the model to OPSET and compares its outputs with the original's."""
    original = onnx.load(args.model)
    opset = next(entry.version for entry in original.opset_import if entry.domain in ("", "ai.onnx"))
    try:
        lifted = lift(original)
        onnx.checker.check_model(lifted, full_check=True)
    except Exception as error:  # report what the converter or checker said
        print(f"{args.model}: opset {opset} -> {OPSET} FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
        return
    x = feeds(original)
    expected = session(original, level="basic").run(None, x)
    got = session(lifted, level="basic").run(None, x)
    identical = all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    ops = sorted({node.op_type for node in original.graph.node})
    print(f"{args.model}: opset {opset} -> {OPSET}, IR {original.ir_version} -> {lifted.ir_version}: checker ok, "
          f"outputs bit-identical: {identical}; ops {ops}")


FOLDING_LIMIT_KEY = "optimization.constant_folding_max_output_size_in_bytes"


def large(args: argparse.Namespace) -> None:
    """Whether one large Gemm weight's decode folds, per format and word size, under a folding size limit.

    onnxruntime folds no node whose output exceeds the session config entry FOLDING_LIMIT_KEY
    (1 GiB by default); `--limit` sets it. A decode that is not folded runs on every inference.
    """
    rows = 1024
    columns = args.weights // rows
    weights = np.random.default_rng(1).standard_normal((rows, columns)).astype(np.float32)
    for fmt, word in (("fp32", "weight"), ("fp32", "64"), ("fp32", "512"), ("bf16", "64"), ("fp16", "512")):
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "w"], ["y"])], "large",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, columns])],
            [numpy_helper.from_array(weights, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        _, protected, _ = protect(model, fmt, word, True)
        session_options = options(level="all")
        if args.limit is not None:
            session_options.add_session_config_entry(FOLDING_LIMIT_KEY, str(args.limit))
        with tempfile.TemporaryDirectory() as folder:
            session_options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
            start = time.perf_counter()
            ort.InferenceSession(protected.SerializeToString(), session_options, providers=["CPUExecutionProvider"])
            seconds = time.perf_counter() - start
            optimized = onnx.load(session_options.optimized_model_filepath)
        left = [node.op_type for node in optimized.graph.node if "::op_" in node.name]
        packed = next(t for t in protected.graph.initializer if t.name.endswith("::op_packed"))
        print(f"{fmt} word {word}: {weights.size} weights, packed {len(packed.raw_data) / 2**20:.0f} MiB: "
              f"{len(left)} decode nodes left {sorted(set(left))}; session creation (incl. saving) {seconds:.2f} s")


def main() -> None:
    """Parses the command line and runs one command."""
    ort.set_default_logger_severity(3)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function in (("fold", fold), ("latency", latency), ("load-cost", load_cost), ("convert", convert)):
        command = commands.add_parser(name)
        command.add_argument("model", type=Path)
        command.add_argument("--format", default="fp32", choices=("fp32", "bf16", "fp16"))
        command.add_argument("--word", default="64")
        command.add_argument("--input-shape", help="dims of the first input, e.g. 1,3,48,192")
        command.set_defaults(function=function)
        if name == "fold":
            command.add_argument("--report-faults", action="store_true")
            command.add_argument("--flips", type=int, default=0, help="random stored bits inverted per weight")
        if name == "latency":
            command.add_argument("--threads", type=int, default=1)
            command.add_argument("--batch", type=int, default=1)
            command.add_argument("--rounds", type=int, default=7)
            command.add_argument("--runs", type=int, default=20)
        if name == "load-cost":
            command.add_argument("--repeats", type=int, default=3)
            command.add_argument("--library", type=Path, help="liboppass_ops.so: also measure the custom-op load mode")
    command = commands.add_parser("large")
    command.add_argument("--weights", type=int, default=1 << 24)
    command.add_argument("--limit", type=int, help=f"session config {FOLDING_LIMIT_KEY}")
    command.set_defaults(function=large)
    args = parser.parse_args()
    if getattr(args, "input_shape", None):
        INPUT_SHAPE.extend(int(dim) for dim in args.input_shape.split(","))
    args.function(args)


if __name__ == "__main__":
    main()
