"""What the fast deployment paths cost when the session is created (docs/PERFORMANCE.md, "What it costs at load").

    python tools/session_creation.py [--models resnet50,mobilenet_v2] [--repeats 3]

For each of the paper's CNNs: the median seconds, over `--repeats` rounds taken in turns, of
creating an onnxruntime session for the unprotected model, for the `--check load` model (a
plain InferenceSession: onnxruntime folds the check), and through `oppass.load_session` for
the runtime-mode model, re-protected for this CPU or with its decode nodes kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # model_zoo: cached exports

import model_zoo  # noqa: E402

from oppass import protect, runtime  # noqa: E402


def creation_times(name: str, repeats: int) -> dict[str, float]:
    """Median seconds of each way of opening the network `name`."""
    model = onnx.load(model_zoo.paper_cnn(name))
    plain = model.SerializeToString()
    load = protect.transform(model, check="load").SerializeToString()
    runtime_model = protect.transform(model)
    cases: dict[str, Callable[[], object]] = {
        "unprotected, InferenceSession": lambda: ort.InferenceSession(plain),
        "--check load, InferenceSession": lambda: ort.InferenceSession(load),
        "runtime, load_session (re-protects)": lambda: runtime.load_session(runtime_model),
        "runtime, load_session, nodes kept": lambda: runtime.load_session(runtime_model,
                                                                           optimize_runtime_checks=False),
    }
    samples: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(repeats):
        for key, create in cases.items():
            started = time.perf_counter()
            create()
            samples[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    """Prints one line per network."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2", help="comma-separated paper CNNs")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four creations")
    arguments = parser.parse_args()
    ort.set_default_logger_severity(3)
    for name in arguments.models.split(","):
        times = creation_times(name, arguments.repeats)
        print(name, "  ".join(f"{key}: {seconds:.2f} s" for key, seconds in times.items()), flush=True)


if __name__ == "__main__":
    main()
