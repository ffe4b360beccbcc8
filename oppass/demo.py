"""`oppass demo`: protect the bundled digits CNN and show what Opportunistic Parity buys under faults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from oppass import faults, runtime
from oppass.campaign.config import CampaignConfig, protection_label
from oppass.campaign.runner import CampaignResult, run_campaign
from oppass.protect import packed_name, transform

EXAMPLES = Path(__file__).parent / "examples"
MODEL = EXAMPLES / "digits_cnn.onnx"
DATA = EXAMPLES / "digits_test.npz"
EXPONENT_MSB = 30  # bit 30 of an fp32 weight: flipping it multiplies the weight by 2**128
DRILL_WEIGHT = "conv1.weight"
DEMO_BERS = (1e-6, 1e-3)


@dataclass(frozen=True)
class DemoResult:
    """Test accuracies of the bundled CNN in each setting of the demo, and the campaign behind the last rows."""

    original: float
    protected: float
    msb_flip_unprotected: float
    msb_flip_protected: float
    campaign: CampaignResult


def run_demo(out: Path, seed: int = 0) -> DemoResult:
    """Runs the demo; the campaign's results, plots and report go to `out`."""
    model = onnx.load(MODEL)
    with np.load(DATA) as data:
        inputs, labels = data["inputs"], data["labels"]
    protected = transform(model, word=64)
    unprotected = transform(model, word="weight", check="none")
    campaign = run_campaign(CampaignConfig(
        model=MODEL, data=str(DATA), out=out, formats=("fp32",), protections=("none", "weight", "64"),
        ber_min=DEMO_BERS[0], ber_max=DEMO_BERS[1], points_per_decade=1, experiments=10,
        batch_size=len(labels), metric="top1", scheduler="serial", seed=seed, command="oppass demo",
    ))
    return DemoResult(
        original=_accuracy(model, inputs, labels),
        protected=_accuracy(protected, inputs, labels),
        msb_flip_unprotected=_accuracy(_flip_weight_bit(unprotected, EXPONENT_MSB), inputs, labels),
        msb_flip_protected=_accuracy(_flip_weight_bit(protected, EXPONENT_MSB), inputs, labels),
        campaign=campaign,
    )


def _accuracy(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray) -> float:
    session = runtime.load_session(model)
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs})[:1]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _flip_weight_bit(model: onnx.ModelProto, bit: int) -> onnx.ModelProto:
    """A copy of a transformed model with `bit` of the first stored weight of DRILL_WEIGHT flipped."""
    drilled = onnx.ModelProto()
    drilled.CopyFrom(model)
    drilled_name = packed_name(DRILL_WEIGHT)
    for index, tensor in enumerate(drilled.graph.initializer):
        if tensor.name == drilled_name:
            words = numpy_helper.to_array(tensor).copy()
            faults.flip_bits([words], np.array([bit]))
            drilled.graph.initializer[index].CopyFrom(numpy_helper.from_array(words, drilled_name))
            return drilled
    raise LookupError(f"{drilled_name} is not in the transformed model")


def format_result(result: DemoResult) -> str:
    """The demo's findings as a plain-text table."""
    n_weights = sum(int(np.prod(t.dims)) for t in onnx.load(MODEL).graph.initializer if len(t.dims) > 1)
    lines = [
        f"Bundled digits CNN ({n_weights:,} weights, fp32), scikit-learn digits test split",
        "",
        f"  {'setting':<66} accuracy",
        f"  {'original model':<66} {result.original:8.2%}",
        f"  {'protected: OP per 64 bits, no faults':<66} {result.protected:8.2%}",
        f"  {f'one flip of bit {EXPONENT_MSB} (exponent MSB) in {DRILL_WEIGHT}, unprotected':<66} "
        f"{result.msb_flip_unprotected:8.2%}",
        f"  {'the same flip, protected (the word is masked to zero)':<66} {result.msb_flip_protected:8.2%}",
        "",
        "Random bit flips in the stored weights (10 experiments per point, mean accuracy [95% CI]):",
    ]
    rows = [s for s in result.campaign.summaries if s.study == "ber"]
    bers = sorted({s.ber for s in rows})
    lines.append(f"  {'protection':<22}" + "".join(f"{f'BER {ber:.0e}':>24}" for ber in bers))
    for protection in ("none", "weight", "64"):
        cells = {s.ber: s for s in rows if s.protection == protection}
        lines.append(f"  {protection_label('fp32', protection):<22}" + "".join(
            f"{f'{cells[b].accuracy_mean:.1%} [{cells[b].accuracy_ci_low:.1%}, {cells[b].accuracy_ci_high:.1%}]':>24}"
            for b in bers))
    lines += ["", f"Campaign results, plots and report: {result.campaign.out}"]
    return "\n".join(lines)
