"""The declared dependency floors (pyproject.toml), pinned and smoke-tested (issue 10.4).

    python tools/floors.py constraints > floors.txt   # every dependency at its declared minimum, as pip pins
    python tools/floors.py smoke                      # in a venv holding oppass and those pins

`smoke` protects the bundled digits CNN with the installed `oppass` command in both check
modes (runtime: ParityCheckUnpack on every run; load: standard ops folded at session
creation), runs each (runtime through `oppass.load_session`, load in a plain onnxruntime
session with no library), flips one stored bit of the first packed weight and checks that
both models mask exactly that word. It prints the versions it ran with; any failure is a
non-zero exit with one line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "oppass" / "examples" / "digits_cnn.onnx"
MASKED = "oppass_masked_words"


def constraints() -> list[str]:
    """`name==minimum` for every dependency of the project declared with a `>=` floor."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
        if match is None:
            raise SystemExit(f"floors: dependency {requirement!r} has no plain >= floor")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def smoke() -> None:
    """Protect, run in both modes, mask a flip (see the module docstring)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    import oppass

    print(f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"oppass {oppass.__version__}")
    image = np.load(MODEL.with_name("digits_test.npz"))["inputs"][:8].astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="oppass-floors-") as folder:
        for check in ("runtime", "load"):
            protected = Path(folder) / f"{check}.onnx"
            oppass_command = Path(sys.executable).with_name("oppass")
            subprocess.run([str(oppass_command), "transform", str(MODEL), str(protected), "--check", check,
                            "--report-faults"], check=True, stdout=subprocess.DEVNULL)
            model = onnx.load(protected)
            faulty = Path(folder) / f"{check}-faulty.onnx"
            onnx.save_model(_with_one_flip(model), faulty)
            outputs = [_run(path, check, image) for path in (protected, faulty)]
            (clean, clean_masked), (_, faulty_masked) = outputs
            if (clean_masked, faulty_masked) != (0, 1):
                raise SystemExit(f"floors: {check} mode masked {clean_masked} words clean and {faulty_masked} "
                                 "with one flip, expected 0 and 1")
            print(f"{check}: {np.argmax(clean, axis=1).tolist()} predicted, one flip masked")


def _with_one_flip(model):  # noqa: ANN001, ANN202 - onnx is imported inside `smoke`
    """A copy of `model` with bit 3 of the first packed weight's first word flipped."""
    import onnx

    faulty = onnx.ModelProto()
    faulty.CopyFrom(model)
    tensor = next(t for t in faulty.graph.initializer if t.name.endswith("::op_packed"))
    raw = bytearray(tensor.raw_data)
    raw[0] ^= 1 << 3
    tensor.raw_data = bytes(raw)
    return faulty


def _run(path: Path, check: str, image):  # noqa: ANN001, ANN202
    """The model's first output and masked-word count: runtime mode through oppass, load mode in plain onnxruntime."""
    import onnxruntime as ort

    import oppass

    # Runtime mode as written (no re-protection at load, which would mask the flip once, at load): checked per run.
    session = (oppass.load_session(path, optimize_runtime_checks=False) if check == "runtime"
               else ort.InferenceSession(str(path)))
    feeds = {session.get_inputs()[0].name: image}
    first = session.get_outputs()[0].name
    output, masked = session.run([first, MASKED], feeds)
    return output, int(masked)


if __name__ == "__main__":
    if sys.argv[1:] == ["constraints"]:
        print("\n".join(constraints()))
    elif sys.argv[1:] == ["smoke"]:
        smoke()
    else:
        raise SystemExit("usage: python tools/floors.py constraints|smoke")
