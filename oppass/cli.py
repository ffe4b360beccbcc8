"""The `oppass` command line: thin shells over the Python API.

Each subcommand lives in a `register_*(subparsers)` function that adds its parser and
sets `run` to the function executing it; `REGISTRARS` lists them in help order. User
errors print one line `oppass: error: ...` on stderr and exit with status 2. The campaign
subcommand (dask, scipy, matplotlib) is imported only when the command line may need it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException

from oppass import codec, graph, modelio, runtime
from oppass.errors import OppassError

ERROR_STATUS = 2
BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE, as a shell reports it
# What running a model for the drift check can raise: a missing library (OppassError), onnxruntime
# errors, and EncodeError for models over 2 GB, which cannot be handed to onnxruntime as bytes.
RUN_FAILURES = (OppassError, Fail, InvalidArgument, InvalidGraph, RuntimeException, EncodeError)
DRIFT_SEED = 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `oppass` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    arguments = build_parser(argv).parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            arguments.run(arguments)
        except OppassError as error:
            print(f"oppass: error: {error}", file=sys.stderr)
            return ERROR_STATUS
        except BrokenPipeError:  # the reader (`| head`) stopped early: not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return BROKEN_PIPE_STATUS
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. When `argv` starts with one of LIGHT_COMMANDS, the campaign subcommand,
    whose imports take most of a second, is left out: that command line cannot reach it."""
    parser = argparse.ArgumentParser(prog="oppass", description="Opportunistic Parity protection for ONNX models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    light = bool(argv) and argv[0] in LIGHT_COMMANDS
    for register in REGISTRARS:
        if not (light and register is register_campaign):
            register(subparsers)
    return parser


# ----------------------------------------------------------------------------- transform


def register_transform(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("transform", help="protect the weights of a model")
    parser.add_argument("input", help="ONNX model to protect")
    parser.add_argument("output", help="where to write the protected model")
    parser.add_argument("--format", default="keep", choices=graph.FORMAT_CHOICES,
                        help="stored weight format; keep = each weight's own (default: keep)")
    parser.add_argument("--word", default="64", choices=[str(size) for size in codec.WORD_SIZES],
                        help="memory word size in bits, or one word per weight (default: 64)")
    parser.add_argument("--flip", default="word-lsb", choices=codec.FLIP_STRATEGIES,
                        help="which weight's LSB makes an odd word even (default: word-lsb)")
    parser.add_argument("--ops", default="Conv,Gemm", type=_comma_list,
                        help=f"comma-separated op types to protect, of {','.join(graph.WEIGHT_INPUT)} "
                             "(default: Conv,Gemm)")
    parser.add_argument("--check", default="runtime", choices=graph.CHECK_MODES,
                        help="check parity on every run, once at load, or never (default: runtime)")
    parser.add_argument("--report-faults", action="store_true",
                        help="add the graph output oppass_masked_words (masked words per run)")
    parser.add_argument("--optimize-for-cpu", action="store_true",
                        help="protect the graph onnxruntime optimises for this CPU (NCHWc Conv layout, fused "
                             "activations), which keeps its fast Conv kernels in runtime check mode; the output "
                             "then runs on onnxruntime only, on CPUs like this one")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running both models to measure the fault-free output drift")
    parser.set_defaults(run=run_transform)


def run_transform(arguments: argparse.Namespace) -> None:
    # The weights stay in the input file until the pass reads them, one at a time, and the save copies
    # the unprotected ones straight from it: the model is protected in place, never held twice.
    source = modelio.read_model(arguments.input, defer=True)
    modelio.check_destination(arguments.output, source)
    model: onnx.ModelProto | modelio.ModelFile = source
    if arguments.optimize_for_cpu:  # a new model in memory, protected in place and saved on its own
        model, source = runtime.optimize_for_cpu(source.load_deferred()), None
    protected, report = graph.transform_with_report(
        model,
        format=arguments.format,
        word=arguments.word,
        flip=arguments.flip,
        ops=arguments.ops,
        check=arguments.check,
        report_faults=arguments.report_faults,
        inplace=True,
    )
    modelio.save_model(protected, arguments.output, source=source)
    del source, protected  # the drift check reads both files; free the weights before it
    rows = _report_rows(report)
    rows.append(("fault-free output drift", "skipped (--no-verify)" if arguments.no_verify
                 else _drift_text(arguments.input, arguments.output)))
    _print_table(rows)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _report_rows(report: graph.TransformReport) -> list[tuple[str, str]]:
    conversion = report.max_conversion_error
    return [
        ("tensors protected", str(len(report.tensors))),
        ("weights", f"{report.weights:,}"),
        ("stored bytes before", f"{report.bytes_before:,}"),
        ("stored bytes after", f"{report.bytes_after:,}"),
        ("words whose LSB was flipped", f"{report.flipped_words:,}"),
        ("largest relative weight change", f"{report.max_flip_change:.3g}"),
        ("largest conversion error (x max|w|)", "none (no conversion)" if conversion is None else f"{conversion:.3g}"),
    ]


ModelSource = onnx.ModelProto | str | os.PathLike


def _drift_text(original: ModelSource, protected: ModelSource) -> str:
    """Max abs difference of all outputs on one random input, or why it could not be measured."""
    try:
        return f"{output_drift(original, protected):.3g} (max abs, one random input)"
    except RUN_FAILURES as error:
        return f"skipped: model could not be run ({str(error).strip().splitlines()[0][:200]})"


def output_drift(original: ModelSource, protected: ModelSource) -> float:
    """Max abs difference between the outputs of both models (protos or files) on one seeded random input.

    One session at a time: the plain model's outputs are computed and its session freed
    before the protected model is loaded.
    """
    plain = ort.InferenceSession(_session_input(original))
    feeds = _random_feeds(plain.get_inputs(), np.random.default_rng(DRIFT_SEED))
    names = [output.name for output in plain.get_outputs()]
    expected = plain.run(names, feeds)
    del plain
    if isinstance(protected, onnx.ModelProto):
        guarded = runtime.load_session(protected)
    else:  # decode nodes run in the session whatever their check mode: same outputs as load-time folding
        guarded = ort.InferenceSession(_session_input(protected), runtime.session_options())
    actual = guarded.run(names, feeds)
    differences = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0)
                   for a, b in zip(expected, actual)]
    return float(max(differences, default=0.0))


def _session_input(model: ModelSource) -> bytes | str:
    """What onnxruntime opens: a file by its path (external data resolved next to it), or a proto's bytes."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return str(model) if modelio.is_protobuf_file(model) else modelio.load_model(model).SerializeToString()


def _random_feeds(inputs: list[ort.NodeArg], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One random tensor per model input: dynamic dims are 1, floats normal, integers zero."""
    feeds = {}
    for node_arg in inputs:
        element_type = _ORT_ELEMENT_TYPES.get(node_arg.type)
        if element_type is None:
            raise OppassError(f"input {node_arg.name!r} has unsupported type {node_arg.type}")
        shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in node_arg.shape]
        dtype = helper.tensor_dtype_to_np_dtype(element_type)
        feeds[node_arg.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" \
            else np.zeros(shape, dtype=dtype)
    return feeds


_ORT_ELEMENT_TYPES = {
    "tensor(float)": onnx.TensorProto.FLOAT,
    "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(double)": onnx.TensorProto.DOUBLE,
    "tensor(int64)": onnx.TensorProto.INT64,
    "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(int8)": onnx.TensorProto.INT8,
    "tensor(uint8)": onnx.TensorProto.UINT8,
    "tensor(bool)": onnx.TensorProto.BOOL,
}


# ----------------------------------------------------------------------------- inspect, inject, strip


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="list the protected tensors of a model")
    parser.add_argument("model", help="protected ONNX model")
    parser.set_defaults(run=run_inspect)


def run_inspect(arguments: argparse.Namespace) -> None:
    tensors = graph.inspect(arguments.model)
    if not tensors:
        print("no protected tensors")
        return
    header = ("tensor", "format", "word bits", "shape", "check", "output", "packed")
    rows = [
        (t.name, t.format, str(t.word_bits), _dims(t.shape), t.check, t.output_type,
         f"{t.packed_dtype} {_dims(t.packed_shape)}")
        for t in tensors
    ]
    _print_table([header, *rows])


def register_inject(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inject", help="flip random bits in the packed weights of a protected model")
    parser.add_argument("input", help="protected ONNX model")
    parser.add_argument("output", help="where to write the faulty model")
    parser.add_argument("--ber", type=float, required=True, help="bit error rate: probability of each bit flipping")
    parser.add_argument("--seed", type=int, required=True, help="random seed")
    parser.set_defaults(run=run_inject)


def run_inject(arguments: argparse.Namespace) -> None:
    source = modelio.read_model(arguments.input)
    modelio.check_destination(arguments.output, source)
    faulty, flips = graph.inject(source.model, arguments.ber, arguments.seed)
    modelio.save_model(faulty, arguments.output, source=source)
    print(f"{flips} bits flipped")


def register_strip(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("strip", help="turn a protected model back into a plain one (no parity check)")
    parser.add_argument("input", help="protected ONNX model")
    parser.add_argument("output", help="where to write the plain model")
    parser.set_defaults(run=run_strip)


def run_strip(arguments: argparse.Namespace) -> None:
    source = modelio.read_model(arguments.input)
    modelio.check_destination(arguments.output, source)
    modelio.save_model(graph.strip(source.model), arguments.output, source=source)


# ----------------------------------------------------------------------------- output helpers


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Prints rows of cells as left-aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for line in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _print_warning(message: Warning | str, *_: object) -> None:
    """warnings.showwarning replacement: one line on stderr."""
    print(f"oppass: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- demo


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="protect the bundled digits CNN and compare accuracies under faults")
    parser.add_argument("--out", default="oppass-demo", help="folder for the campaign results (default: oppass-demo)")
    parser.set_defaults(run=run_demo)


def run_demo(arguments: argparse.Namespace) -> None:
    from oppass.demo import format_result, run_demo as demo

    print(format_result(demo(Path(arguments.out))))


def register_campaign(subparsers: argparse._SubParsersAction) -> None:
    from oppass.campaign import cli as campaign_cli  # dask, scipy, matplotlib: imported only for this parser

    campaign_cli.register(subparsers)


REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    register_transform,
    register_inspect,
    register_inject,
    register_strip,
    register_campaign,
    register_demo,
)
# Subcommands whose command lines never need the campaign parser.
LIGHT_COMMANDS = ("transform", "inspect", "inject", "strip", "demo")


if __name__ == "__main__":
    sys.exit(main())
