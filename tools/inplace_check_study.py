"""Measures a runtime parity check that writes no copy of the weights (issue 10, item 3).

    python tools/inplace_check_study.py latency [--models mobilenet_v2,resnet50] [--batches 1,8] [--rounds 12]
                                                [--runs 5] [--variants]
    python tools/inplace_check_study.py soundness [--models mobilenet_v2,resnet50]

The design studied: the consumer (NchwcConv, FusedConv, Conv, Gemm) reads its weight
initializer itself, which for fp32 already holds the weights with the parity adjustment in their
low bits (docs/FORMAT.md, 64-bit words); beside it a WordParityCheck node (the study kernel
tools/inplace_check_study.c with the kernel's decoder.c, compiled here into build/study/) scans
the same initializer buffer on every run with the decoder's parity scan, writes nothing for a
clean word and zeroes an odd word in place; it passes the
consumer's bias through, so the consumer cannot start before the check has ended. The graph is
the one `oppass.runtime.optimize_for_cpu` gives (NCHWc weights stored reordered), and the
session runs it as is (no graph optimisation, which could give the consumer a rewritten copy of
the weight) with prepacking off (a prepacked consumer reads a private copy the check never sees).

- `latency`: per model and batch size, 2 threads, spinning off, sessions created once and timed
  in interleaved turns: unprotected (plain session), today's runtime mode
  (`oppass.load_session`), the no-copy check, and its floor (the same graph unprotected,
  prepacking off); with `--variants` also the check ordered by its bias alone (onnxruntime then
  runs every check first) and the optimised graph with prepacking. Prints the medians and
  per-round ratios against unprotected and against runtime mode; first, per model, the checks
  alone and runtime mode's decode alone (each in a session of its own).
- `soundness`: on each model, one stored word flipped in the largest Gemm weight and in a
  convolution weight: the first run's output against the numpy codec's decode of the flipped
  weights (masked word zeroed), with prepacking off and on; the order in which the session runs
  the checks (onnxruntime's profile); whether onnxruntime's NCHWc rewrite still reads the checked
  initializer when the check is added before optimisation; and, for the Gemm flip, the model saved
  with external data and opened by path: kernel creation accepts it (a read-only mapping is
  refused), the word is masked, how the data file is mapped, and that the file is not written.

This is a study script (not part of the package): it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # model_zoo: cached exports of the paper's CNNs

import model_zoo  # noqa: E402

from oppass import codec, protect, runtime, schema  # noqa: E402

SOURCE = Path(__file__).with_suffix(".c")
LIBRARY = REPO / "build" / "study" / "libinplace_check_study.so"
DOMAIN = "oppass.study"
WORD = 64
THREADS = 2
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}
INFERENCE_OPS = ("Conv", "Gemm")
# Consumers whose input 1 is a weight and input 2 a bias, in the graph optimize_for_cpu gives.
CONSUMERS = {("", "Conv"), ("", "Gemm"), ("com.microsoft.nchwc", "Conv"), ("com.microsoft", "FusedConv"),
             ("com.microsoft", "FusedGemm")}


def build_library() -> Path:
    """Compiles the study kernel against the onnxruntime header the CMake build found."""
    header = (REPO / "build" / "dev" / "ort_include_dir.txt").read_text().strip()
    LIBRARY.parent.mkdir(parents=True, exist_ok=True)
    sources = [SOURCE, *(REPO / "custom_ops" / name for name in ("decoder.c", "secded_avx512.c"))]
    if not LIBRARY.exists() or LIBRARY.stat().st_mtime < max(path.stat().st_mtime for path in sources):
        subprocess.run(["cc", "-O3", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wno-psabi", f"-I{header}",
                        f"-I{REPO / 'custom_ops'}", *map(str, sources), "-o", str(LIBRARY)], check=True)
    return LIBRARY


def with_checks(model: onnx.ModelProto, after_input: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """The model with each consumer's fp32 weight parity-adjusted in place (64-bit words) and a
    WordParityCheck node before the consumer, passing its bias through (a zero bias added where it has
    none); with `after_input`, the check also takes the consumer's activation input (unread), so that it
    runs right before the consumer rather than wherever onnxruntime's order puts a node of constant
    inputs. Returns the model and the checked weights' names."""
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    graph = checked.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes, names = [], []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if (node.domain, node.op_type) in CONSUMERS and weight is not None and weight.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(weight)
            encoded = codec.encode(values, WORD)
            weight.CopyFrom(numpy_helper.from_array(encoded.adjusted, weight.name))
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            if not bias:
                channels = values.shape[0] if node.op_type == "Conv" else _gemm_columns(node, values)
                bias = f"{node.name}_zero_bias"
                graph.initializer.append(numpy_helper.from_array(np.zeros(channels, np.float32), bias))
            passed = f"{bias}_checked_{len(names)}"
            inputs = [weight.name, bias, node.input[0]] if after_input else [weight.name, bias]
            nodes.append(helper.make_node("WordParityCheck", inputs, [passed], domain=DOMAIN,
                                          name=f"check_{len(names)}_{weight.name}", word_bits=WORD))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = passed
            names.append(weight.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    checked.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return checked, names


def _gemm_columns(node: onnx.NodeProto, weight: np.ndarray) -> int:
    trans_b = next((attribute.i for attribute in node.attribute if attribute.name == "transB"), 0)
    return int(weight.shape[0] if trans_b else weight.shape[1])


def options(*, library: bool, optimize: bool = True, prepacking: bool = True, profile: str | None = None
            ) -> ort.SessionOptions:
    """Session options: THREADS threads, spinning off; the study library; graph optimisation and prepacking."""
    result = ort.SessionOptions()
    result.intra_op_num_threads = THREADS
    result.inter_op_num_threads = 1
    for key, value in NO_SPINNING.items():
        result.add_session_config_entry(key, value)
    if library:
        result.register_custom_ops_library(str(LIBRARY))
    if not optimize:
        result.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepacking:
        result.add_session_config_entry("session.disable_prepacking", "1")
    if profile is not None:
        result.enable_profiling = True
        result.profile_file_prefix = profile
    return result


def session(model: onnx.ModelProto, settings: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session of `model` from its bytes."""
    return ort.InferenceSession(model.SerializeToString(), settings, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- latency


def latency(args: argparse.Namespace) -> None:
    """Prints, per model and batch size, each session's median time and its ratio to unprotected."""
    print(f"onnxruntime {ort.__version__}, {THREADS} threads, load average {os.getloadavg()}")
    for name in args.models.split(","):
        model = onnx.load(model_zoo.paper_cnn(name))
        optimized = runtime.optimize_for_cpu(model)
        checked, names = with_checks(optimized)
        early, _ = with_checks(optimized, after_input=False)
        weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in checked.graph.initializer if t.name in names)
        sessions = {
            "unprotected": session(model, options(library=False)),
            "runtime (load_session)": runtime.load_session(protect.transform(model, ops=INFERENCE_OPS),
                                                           threads=THREADS, config=NO_SPINNING),
            "no-copy check": session(checked, options(library=True, optimize=False, prepacking=False)),
            "floor: optimised graph, prepacking off": session(optimized, options(library=False, optimize=False,
                                                                                 prepacking=False)),
        }
        if args.variants:
            sessions["no-copy check, bias dependency only"] = session(
                with_checks(optimized, after_input=False)[0], options(library=True, optimize=False, prepacking=False))
            sessions["optimised graph"] = session(optimized, options(library=False, optimize=False))
        alone = {"checks alone": session(checks_alone(checked), options(library=True, optimize=False)),
                 "decode alone (runtime mode's decode)": ort.InferenceSession(
                     decode_alone(protect.transform(optimized, ops=INFERENCE_OPS)).SerializeToString(),
                     runtime.session_options(THREADS, NO_SPINNING))}
        alone_times, _ = interleaved(alone, {}, args.rounds, args.runs)
        print(f"\n{name}: " + ", ".join(f"{key} {np.median(t) * 1e3:.2f} ms" for key, t in alone_times.items()),
              flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), np.float32)
            feeds = {model.graph.input[0].name: ort.OrtValue.ortvalue_from_numpy(x)}
            times, cpu = interleaved(sessions, feeds, args.rounds, args.runs)
            base, cpu_base = np.array(times["unprotected"]), np.array(cpu["unprotected"])
            print(f"\n{name} batch {batch}: {len(names)} checked weights, {weight_bytes / 2**20:.1f} MiB, "
                  f"{args.rounds} rounds x {args.runs} runs, load average {os.getloadavg()[0]:.2f}", flush=True)
            for key, samples in times.items():
                ratio = float(np.median(np.array(samples) / base))
                cpu_ratio = float(np.median(np.array(cpu[key]) / cpu_base))
                print(f"  {key:40s} {np.median(samples) * 1e3:7.2f} ms  {ratio:.3f}x unprotected  "
                      f"(CPU time {cpu_ratio:.3f}x)", flush=True)
            versus = float(np.median(np.array(times["no-copy check"]) / np.array(times["runtime (load_session)"])))
            print(f"  no-copy check / runtime mode, same rounds: {versus:.3f}x", flush=True)


def checks_alone(checked: onnx.ModelProto) -> onnx.ModelProto:
    """The check nodes of `checked` alone (without their activation input), with their initializers."""
    nodes = [helper.make_node(n.op_type, list(n.input[:2]), list(n.output), domain=n.domain, name=n.name,
                              word_bits=WORD) for n in checked.graph.node if n.domain == DOMAIN]
    return alone_graph(checked, nodes)


def decode_alone(protected: onnx.ModelProto) -> onnx.ModelProto:
    """The ParityCheckUnpack nodes of a runtime-mode model alone, with their packed initializers."""
    return alone_graph(protected, [n for n in protected.graph.node if n.domain == schema.DOMAIN])


def alone_graph(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A model of `nodes` alone: no inputs, their first outputs as outputs, the initializers they read."""
    read = {name for n in nodes for name in n.input}
    return helper.make_model(
        helper.make_graph(nodes, "alone", [], [helper.make_empty_tensor_value_info(n.output[0]) for n in nodes],
                          [t for t in model.graph.initializer if t.name in read]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)


def interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int, runs: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per session, the median wall and process CPU seconds of `runs` timed runs (after one untimed) in each of
    `rounds` rotating turns (CPU time: all threads, less disturbed by other jobs on a loaded machine)."""
    times: dict[str, list[float]] = {key: [] for key in sessions}
    cpu: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            s.run_with_ort_values(None, feeds)
            wall, used = [], []
            for _ in range(runs):
                started, cpu_started = time.perf_counter(), time.process_time()
                s.run_with_ort_values(None, feeds)
                wall.append(time.perf_counter() - started)
                used.append(time.process_time() - cpu_started)
            times[key].append(float(np.median(wall)))
            cpu[key].append(float(np.median(used)))
    return times, cpu


# ----------------------------------------------------------------------------- soundness


def soundness(args: argparse.Namespace) -> None:
    """Prints the masking, ordering, rewrite and external-data findings per model."""
    for name in args.models.split(","):
        model = onnx.load(model_zoo.paper_cnn(name))
        optimized = runtime.optimize_for_cpu(model)
        checked, names = with_checks(optimized)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)
        feeds = {model.graph.input[0].name: x}
        print(f"\n{name}: {len(names)} checked weights")
        tensors = {t.name: t for t in checked.graph.initializer}
        gemm = max((n for n in checked.graph.node if n.op_type in ("Gemm", "FusedGemm")),
                   key=lambda n: numpy_helper.to_array(tensors[n.input[1]]).size)
        conv = next(n for n in checked.graph.node if n.op_type in ("Conv", "FusedConv") and n.input[1] in names)
        print(f"  weights flipped: {gemm.domain or 'ai.onnx'}.{gemm.op_type} {gemm.input[1]}, "
              f"{conv.domain or 'ai.onnx'}.{conv.op_type} {conv.input[1]}")
        clean = session(checked, options(library=True, optimize=False, prepacking=False)).run(None, feeds)[0]
        for index, weight in enumerate((gemm.input[1], conv.input[1])):
            faulty, reference = flipped(checked, weight)
            expected = session(reference, options(library=False, optimize=False, prepacking=False)).run(None, feeds)[0]
            for prepacking in (False, True):
                got = session(faulty, options(library=True, optimize=False, prepacking=prepacking)).run(None, feeds)[0]
                print(f"  flip in {weight} (prepacking {'on' if prepacking else 'off'}): first run "
                      f"{'equals' if np.array_equal(got, expected) else 'DIFFERS FROM'} the codec-masked model "
                      f"(max |diff| {np.abs(got - expected).max():.3g}; the flip moved the output by "
                      f"{np.abs(expected - clean).max():.3g})")
            if index == 0:
                external_data(faulty, expected, feeds)
        order(checked, "after the activation")
        order(with_checks(optimized, after_input=False)[0], "bias dependency only")
        nchwc_rewrite(model)


def flipped(model: onnx.ModelProto, weight: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The model with bit 30 of the middle element of `weight` flipped, and the model whose weight is the numpy
    codec's decode of those flipped words (that word masked), with the check nodes removed."""
    faulty = onnx.ModelProto()
    faulty.CopyFrom(model)
    tensor = next(t for t in faulty.graph.initializer if t.name == weight)
    values = numpy_helper.to_array(tensor).copy()
    flat = values.reshape(-1).view(np.uint32)
    flat[flat.size // 2] ^= np.uint32(1 << 30)
    tensor.CopyFrom(numpy_helper.from_array(values, weight))
    decoded = codec.decode(codec.pack(values, WORD), "fp32", WORD, values.shape)
    reference = onnx.ModelProto()
    reference.CopyFrom(faulty)
    next(t for t in reference.graph.initializer if t.name == weight).CopyFrom(
        numpy_helper.from_array(np.asarray(decoded.weights, np.float32), weight))
    passes = {n.output[0]: n.input[1] for n in reference.graph.node if n.domain == DOMAIN}
    nodes = [n for n in reference.graph.node if n.domain != DOMAIN]
    for node in nodes:
        for index, value in enumerate(node.input):
            node.input[index] = passes.get(value, value)
    del reference.graph.node[:]
    reference.graph.node.extend(nodes)
    print(f"    codec masks {decoded.masked_words} word(s) of {weight}")
    return faulty, reference


def order(checked: onnx.ModelProto, label: str) -> None:
    """Whether each check runs right before its consumer in one profiled run, and the checks' share of it."""
    with tempfile.TemporaryDirectory() as folder:
        s = session(checked, options(library=True, optimize=False, prepacking=False, profile=f"{folder}/p"))
        x = np.zeros((1, 3, 224, 224), np.float32)
        s.run(None, {checked.graph.input[0].name: x})
        s.run(None, {checked.graph.input[0].name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last_run = kernels[len(kernels) // 2:]
    sequence = [e["name"][: -len("_kernel_time")] for e in last_run]
    consumers = {n.input[2]: n.name for n in checked.graph.node if n.domain != DOMAIN and len(n.input) > 2}
    checks = {n.name: consumers[n.output[0]] for n in checked.graph.node if n.domain == DOMAIN}
    adjacent = sum(1 for a, b in zip(sequence, sequence[1:], strict=False) if checks.get(a) == b)
    check_us = sum(e["dur"] for e in last_run if e["name"][: -len("_kernel_time")] in checks)
    total_us = sum(e["dur"] for e in last_run)
    print(f"  order ({label}): {adjacent} of {len(checks)} checks run right before their consumer; checks "
          f"{check_us / 1e3:.2f} ms of {total_us / 1e3:.2f} ms kernel time (batch 1, profiled run)")


def nchwc_rewrite(model: onnx.ModelProto) -> None:
    """Whether onnxruntime's CPU optimisation, given the checks on the unoptimised model, keeps the consumers
    reading the checked initializers."""
    checked, names = with_checks(model)
    with tempfile.TemporaryDirectory() as folder:
        settings = options(library=True)
        settings.optimized_model_filepath = f"{folder}/optimized.onnx"
        session(checked, settings)
        result = onnx.load(settings.optimized_model_filepath)
    read = {n.input[1] for n in result.graph.node if n.domain != DOMAIN and len(n.input) > 1}
    nchwc = sum(1 for n in result.graph.node if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv")
    print(f"  checks added before optimisation: {nchwc} NchwcConv nodes; {len(read & set(names))} of "
          f"{len(names)} checked initializers still read by a consumer")


def external_data(faulty: onnx.ModelProto, expected: np.ndarray, feeds: dict) -> None:
    """Whether the model with a flipped word, saved with external data and opened by path, gets its checks
    (refused in read-only memory) and masks the word, how this process maps the data file while the session
    lives, and whether the file stays as written."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(faulty, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
                  size_threshold=0)
        written = (Path(folder) / "model.data").read_bytes()
        for settings, label in ((options(library=True, optimize=False, prepacking=False), "graph as stored"),
                                (options(library=True, prepacking=False), "graph optimised")):
            try:
                s = ort.InferenceSession(str(path), settings)
                maps = [line.split()[1] for line in Path("/proc/self/maps").read_text().splitlines()
                        if line.endswith("model.data")]
                got = s.run(None, feeds)[0]
                print(f"  external data, opened by path ({label}): checks run, first run "
                      f"{'equals' if np.array_equal(got, expected) else 'DIFFERS FROM'} the codec-masked model; "
                      f"model.data mapped {len(maps)} time(s) ({', '.join(sorted(set(maps))) or 'not mapped'}); "
                      f"file {'unchanged' if (Path(folder) / 'model.data').read_bytes() == written else 'CHANGED'}")
                del s
            except Exception as error:  # onnxruntime's exception types
                print(f"  external data, opened by path ({label}): refused: {str(error).splitlines()[0][:200]}")


def main() -> None:
    """Builds the study kernel and runs the command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("latency", "soundness"):
        sub = commands.add_parser(command)
        sub.add_argument("--models", default="mobilenet_v2,resnet50")
        if command == "latency":
            sub.add_argument("--batches", default="1,8")
            sub.add_argument("--rounds", type=int, default=12)
            sub.add_argument("--runs", type=int, default=5)
            sub.add_argument("--variants", action="store_true",
                             help="also the check ordered by its bias alone, and the optimised graph with prepacking")
    args = parser.parse_args()
    build_library()
    latency(args) if args.command == "latency" else soundness(args)


if __name__ == "__main__":
    main()
