"""Runs the paper's fault-injection grid (Alg. 1, Table II, Fig. 4-6) for a set of models.

    python tools/reproduce_paper.py --models digits,resnet50.onnx,... [--data DATA] --out DIR
        [--scheduler local|serial|tcp://HOST:PORT] [--workers N] [--exps 20] [--batch 400] [--metric top5]
        [--points-per-decade 9] [--no-bit-positions] [--no-batch-study] [--ecc]

`digits` means the bundled CNN with its test split; every other model is an ONNX file
evaluated on --data (an ImageNet-style image folder or a .npz). Each model's campaign
goes to DIR/<model name>/ (re-running resumes it); DIR/table2.md and DIR/table2.csv
gather all networks. See docs/METHODS.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from oppass.campaign import CampaignConfig, run_campaign
from oppass.campaign.export import table_markdown
from oppass.errors import OppassError

DIGITS_MODEL = Path(__file__).resolve().parents[1] / "oppass" / "examples" / "digits_cnn.onnx"


def main(argv: list[str] | None = None) -> int:
    """Runs the campaign of each network and writes the combined Table II."""
    args = _parser().parse_args(argv)
    rows: list[dict] = []
    try:
        for name in (name.strip() for name in args.models.split(",") if name.strip()):
            model, data = (DIGITS_MODEL, "digits") if name == "digits" else (Path(name), args.data)
            if data is None:
                raise OppassError(f"--data is needed for model {name}")
            result = run_campaign(_config(args, model, data))
            print(f"{model.stem}: {result.trials_run} trials run ({result.trials_per_second:.1f}/s)", file=sys.stderr)
            rows += _read_csv(result.out / "table2.csv")
    except OppassError as error:
        print(f"reproduce_paper: error: {error}", file=sys.stderr)
        return 2
    _write_tables(args.out, rows)
    print(table_markdown(rows), end="")
    return 0


def _config(args: argparse.Namespace, model: Path, data: str) -> CampaignConfig:
    return CampaignConfig(
        model=model,
        data=data,
        out=args.out / model.stem,
        points_per_decade=args.points_per_decade,
        experiments=args.exps,
        batch_size=args.batch,
        metric=args.metric,
        bit_positions=not args.no_bit_positions,
        batch_study=not args.no_batch_study,
        ecc=args.ecc,
        **({"protections": tuple(name for name in args.protect.split(",") if name)} if args.protect else {}),
        scheduler=args.scheduler,
        workers=args.workers,
        command=" ".join(["python", "tools/reproduce_paper.py", *sys.argv[1:]]),
    )


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return [{**row, "fault_free_accuracy_percent": float(row["fault_free_accuracy_percent"])}
                for row in csv.DictReader(handle)]


def _write_tables(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table2.md").write_text(table_markdown(rows))
    with (out / "table2.csv").open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="comma-separated: digits and/or ONNX files")
    parser.add_argument("--data", help="image folder or .npz for the ONNX files")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scheduler", default="local")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--exps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--metric", default="top5", help="top1, top5 (the paper's, default), golden, allclose or "
                                                          "package.module:function")
    parser.add_argument("--points-per-decade", type=int, default=9)
    parser.add_argument("--no-bit-positions", action="store_true", help="skip the Fig. 5 study")
    parser.add_argument("--no-batch-study", action="store_true", help="skip the Fig. 4 study")
    parser.add_argument("--ecc", action="store_true", help="add the SEC-DED (72,64) baseline")
    parser.add_argument("--protect", help="protections instead of the paper's OP levels (see oppass campaign "
                        "--protect), e.g. none,parity:64,secded:64,range,ecc")
    return parser


if __name__ == "__main__":
    sys.exit(main())
