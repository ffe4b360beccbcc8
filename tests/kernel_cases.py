"""Runs many one-node models in one child interpreter, keeping crash isolation.

`run_cases` writes each case (a serialized model and its feeds) to a folder and starts this file
as a child, which creates a session for each case with `exact_session_options()`, runs
it, and writes one JSON line per event on stdout: `{"start": id}` before the case and
`{"done": id, "error": text or null}` after it. When the child dies (a crash in the kernel, a
timeout), the case it had started gets a `crash` outcome saying how it died, and a new child takes
the cases left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from oppass import runtime

MARK = "@case "  # prefix of the child's report lines: other output (warnings, logs) is ignored


def exact_session_options() -> ort.SessionOptions:
    """`oppass.runtime.session_options()` without onnxruntime's CPU memory arena.

    Each tensor is then its own allocation of exactly its size, so that a stray write past an
    output is seen by AddressSanitizer and valgrind instead of landing in the arena's next block.
    """
    options = runtime.session_options()
    options.enable_cpu_mem_arena = False
    return options


@dataclass(frozen=True)
class Case:
    """A model to load and run once, with the graph inputs to feed it."""

    model: bytes
    feeds: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Outcome:
    """What became of a case: `error` is None when it ran; `crash` says how the child died in it."""

    error: str | None
    crash: str | None = None


def run_cases(
    cases: Mapping[str, Case], *, timeout: float = 300.0, abort_in: Collection[str] = ()
) -> dict[str, Outcome]:
    """Outcomes of every case, by id. The child aborts on the cases in `abort_in` (to test the isolation)."""
    with tempfile.TemporaryDirectory() as folder:
        entries = []
        for index, (case_id, case) in enumerate(cases.items()):
            model = Path(folder) / f"{index}.onnx"
            model.write_bytes(case.model)
            feeds = None
            if case.feeds:
                feeds = str(Path(folder) / f"{index}.npz")
                np.savez(feeds, **case.feeds)
            entries.append({"id": case_id, "model": str(model), "feeds": feeds, "abort": case_id in abort_in})
        outcomes: dict[str, Outcome] = {}
        while len(outcomes) < len(entries):
            remaining = [entry for entry in entries if entry["id"] not in outcomes]
            outcomes.update(_run_child(remaining, timeout))
        return outcomes


def _run_child(entries: list[dict], timeout: float) -> dict[str, Outcome]:
    """Outcomes of the cases one child reached: at least one, the case it died in counting as a crash."""
    child = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, errors="backslashreplace")
    try:
        stdout, stderr = child.communicate(json.dumps(entries), timeout=timeout)
        died = f"exit status {child.returncode}"
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
        died = f"timed out after {timeout:.0f} s"
    outcomes: dict[str, Outcome] = {}
    started = None
    for line in stdout.splitlines():
        if not line.startswith(MARK):
            continue
        record = json.loads(line[len(MARK):])
        if "start" in record:
            started = record["start"]
        else:
            outcomes[record["done"]] = Outcome(record["error"])
            started = None
    if child.returncode == 0 and started is None and len(outcomes) == len(entries):
        return outcomes
    blamed = started if started is not None else next(e["id"] for e in entries if e["id"] not in outcomes)
    where = "in this case" if started is not None else "before starting this case"
    outcomes[blamed] = Outcome(None, crash=f"the child died {where} ({died}): {stderr[-3000:]}")
    return outcomes


def _child() -> None:
    for entry in json.load(sys.stdin):
        print(MARK + json.dumps({"start": entry["id"]}), flush=True)
        if entry["abort"]:
            os.abort()
        error = None
        try:
            feeds = dict(np.load(entry["feeds"])) if entry["feeds"] else {}
            session = ort.InferenceSession(entry["model"], exact_session_options())
            # OrtValues, not numpy arrays: bfloat16 and [0, 2**62] outputs have no numpy form
            values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feeds.items()}
            session.run_with_ort_values([output.name for output in session.get_outputs()], values)
            del session
        except Exception as exception:  # every refusal is the outcome of its case
            error = str(exception)
        print(MARK + json.dumps({"done": entry["id"], "error": error}), flush=True)


if __name__ == "__main__":
    _child()
