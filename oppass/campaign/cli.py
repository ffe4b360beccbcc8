"""The `oppass campaign` subcommand."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from oppass import files
from oppass.campaign import check_extra
from oppass.campaign.config import CampaignConfig
from oppass.campaign.metrics import BUILTIN, DEFAULT_ATOL, DEFAULT_RTOL
from oppass.errors import CampaignInterrupted, OppassError
from oppass.formats import DEFAULT_OPS

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `oppass campaign` to its parser."""
    parser.description = (
        "Injects random bit flips into the stored weights of MODEL under several formats and OP levels, measures "
        "accuracy per BER and reports BERZAD (see docs/METHODS.md). Re-running the same command in the same --out "
        "folder resumes it; adding formats, protections, BERs or experiments there runs only the new trials."
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="ONNX model (unprotected)")
    parser.add_argument("--data", required=True,
                        help="'digits', an image folder, or a .npz with one array per model input, named after it "
                             "(one input: also 'inputs' or 'x'), and optional integer labels ('labels' or 'y')")
    parser.add_argument("--out", required=True, type=Path, help="output folder (store, tables, figures, report)")
    parser.add_argument("--formats", default="fp32,bf16,int8",
                        help="weight formats (default: fp32,bf16,int8; one the model cannot take is skipped)")
    parser.add_argument("--op", default="none,weight,64,256", help="OP levels: none, weight, word bits "
                        "(shorthand of --protect none,parity:weight,...)")
    parser.add_argument("--protect", help="protections, replacing --op: none, ecc, range, parity:W, secded:W, "
                        "parity:W+range, secded:W+range (W: weight or word bits)")
    parser.add_argument("--fault", default="flip", help="fault model: flip (default), stuck:0, stuck:1, mbu:K "
                        "(K adjacent bits), asym:R (1->0 rate = R x BER, 0->1 rate = BER)")
    parser.add_argument("--flips", help="fault counts per trial, e.g. 1,2,5, instead of the --ber grid")
    parser.add_argument("--layers", help="inject only into these weight tensors (names, comma-separated)")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS),
                        help="op types whose weights are protected and corrupted, as transform's --ops "
                             f"(default: {','.join(DEFAULT_OPS)})")
    parser.add_argument("--ber", default="1e-9:1e-1", help="BER range MIN:MAX (default: 1e-9:1e-1)")
    parser.add_argument("--points-per-decade", type=int, default=9, help="9: 1..9 x 10^k as in the paper")
    parser.add_argument("--exps", type=int, default=20, help="experiments (batches) per condition")
    parser.add_argument("--batch", type=int, default=400, help="samples per experiment")
    parser.add_argument("--metric", help=f"{', '.join(BUILTIN)} or package.module:function (see docs/METHODS.md); "
                                         "default: top1 with labels, golden without")
    parser.add_argument("--output", help="the model output to score (default: the first)")
    parser.add_argument("--class-axis", type=int, default=-1,
                        help="axis of the scored output holding the classes (default: -1, the last)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help=f"allclose: relative tolerance (default: {DEFAULT_RTOL:g})")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"allclose: absolute tolerance (default: {DEFAULT_ATOL:g})")
    parser.add_argument("--bit-positions", action="store_true", help="also BERZAD per bit position (Fig. 5)")
    parser.add_argument("--batch-study", action="store_true", help="also accuracy range vs batch size (Fig. 4)")
    parser.add_argument("--ecc", action="store_true", help="also a SEC-DED (72,64) ECC baseline")
    parser.add_argument("--scheduler", default="local", help="local (default), serial or tcp://host:port")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (default: 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs the campaign described by parsed arguments; prints Table II and the outputs.

    SIGINT and SIGTERM end it with one line saying how many trials are stored, and the exit
    status 128 + the signal's number (130, 143).
    """
    check_extra()
    config = config_from_args(args)
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        for other in SIGNALS:  # a second Ctrl-C must not break the orderly shutdown under way
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, interrupt) for signum in SIGNALS} if in_main else {}
    try:
        from oppass.campaign.runner import run_campaign

        result = run_campaign(config)
    except (KeyboardInterrupt, ImportError) as stop:
        if isinstance(stop, ImportError) and not received:
            raise
        files.forget_interrupt_exit()
        # A signal during an import of onnxruntime's extension surfaces as its ImportError.
        status = 128 + (received[0] if received else signal.SIGINT)
        if isinstance(stop, CampaignInterrupted):
            print(stop, file=sys.stderr)
        else:
            print("interrupted before any trial ran", file=sys.stderr)
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print((result.out / "table2.md").read_text(), end="")
    print(f"{result.trials_run} trials run in {result.seconds:.1f} s ({result.trials_per_second:.1f}/s); "
          f"results in {result.out}")
    return 0


def config_from_args(args: argparse.Namespace) -> CampaignConfig:
    """A CampaignConfig from parsed `campaign` arguments."""
    ber_min, ber_max = _ber_range(args.ber)
    return CampaignConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        formats=_names(args.formats),
        protections=_names(args.protect if args.protect is not None else args.op),
        ber_min=ber_min,
        ber_max=ber_max,
        points_per_decade=args.points_per_decade,
        experiments=args.exps,
        batch_size=args.batch,
        metric=args.metric,
        output=args.output,
        class_axis=args.class_axis,
        rtol=args.rtol,
        atol=args.atol,
        bit_positions=args.bit_positions,
        batch_study=args.batch_study,
        ecc=args.ecc,
        scheduler=args.scheduler,
        workers=args.workers,
        seed=args.seed,
        command=shlex.join(["oppass", *sys.argv[1:]]),
        fault=args.fault,
        flip_counts=_counts(args.flips),
        layers=_names(args.layers or ""),
        ops=_names(args.ops),
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _counts(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise OppassError(f"--flips must be whole numbers separated by commas, e.g. 1,2,5, got {text!r}") from None


def _ber_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise OppassError(f"--ber must be MIN:MAX, e.g. 1e-9:1e-1, got {text!r}") from None
    return low, high
