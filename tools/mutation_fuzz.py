#!/usr/bin/env python3
"""Mutation fuzzer of the command line: hostile models through transform, inspect, strip and inject.

    .venv/bin/python tools/mutation_fuzz.py [--cases 500 | --seconds 900] [--seed 0] [--failures DIR]

It builds small seed models (plain and protected in every format, with external data, sparse
and function tensors), mutates each case's model (its attributes, tensors, names, imports,
external-data references, serialised bytes, text formats) and its command-line options, and
runs one command per case in a child process (forked from this one after the imports, so a
case costs milliseconds; a crash or a hang stays in the child). Each case must end in one of
two ways:

- exit status 0, stderr only `oppass: warning: ` lines, the output (for commands that write)
  a model onnx reads, no temporary file left;
- exit status 2, stderr exactly one `oppass: error: ` line, no file created or changed;

and in both, no traceback and the input files untouched. Any other ending (a traceback, a
signal, a hang past --timeout, a stray file) is a failure: the case's files, command and stderr
are kept under --failures. Prints one summary line per command and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from oppass import cli, protect
from oppass.formats import FLIP_STRATEGIES, WORD_SIZES
from oppass.modelio import all_tensors
from oppass.protect import FORMAT_CHOICES
from oppass.schema import CHECK_MODES

COMMANDS = ("transform", "inspect", "strip", "inject")
TEXT_SUFFIXES = (".json", ".textproto", ".onnxtxt")
ATTRIBUTE_TYPES = list(range(0, 15)) + [99, -1]
DATA_TYPES = list(range(-1, 27)) + [99, 2**31 - 1]
INTEGERS = [0, 1, -1, 2, 3, 7, 8, 16, 32, 64, 128, 256, 512, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -2**63]


# ----------------------------------------------------------------------------- seeds


def _weights(shape: list[int], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _plain_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w"], ["y"], transB=1)]
    initializers = [numpy_helper.from_array(_weights([16, 3, 3, 3], rng), "conv.w"),
                    numpy_helper.from_array(_weights([16], rng), "conv.b"),
                    numpy_helper.from_array(_weights([5, 16 * 36], rng), "fc.w")]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _with_extras(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """Adds a sparse initializer, a model function with a Constant and an If with a branch initializer."""
    values = numpy_helper.from_array(_weights([300], rng), "s")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        values, numpy_helper.from_array(np.arange(0, 600, 2, dtype=np.int64)), [600]))
    constant = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_weights([300], rng), "k"))
    model.functions.append(helper.make_function("fuzz.functions", "Shift", ["a"], ["b"],
                                                [constant, helper.make_node("Add", ["a", "k"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    model.opset_import.append(helper.make_opsetid("fuzz.functions", 1))
    return model


def seed_models(rng: np.random.Generator) -> list[tuple[str, onnx.ModelProto]]:
    """(name, model) of every seed: plain, protected in each format, word and check mode, with extras."""
    seeds = [("plain", _plain_cnn(rng)), ("plain+extras", _with_extras(_plain_cnn(rng), rng))]
    for fmt, word, check in [("keep", "64", "runtime"), ("bf16", "64", "load"), ("fp16", "32", "none"),
                             ("int8", "256", "runtime"), ("keep", "weight", "load"), ("int8", "weight", "runtime")]:
        protected = protect.transform(_plain_cnn(rng), format=fmt, word=word, check=check,
                                      report_faults=check == "runtime")
        seeds.append((f"{fmt}/{word}/{check}", protected))
    return seeds


# ----------------------------------------------------------------------------- mutations


def _raw_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (any bytes, where protobuf's setters insist on UTF-8)."""
    out, length = bytearray([number << 3 | 2]), len(payload)
    while length > 0x7F:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out) + payload


def _random_bytes(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\0", b"\xff\xfe", b"fp32\0", b"a" * 300, b"\n\r\x1b[31m", bytes(rng.randrange(256)
                                                                                                 for _ in range(8))])


def _decode_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == "ai.oppass"] or list(model.graph.node)


def mutate_attribute(model: onnx.ModelProto, rng: random.Random) -> str:
    """Changes a decode node's attribute: its type, values, bytes; or repeats or removes it."""
    node = rng.choice(_decode_nodes(model))
    if not node.attribute:
        return "no attribute"
    attribute = rng.choice(node.attribute)
    choice = rng.randrange(7)
    if choice == 0:
        attribute.type = rng.choice(ATTRIBUTE_TYPES)  # type: ignore[assignment]
    elif choice == 1:
        attribute.i = rng.choice(INTEGERS)
    elif choice == 2:
        del attribute.ints[:]
        attribute.ints.extend(rng.choice(INTEGERS) for _ in range(rng.randrange(0, 6)))
    elif choice == 3:
        attribute.MergeFromString(_raw_field(4, _random_bytes(rng)))  # field s
    elif choice == 4:
        node.attribute.append(attribute)
    elif choice == 5:
        node.attribute.remove(attribute)
    else:
        attribute.f = rng.choice([0.0, float("nan"), float("inf"), 64.0])
    return f"attribute {attribute.name} #{choice}"


def mutate_tensor(model: onnx.ModelProto, rng: random.Random) -> str:
    """Changes a tensor: data type, dims, data length, typed field, segment, external data, name."""
    tensors = list(all_tensors(model))
    if not tensors:
        return "no tensor"
    tensor = rng.choice(tensors)
    choice = rng.randrange(9)
    if choice == 0:
        tensor.data_type = rng.choice(DATA_TYPES)
    elif choice == 1:
        dims = list(tensor.dims)
        if dims and rng.random() < 0.5:
            dims[rng.randrange(len(dims))] = rng.choice(INTEGERS)
        else:
            dims.append(rng.choice([0, 1, 2, 2**40]))
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif choice == 2:
        tensor.raw_data = tensor.raw_data[:rng.randrange(len(tensor.raw_data) + 1)]
    elif choice == 3:
        tensor.raw_data = tensor.raw_data + bytes(rng.randrange(1, 16))
    elif choice == 4:  # the values in a typed field (some short)
        values = numpy_helper.to_array(tensor).ravel() if tensor.HasField("raw_data") else np.zeros(3)
        tensor.ClearField("raw_data")
        count = max(len(values) - rng.randrange(2), 0)
        tensor.float_data.extend(float(v) for v in values[:count].astype(np.float64))
    elif choice == 5:
        tensor.segment.begin, tensor.segment.end = rng.choice(INTEGERS), rng.choice(INTEGERS)
    elif choice == 6:
        tensor.data_location = rng.choice([TensorProto.DEFAULT, TensorProto.EXTERNAL])
    elif choice == 7:
        entries = {"location": rng.choice(["model.onnx.data", "../x", "/etc/passwd", "a" * 5000, "missing",
                                           ".", "model.onnx", "w\0x", "model.onnx.data"]),
                   "offset": rng.choice(["0", "-1", "4096", "1e3", "x", str(2**70)]),
                   "length": rng.choice(["0", "16", "100000", "-5", ""])}
        for key in rng.sample(list(entries), rng.randrange(1, 4)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, entries[key]
        tensor.data_location = TensorProto.EXTERNAL
    elif rng.random() < 0.5:
        tensor.MergeFromString(_raw_field(8, _random_bytes(rng)))  # name
    else:  # an external-data entry of any bytes (StringStringEntryProto: key 1, value 2)
        tensor.MergeFromString(_raw_field(13, _raw_field(1, rng.choice([b"location", b"\xff"]))
                                          + _raw_field(2, _random_bytes(rng))))
        tensor.data_location = TensorProto.EXTERNAL
    return f"tensor {tensor.name!r} #{choice}"


def mutate_graph(model: onnx.ModelProto, rng: random.Random) -> str:
    """Changes the graph: nodes removed, repeated, renamed, reordered, rewired; imports; IR version."""
    graph = model.graph
    choice = rng.randrange(9)
    if choice == 0 and graph.node:
        del graph.node[rng.randrange(len(graph.node))]
    elif choice == 1 and graph.node:
        graph.node.append(graph.node[rng.randrange(len(graph.node))])
    elif choice == 2 and graph.node:
        node = rng.choice(graph.node)
        node.MergeFromString(_raw_field(rng.choice([1, 2, 3, 4, 7]), _random_bytes(rng)))  # input/output/name/op/domain
    elif choice == 3 and graph.initializer:
        del graph.initializer[rng.randrange(len(graph.initializer))]
    elif choice == 4:
        imports = [entry for entry in model.opset_import if entry.domain == "ai.oppass"]
        if imports and rng.random() < 0.5:
            imports[0].version = rng.choice([0, 2, -1, 2**40])
        elif imports:
            model.opset_import.remove(imports[0])
        else:
            model.opset_import.append(helper.make_opsetid("ai.oppass", 1))
    elif choice == 5:
        model.ir_version = rng.choice([0, 1, 3, 99, -1])
    elif choice == 6 and graph.node:
        nodes = list(graph.node)
        rng.shuffle(nodes)
        del graph.node[:]
        graph.node.extend(nodes)
    elif choice == 7 and graph.node:
        node = rng.choice(graph.node)
        del node.input[:]
        node.input.extend(rng.choice([[], ["x"], ["", "x"], ["missing"], list(graph.node[0].output) * 3]))
    elif graph.node:
        node = rng.choice(graph.node)
        node.domain = rng.choice(["ai.oppass", "", "ai.onnx", "com.microsoft"])
        node.op_type = rng.choice(["ParityCheckUnpack", "Conv", "Unknown", ""])
    return f"graph #{choice}"


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flips, sets, deletes, inserts or truncates bytes, or inserts an over-long varint."""
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        if not buffer:
            break
        position = rng.randrange(len(buffer))
        choice = rng.randrange(6)
        if choice == 0:
            buffer[position] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buffer[position] = rng.randrange(256)
        elif choice == 2:
            del buffer[position:position + rng.randrange(1, 64)]
        elif choice == 3:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif choice == 4:
            del buffer[position:]
        else:
            buffer[position:position] = b"\x80\x80\x80\x80\x80\x00"  # an over-long varint
    return bytes(buffer)


MODEL_MUTATIONS: list[Callable[[onnx.ModelProto, random.Random], str]] = [mutate_attribute, mutate_tensor,
                                                                          mutate_graph]


def mutate(model: onnx.ModelProto, rng: random.Random) -> str:
    """One random mutation of `model`; what it did (protobuf or onnx refuse some: then it did nothing)."""
    mutation = rng.choice(MODEL_MUTATIONS)
    try:
        return mutation(model, rng)
    except Exception as error:  # noqa: BLE001 - protobuf's and onnx's refusals of a value
        return f"{mutation.__name__} refused ({type(error).__name__})"


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One command run on one mutated model."""

    number: int
    seed_name: str
    mutations: list[str]
    arguments: list[str]


def _options(command: str, rng: random.Random) -> list[str]:
    if command == "transform":
        options = ["--format", rng.choice(FORMAT_CHOICES), "--word", rng.choice([str(size) for size in WORD_SIZES]),
                   "--flip", rng.choice(FLIP_STRATEGIES), "--check", rng.choice(CHECK_MODES),
                   "--ops", rng.choice(["Conv,Gemm", "Conv", "Gemm,MatMul", "Unknown"])]
        if rng.random() < 0.3:
            options.append("--report-faults")
        if rng.random() < 0.85:
            options.append("--no-verify")
        return options
    if command == "inject":
        return ["--ber", rng.choice(["0", "1e-3", "0.5", "1", "-0.1", "2", "nan", "inf", "1e-300"]),
                "--seed", rng.choice(["0", "7", "-1", str(2**70), str(-2**63)])]
    return []


def write_case(folder: Path, model: onnx.ModelProto, rng: random.Random, mutations: list[str]) -> Path:
    """Writes the case's input (binary, text format or mutated bytes; sometimes with external data)."""
    suffix = ".onnx" if rng.random() < 0.85 else rng.choice(TEXT_SUFFIXES)
    path = folder / f"model{suffix}"
    try:
        if rng.random() < 0.3:
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=64,
                            convert_attribute=rng.random() < 0.5)
            if rng.random() < 0.3:
                data = folder / "model.onnx.data"
                data.write_bytes(mutate_bytes(data.read_bytes(), rng))
                mutations.append("data bytes")
        elif suffix == ".onnx":
            data = model.SerializeToString()
            if rng.random() < 0.4:
                data = mutate_bytes(data, rng)
                mutations.append("bytes")
            path.write_bytes(data)
        else:
            onnx.save_model(model, path, format=onnx.serialization.registry.get_format_from_file_extension(suffix))
            if rng.random() < 0.2:
                path.write_bytes(mutate_bytes(path.read_bytes(), rng))
                mutations.append("text bytes")
    except Exception as error:  # noqa: BLE001 - a mutation onnx cannot save: write its bytes as they are
        mutations.append(f"unsavable ({type(error).__name__})")
        for leftover in folder.iterdir():
            if leftover.is_file():
                leftover.unlink()
        path = folder / "model.onnx"
        try:
            path.write_bytes(model.SerializeToString())
        except Exception:  # noqa: BLE001
            path.write_bytes(b"\x08")
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_child(arguments: list[str], stderr_path: Path, timeout: float) -> int | str:
    """Runs `oppass <arguments>` in a forked child; its exit status, or 'signal N' / 'hang'."""
    pid = os.fork()
    if pid == 0:  # the child: the command, its stderr to a file, stdout discarded
        status = 70
        try:
            descriptor = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(descriptor, 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w")
            status = cli.main(arguments)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # a traceback: printed, and the case fails on it
            import traceback

            traceback.print_exc()
            status = 1
        finally:
            sys.stderr.flush()
            os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(wait_status):
                return f"signal {os.WTERMSIG(wait_status)}"
            return os.WEXITSTATUS(wait_status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang"
        time.sleep(0.005)


def check_case(command: str, status: int | str, stderr: str, before: dict[str, str], after: dict[str, str],
               output: Path) -> str | None:
    """What is wrong with how a case ended, or None."""
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        return "traceback"
    if status == 2:
        if len(lines) != 1 or not lines[0].startswith("oppass: error: "):
            return f"error is not one line: {stderr[:300]!r}"
        if after != before:
            return "a refused command created or changed files"
        return None
    if status != 0:
        return f"exit status {status}"
    if any(not line.startswith("oppass: warning: ") for line in lines):
        return f"unexpected stderr on success: {stderr[:300]!r}"
    inputs = {name: digest for name, digest in before.items()}
    if any(after.get(name) != digest for name, digest in inputs.items()):
        return "the input was changed"
    stray = [name for name in after if name.endswith(".tmp")]
    if stray:
        return f"temporary files left: {stray}"
    if command in ("transform", "strip", "inject"):
        if not output.is_file():
            return "success without an output"
        try:
            onnx.load_model(str(output), load_external_data=True)
        except Exception as error:  # noqa: BLE001
            return f"the output is not a model onnx reads ({type(error).__name__}: {str(error)[:200]})"
    return None


def main() -> int:
    """Runs the fuzzer; exit status 1 if any case failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default: until --seconds)")
    parser.add_argument("--seconds", type=float, default=60.0, help="run time when --cases is not given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--failures", type=Path, default=Path("fuzz-failures"), help="where failing cases go")
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    seeds = seed_models(np.random.default_rng(arguments.seed))
    outcomes: dict[str, Counter] = {command: Counter() for command in COMMANDS}
    failures = 0
    start = time.monotonic()
    number = 0
    with tempfile.TemporaryDirectory(prefix="oppass-fuzz-") as scratch:
        while (number < arguments.cases) if arguments.cases is not None else \
                (time.monotonic() - start < arguments.seconds):
            number += 1
            folder = Path(scratch) / "case"
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "out").mkdir(parents=True)
            command = rng.choice(COMMANDS)
            plain = [entry for entry in seeds if entry[0].startswith("plain")]
            seed_name, seed = rng.choice(plain if command == "transform" and rng.random() < 0.8 else seeds)
            model = onnx.ModelProto()
            model.CopyFrom(seed)
            mutations = [mutate(model, rng) for _ in range(rng.randrange(0, 4))]
            with warnings.catch_warnings():  # onnx's warnings on saving mutated models (the children keep theirs)
                warnings.simplefilter("ignore")
                source = write_case(folder, model, rng, mutations)
            output = folder / "out" / "result.onnx"
            arguments_list = [command, str(source)] + ([] if command == "inspect" else [str(output)]) \
                + _options(command, rng)
            before = _digests(folder)
            stderr_path = Path(scratch) / "stderr"
            status = run_child(arguments_list, stderr_path, arguments.timeout)
            stderr = stderr_path.read_text(errors="replace")
            after = _digests(folder)
            problem = check_case(command, status, stderr, before, after, output)
            outcomes[command]["failed" if problem else ("ok" if status == 0 else "refused")] += 1
            if problem:
                failures += 1
                kept = arguments.failures / f"case{number}"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(folder, kept)
                case = Case(number, seed_name, mutations, arguments_list)
                (kept / "case.json").write_text(json.dumps({**case.__dict__, "problem": problem, "status": status,
                                                            "stderr": stderr}, indent=1, default=str))
                print(f"case {number}: {problem} ({' '.join(arguments_list)}; {seed_name}; {mutations})",
                      flush=True)
    seconds = time.monotonic() - start
    for command, counts in outcomes.items():
        print(f"{command}: {counts['ok']} ok, {counts['refused']} refused in one line, {counts['failed']} failed")
    print(f"{number} cases in {seconds:.0f} s (seed {arguments.seed}): {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
