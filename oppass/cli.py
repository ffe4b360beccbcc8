"""The `oppass` command line: thin shells over the Python API.

Each subcommand is a `Command` in COMMANDS (help order): its name, its one-line help, the
function adding its arguments (which sets `run` to the function executing it). A command
line gets the arguments of the one subcommand it names only, so `oppass --help`, `--version`
and every subcommand import just what they need: onnx and onnxruntime are imported inside
the commands that use them, and the campaign's dependencies (the `campaign` extra) only by
`campaign` and `demo`, which say in one line what to install when they are missing. User
errors print one line `oppass: error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from oppass import __version__, files
from oppass.errors import Interrupted, OppassError
from oppass.formats import CODES, FLIP_STRATEGIES, PARITY, WORD_SIZES

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from oppass.reports import TransformReport

    ModelSource = onnx.ModelProto | str | os.PathLike

ERROR_STATUS = 2
# `transform` warns when the fault-free output drift exceeds this share of the original's largest |output|.
DRIFT_WARNING = 0.1
BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE, as a shell reports it
SIGNAL_STATUS = 128  # plus the signal's number, as a shell reports a process killed by it
INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DRIFT_SEED = 0
# Sizes the drift check gives a model's dynamic dims after each input's first (its batch, kept at 1), tried in
# turn while the original model fails on them (a reflect Pad, a convolution or a pooling window needs more than
# one sample or pixel).
DYNAMIC_DIM_SIZES = (1, 32, 256, 512)
# onnxruntime's log severity for the drift check's sessions: fatal only. Its warnings (unused initializers) are
# noise, and its errors are raised too: the summary reports them in its one line.
ORT_QUIET = 4


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its help line, and the function adding its arguments and `run`."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `oppass` command; returns the exit status."""
    arguments_given = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings(), _signals_interrupt():
        warnings.showwarning = _print_warning
        try:
            arguments = build_parser(arguments_given).parse_args(arguments_given)
            status = arguments.run(arguments)
        except OppassError as error:
            print(f"oppass: error: {error}", file=sys.stderr)
            return ERROR_STATUS
        except BrokenPipeError:  # the reader (`| head`) stopped early: not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return BROKEN_PIPE_STATUS
        except (Interrupted, KeyboardInterrupt, ImportError) as stop:
            if isinstance(stop, ImportError) and files.received_signal() is None:
                raise
            files.forget_interrupt_exit()
            # A signal during an import of onnxruntime's extension surfaces as its ImportError.
            signum = stop.signum if isinstance(stop, Interrupted) else files.received_signal() or signal.SIGINT
            print(f"oppass: error: stopped by {signal.Signals(signum).name} (no partly written file is left)",
                  file=sys.stderr)
            return SIGNAL_STATUS + signum
    return status or 0


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While the command runs, SIGINT, SIGTERM and SIGHUP raise Interrupted (so writes clean up), then as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, files.raise_interrupted) for signum in INTERRUPTING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser: every subcommand with its help line, and the arguments of the one that
    `argv` starts with (of all of them when `argv` is None)."""
    parser = argparse.ArgumentParser(prog="oppass", description="Opportunistic Parity protection for ONNX models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help)
        if argv is None or (len(argv) > 0 and argv[0] == command.name):
            command.add_arguments(subparser)
    return parser


# ----------------------------------------------------------------------------- transform


def add_transform_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass transform`."""
    from oppass.protect import FORMAT_CHOICES, KEEP_FORMAT, WEIGHT_INPUT
    from oppass.schema import CHECK_MODES, CORRECTED_WORDS_OUTPUT, MASKED_WORDS_OUTPUT

    parser.add_argument("input", help="ONNX model to protect")
    parser.add_argument("output", help="where to write the protected model")
    parser.add_argument("--format", default=KEEP_FORMAT, choices=FORMAT_CHOICES,
                        help=f"stored weight format; {KEEP_FORMAT} = each weight's own (default: {KEEP_FORMAT})")
    parser.add_argument("--word", default="64", choices=[str(size) for size in WORD_SIZES],
                        help="memory word size in bits, or one word per weight (default: 64)")
    parser.add_argument("--code", default=PARITY, choices=CODES,
                        help="parity: detect an odd number of flips per word and zero the word; secded: correct "
                             "one flip per word and zero words with two, in bits taken from the weights' lowest "
                             f"bits (default: {PARITY})")
    parser.add_argument("--range-check", action="store_true",
                        help="also zero every decoded weight whose magnitude exceeds its tensor's fault-free maximum")
    parser.add_argument("--flip", choices=FLIP_STRATEGIES,
                        help=f"parity only: which weight's LSB makes an odd word even (default: {FLIP_STRATEGIES[0]})")
    parser.add_argument("--ops", default="Conv,Gemm", type=_comma_list,
                        help=f"comma-separated op types to protect, of {','.join(WEIGHT_INPUT)} (default: Conv,Gemm)")
    parser.add_argument("--check", default=CHECK_MODES[0], choices=CHECK_MODES,
                        help="runtime: check parity on every run (ParityCheckUnpack, the oppass library); load: once "
                             "at session creation, in standard ONNX ops any onnxruntime runs (opset 26, no library); "
                             "load-custom: once at load by ParityCheckUnpack (oppass.load_session); none: never "
                             f"(default: {CHECK_MODES[0]})")
    parser.add_argument("--report-faults", action="store_true",
                        help=f"add the graph output {MASKED_WORDS_OUTPUT} (masked words per run), and with "
                             f"--code secded {CORRECTED_WORDS_OUTPUT} (corrected words per run)")
    parser.add_argument("--allow-unprotected", action="store_true",
                        help="write the model even when no weight was found to protect (default: that is an error)")
    parser.add_argument("--optimize-for-cpu", action="store_true",
                        help="protect the graph onnxruntime optimises for this CPU (NCHWc Conv layout, fused "
                             "activations), which keeps its fast Conv kernels in runtime check mode; the output "
                             "then runs on onnxruntime only, on CPUs like this one")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running both models to measure the fault-free output drift")
    parser.set_defaults(run=run_transform)


def run_transform(arguments: argparse.Namespace) -> None:
    """Runs `oppass transform`: protects, saves, prints the report and the drift."""
    from oppass import modelio
    from oppass.protect import transform_file, transform_with_report

    # The weights stay in the input file until the save reaches them: each is then read, encoded and
    # written before the next is read, and the save copies the unprotected ones straight from the input.
    read = modelio.read_model(arguments.input, defer=True)
    modelio.check_destination(arguments.output, read)
    if arguments.optimize_for_cpu and arguments.check in ("load", "load-custom"):
        raise OppassError(f"--optimize-for-cpu is for --check runtime: with --check {arguments.check} onnxruntime "
                          "optimises the decoded model itself when the session is created")
    options = {"format": arguments.format, "word": arguments.word, "flip": arguments.flip, "ops": arguments.ops,
               "check": arguments.check, "report_faults": arguments.report_faults, "code": arguments.code,
               "range_check": arguments.range_check, "allow_unprotected": arguments.allow_unprotected}
    if arguments.optimize_for_cpu:  # a new model in memory, protected in place and saved on its own
        from oppass import runtime  # onnxruntime: only when it runs a model

        protected, report = transform_with_report(runtime.optimize_for_cpu(read.load_deferred()), inplace=True,
                                                  **options)
        modelio.save_model(protected, arguments.output)
        del protected
    else:
        report = transform_file(read, arguments.output, **options)
    del read  # the drift check reads both files; free the weights before it
    rows = _report_rows(report, arguments.code, arguments.range_check)
    rows.append(("fault-free output drift", "skipped (--no-verify)" if arguments.no_verify
                 else _drift_text(arguments.input, arguments.output)))
    _print_table(rows)
    if report.nonfinite_weights:
        warnings.warn(f"{report.nonfinite_weights:,} protected weights are NaN or infinite (kept as they are)",
                      stacklevel=1)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _report_rows(report: TransformReport, code: str, range_check: bool) -> list[tuple[str, str]]:
    conversion = report.max_conversion_error
    unchecked = len(report.tensors) - report.range_checked
    ranges = "off" if not range_check else f"on ({report.range_checked} tensors" + (
        f"; none for {unchecked} holding NaN or infinity)" if unchecked else ")")
    return [
        ("tensors protected", str(len(report.tensors))),
        ("code", code),
        ("range check", ranges),
        ("weights", f"{report.weights:,}"),
        ("stored bytes before", f"{report.bytes_before:,}"),
        ("stored bytes after", f"{report.bytes_after:,}"),
        ("words changed by the encoding", f"{report.changed_words:,}"),
        ("largest relative weight change", f"{report.max_weight_change:.3g}"),
        ("largest conversion error (x max|w|)", "none (no conversion)" if conversion is None else f"{conversion:.3g}"),
        ("subnormal weights before / after", f"{report.subnormals_before:,} / {report.subnormals_after:,}"),
        ("non-finite weights (NaN, inf)", f"{report.nonfinite_weights:,}"),
    ]


def _drift_text(original: ModelSource, protected: ModelSource) -> str:
    """Max abs difference of all outputs on one random input, or why it could not be measured.

    Warns when the drift is not finite (the models' outputs differ in NaN or infinity) or
    exceeds DRIFT_WARNING times the largest finite |output| of the original model.
    """
    from google.protobuf.message import EncodeError
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        RuntimeException,
    )
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        NotImplemented as NotImplementedInOnnxruntime,
    )

    # What running a model can raise: a missing library (OppassError), onnxruntime's errors, and
    # EncodeError for models over 2 GB, which cannot be handed to onnxruntime as bytes.
    failures = (OppassError, Fail, InvalidArgument, InvalidGraph, NotImplementedInOnnxruntime, RuntimeException,
                EncodeError)
    try:
        drift = output_drift(original, protected)
    except failures as error:
        return f"skipped: model could not be run ({str(error).strip().splitlines()[0][:200]})"
    if not math.isfinite(drift.max_abs):
        warnings.warn("the protected model's outputs differ from the original's in NaN or infinite values "
                      "(fault-free): check the model before deploying it", stacklevel=1)
    elif drift.max_abs > DRIFT_WARNING * drift.largest_output:
        warnings.warn(f"the fault-free output drift {drift.max_abs:.3g} exceeds {DRIFT_WARNING:.0%} of the largest "
                      f"output magnitude {drift.largest_output:.3g}: check the protected model's accuracy",
                      stacklevel=1)
    return f"{drift.max_abs:.3g} (max abs, one random input)"


@dataclass(frozen=True)
class Drift:
    """How far a protected model's outputs are from the original's on one input.

    `max_abs` is the largest |protected - original| over all output elements, where equal
    values (the same infinity, NaN and NaN) differ by 0 and any other pair involving a NaN or
    an infinity differs by infinity; `largest_output` is the largest finite |original| output.
    """

    max_abs: float
    largest_output: float


def output_drift(original: ModelSource, protected: ModelSource) -> Drift:
    """The drift between the outputs of both models (protos or files) on one seeded random input.

    The input is the first the original model runs on (`_first_run`).

    One session at a time: the plain model's outputs are computed and its session freed
    before the protected model is loaded.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from oppass import modelio, runtime

    quiet = ort.SessionOptions()
    quiet.log_severity_level = ORT_QUIET
    plain = ort.InferenceSession(_session_input(original), quiet)
    names = [output.name for output in plain.get_outputs()]
    feeds, expected = _first_run(plain, names)
    del plain
    if isinstance(protected, onnx.ModelProto):  # the file's own decode nodes, not a re-protection for this CPU
        guarded = runtime.load_session(protected, optimize_runtime_checks=False)
    else:  # decode nodes run in the session whatever their check mode: same outputs as load-time folding
        custom = runtime.has_custom_ops(modelio.read_model(protected, defer=True).model)
        options = runtime.session_options(library=custom)
        options.log_severity_level = ORT_QUIET
        guarded = ort.InferenceSession(_session_input(protected), options)
    actual = guarded.run(names, feeds)
    differences, largest = [0.0], [0.0]
    for reference, value in zip(expected, actual, strict=True):
        reference64, value64 = np.asarray(reference, np.float64), np.asarray(value, np.float64)
        same = (reference64 == value64) | (np.isnan(reference64) & np.isnan(value64))
        with np.errstate(invalid="ignore"):
            difference = np.where(same, 0.0, np.abs(reference64 - value64))
        differences.append(float(np.nan_to_num(difference, nan=np.inf).max(initial=0.0)))
        largest.append(float(np.abs(reference64).max(where=np.isfinite(reference64), initial=0.0)))
    return Drift(max(differences), max(largest))


def _session_input(model: ModelSource) -> bytes | str:
    """What onnxruntime opens: a file by its path (external data resolved next to it), or a proto's bytes."""
    import onnx

    from oppass import modelio

    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return str(model) if modelio.is_protobuf_file(model) else modelio.load_model(model).SerializeToString()


def _first_run(session: ort.InferenceSession, names: list[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Seeded random feeds the session runs on, and its outputs: each of DYNAMIC_DIM_SIZES in turn for dynamic dims.

    The last size's error is raised when every size fails.
    """
    import numpy as np
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    inputs = session.get_inputs()
    dynamic = any(not (isinstance(dim, int) and dim > 0) for node_arg in inputs for dim in node_arg.shape)
    sizes = DYNAMIC_DIM_SIZES if dynamic else DYNAMIC_DIM_SIZES[:1]
    for size in sizes[:-1]:
        feeds = _random_feeds(inputs, np.random.default_rng(DRIFT_SEED), size)
        try:
            return feeds, session.run(names, feeds)
        except (Fail, InvalidArgument, RuntimeException):
            continue
    feeds = _random_feeds(inputs, np.random.default_rng(DRIFT_SEED), sizes[-1])
    return feeds, session.run(names, feeds)


def _random_feeds(inputs: list[ort.NodeArg], rng: np.random.Generator, dynamic_size: int) -> dict[str, np.ndarray]:
    """One random tensor per model input, floats normal, integers zero.

    An input's first dynamic dim (its batch, by convention) is 1, its other dynamic dims `dynamic_size`.
    """
    import numpy as np
    from onnx import TensorProto, helper

    element_types = {
        "tensor(float)": TensorProto.FLOAT,
        "tensor(float16)": TensorProto.FLOAT16,
        "tensor(double)": TensorProto.DOUBLE,
        "tensor(int64)": TensorProto.INT64,
        "tensor(int32)": TensorProto.INT32,
        "tensor(int8)": TensorProto.INT8,
        "tensor(uint8)": TensorProto.UINT8,
        "tensor(bool)": TensorProto.BOOL,
    }
    feeds = {}
    for node_arg in inputs:
        element_type = element_types.get(node_arg.type)
        if element_type is None:
            raise OppassError(f"input {node_arg.name!r} has unsupported type {node_arg.type}")
        fixed = [isinstance(dim, int) and dim > 0 for dim in node_arg.shape]
        batch_axis = fixed.index(False) if False in fixed else -1
        shape = [dim if is_fixed else 1 if axis == batch_axis else dynamic_size
                 for axis, (dim, is_fixed) in enumerate(zip(node_arg.shape, fixed, strict=True))]
        dtype = helper.tensor_dtype_to_np_dtype(element_type)
        feeds[node_arg.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" \
            else np.zeros(shape, dtype=dtype)
    return feeds


# ----------------------------------------------------------------------------- inspect, inject, strip


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass inspect`."""
    parser.add_argument("model", help="protected ONNX model")
    parser.set_defaults(run=run_inspect)


def run_inspect(arguments: argparse.Namespace) -> None:
    """Runs `oppass inspect`: one row per decode node."""
    from oppass import modelio
    from oppass.protected_models import folded_checks, inspect
    from oppass.schema import escape

    model = modelio.read_model(arguments.model, defer=True).model  # attributes and dims: the weights stay on disk
    tensors, folded = inspect(model), folded_checks(model)
    if folded:
        first = escape(folded[0])
        where = f"{len(folded)} weights ({first}, ...)" if len(folded) > 1 else f"weight {first}"
        problem = (f"the load checks of {where} were constant-folded away (onnxsim, Polygraphy sanitize or a saved "
                   "onnxruntime-optimised model?): those weights are unchecked; protect the original model again")
        if not tensors:
            raise OppassError(f"model is not protected any more: {problem}")
        warnings.warn(problem, stacklevel=1)
    if not tensors:
        print("no protected tensors")
        return
    header = ("tensor", "format", "word bits", "code", "range max", "shape", "check", "decoded by", "output", "packed")
    rows = [
        (t.name if isinstance(t.name, str) and t.name.isprintable() else escape(t.name), t.format,
         str(t.word_bits), t.code, "-" if t.range_max is None else f"{t.range_max:.9g}", _dims(t.shape), t.check,
         t.decoded_by, t.output_type, f"{t.packed_dtype} {_dims(t.packed_shape)}")
        for t in tensors
    ]
    _print_table([header, *rows])


def add_inject_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass inject`."""
    parser.add_argument("input", help="protected ONNX model")
    parser.add_argument("output", help="where to write the faulty model")
    parser.add_argument("--ber", type=float, required=True, help="bit error rate: probability of each bit flipping")
    parser.add_argument("--seed", type=int, required=True, help="random seed")
    parser.set_defaults(run=run_inject)


def run_inject(arguments: argparse.Namespace) -> None:
    """Runs `oppass inject`: flips bits of the packed weights and saves the result."""
    from oppass import modelio
    from oppass.protected_models import inject_file

    source = modelio.read_model(arguments.input, defer=True)
    modelio.check_destination(arguments.output, source)
    print(f"{inject_file(source, arguments.output, arguments.ber, arguments.seed)} bits flipped")


def add_strip_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass strip`."""
    parser.add_argument("input", help="protected ONNX model")
    parser.add_argument("output", help="where to write the plain model")
    parser.set_defaults(run=run_strip)


def run_strip(arguments: argparse.Namespace) -> None:
    """Runs `oppass strip`: saves the model with its decoded weights back as initializers."""
    from oppass import modelio
    from oppass.protected_models import strip_file

    source = modelio.read_model(arguments.input, defer=True)
    modelio.check_destination(arguments.output, source)
    strip_file(source, arguments.output)


# ----------------------------------------------------------------------------- output helpers


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Prints rows of cells as left-aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for line in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: TextIO | None = None, line: str | None = None) -> None:
    """warnings.showwarning replacement: one line on stderr."""
    print(f"oppass: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- campaign and demo


def add_campaign_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass campaign` (oppass.campaign.cli)."""
    from oppass.campaign import cli as campaign_cli

    campaign_cli.add_arguments(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `oppass demo`."""
    parser.add_argument("--out", default="oppass-demo", help="folder for the campaign results (default: oppass-demo)")
    parser.set_defaults(run=run_demo)


def run_demo(arguments: argparse.Namespace) -> None:
    """Runs `oppass demo` (it runs a campaign: it needs the campaign extra)."""
    from oppass.campaign import check_extra

    check_extra()
    from oppass.demo import format_result
    from oppass.demo import run_demo as demo

    print(format_result(demo(Path(arguments.out))))


COMMANDS = (
    Command("transform", "protect the weights of a model", add_transform_arguments),
    Command("inspect", "list the protected tensors of a model", add_inspect_arguments),
    Command("inject", "flip random bits in the packed weights of a protected model", add_inject_arguments),
    Command("strip", "turn a protected model back into a plain one (no parity check)", add_strip_arguments),
    Command("campaign", "fault-injection campaign (the paper's Alg. 1, Table II, Fig. 4-6)", add_campaign_arguments),
    Command("demo", "protect the bundled digits CNN and compare accuracies under faults", add_demo_arguments),
)


if __name__ == "__main__":
    sys.exit(main())
