"""Running trials: one onnxruntime session per variant and process, weights corrupted in place.

Every process (a Dask worker or the client in serial mode) keeps a cache: the data set,
one `VariantSession` per model build, the data batches and their fault-free outputs.
A session reads its packed weights from numpy buffers handed to onnxruntime with
`SessionOptions.add_initializer`, so a trial flips bits in those buffers, runs its batch
and flips them back; the session is never rebuilt.

A task (trials of one model variant) runs in bursts: draw and prepare every trial's flips,
then inject, run and restore trial by trial, then score all outputs at once, so that the
work between two inferences is a few numpy calls. A trial's `inference_seconds` is its
`session.run`; its `inject_seconds` is the rest of its work (its inject and restore, and an
even share of the burst's seeding, drawing and scoring), not the one-off cache fills.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from oppass import modelio, runtime
from oppass.campaign.config import BIT_STUDY, ECC, Condition, Variant
from oppass.campaign.data import Dataset, model_inputs, open_dataset
from oppass.campaign.injector import BitPosition, EccProtected, FaultTarget, Injection, PackedWeights, StoredBits
from oppass.campaign.metrics import Metric
from oppass.campaign.records import TrialRecord
from oppass.campaign.seeds import batch_indices, trial_rng
from oppass.errors import OppassError
from oppass.protect import transform
from oppass.schema import MASKED_WORDS_OUTPUT, read_decode_nodes

# Sessions run on one intra-op thread everywhere, so outputs do not depend on the scheduler.
SESSION_THREADS = 1
ORT_ERRORS_ONLY = 3
# Memory for the prepared flips and outputs of the trials of a burst (estimated: 24 bytes per expected flip).
BURST_BYTES = 64 * 2**20
_FLIP_BYTES = 24


@dataclass(frozen=True)
class Workload:
    """What a process needs to run trials of a campaign: small and picklable (paths, not arrays)."""

    model: str
    model_digest: str
    data: str
    seed: int
    batch_size: int
    metric: Metric
    output: str
    batched: bool


@dataclass(frozen=True)
class Experiment:
    """The data batch of one experiment and a variant's fault-free outputs on it (sample axis first)."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    outputs: np.ndarray
    correct_samples: np.ndarray
    samples: int

    @property
    def correct(self) -> int:
        """Samples correct without faults."""
        return int(np.count_nonzero(self.correct_samples))


class VariantSession:
    """One protected (or plain) build of the model with its packed weights in live numpy buffers."""

    def __init__(self, model: onnx.ModelProto, output: str, batched: bool) -> None:
        decoders = read_decode_nodes(model)
        if not decoders:
            raise OppassError("the model has no Conv/Gemm weight initializers to inject faults into")
        initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self.weights = PackedWeights([numpy_helper.to_array(initializers[decode.packed]) for decode in decoders])
        self.weight_bits = decoders[0].weight_format.bits
        self.word_bytes = decoders[0].word_bits // 8
        options = runtime.session_options(threads=SESSION_THREADS)
        options.log_severity_level = ORT_ERRORS_ONLY  # a model's shape annotations may disagree with its outputs
        # The OrtValues must outlive the session: onnxruntime reads the numpy memory directly.
        self._values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.weights.buffers]
        for decode, value in zip(decoders, self._values, strict=True):
            options.add_initializer(decode.packed, value)
        self.session = runtime.open_session(model, options)
        self.output_name = output
        self.batched = batched
        self.stored = StoredBits(self.weights)
        self.lock = threading.Lock()
        self.experiments: dict[int, Experiment] = {}

    @functools.cached_property
    def ecc(self) -> EccProtected:
        """The ECC baseline over the same stored bits, made on first use."""
        return EccProtected(self.weights)

    def run(self, feeds: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, int]:
        """(scored output with the sample axis first, masked words reported by the decoders) for one batch:
        one run per feed, outputs stacked along a new axis when there are several."""
        names = [self.output_name, MASKED_WORDS_OUTPUT]
        results = [self.session.run(names, feed) for feed in feeds]
        if self.batched:
            ((outputs, masked),) = results
            return outputs, int(masked)
        return np.stack([output for output, _ in results]), max(int(masked) for _, masked in results)

    def target(self, condition: Condition) -> FaultTarget:
        """Where the faults of `condition` land."""
        if condition.study == BIT_STUDY and condition.bit is not None:
            return BitPosition(self.stored, self.weight_bits, condition.bit)
        return self.ecc if condition.protection == ECC else self.stored


def model_digest(path: str | Path) -> str:
    """SHA-256 of every byte that makes the model: its file and each external data file it uses, in order."""
    source = modelio.read_model(path, defer=True)
    digest = hashlib.sha256()
    for file in (source.path, *source.data_files):
        with open(file, "rb") as stream:
            digest.update(f"{file.name}\0{os.fstat(stream.fileno()).st_size}\0".encode())
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return digest.hexdigest()


class WorkerCache:
    """Per-process state shared by the trials a process runs."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.model = modelio.load_model(workload.model)
        if model_digest(workload.model) != workload.model_digest:
            raise OppassError(f"the model {workload.model} or its external data changed while the campaign ran: "
                              "run the campaign again")
        self.dataset: Dataset = open_dataset(workload.data, model_inputs(self.model), workload.batched)
        self.sessions: dict[Variant, VariantSession] = {}
        self.batches: dict[int, tuple[list[dict[str, np.ndarray]], np.ndarray | None]] = {}

    def session(self, variant: Variant) -> VariantSession:
        """The session of `variant`, built on first use."""
        if variant not in self.sessions:
            self.sessions[variant] = VariantSession(build_variant(self.model, variant), self.workload.output,
                                                    self.workload.batched)
        return self.sessions[variant]

    def batch(self, experiment: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
        """Feeds and labels of the data batch of experiment `experiment`, made once."""
        if experiment not in self.batches:
            indices = batch_indices(self.workload.seed, experiment, self.dataset.size, self.workload.batch_size)
            labels = None if self.dataset.labels is None else self.dataset.labels[indices]
            self.batches[experiment] = self.dataset.feeds(indices), labels
        return self.batches[experiment]

    def experiment(self, session: VariantSession, experiment: int) -> Experiment:
        """The batch of `experiment` with the fault-free outputs of `session` on it, computed once."""
        if experiment not in session.experiments:
            feeds, labels = self.batch(experiment)
            outputs = session.run(feeds)[0]
            correct = self.workload.metric.correct(outputs[None], outputs[None], None if labels is None else
                                                   labels[None])[0]
            session.experiments[experiment] = Experiment(feeds, labels, outputs, correct, len(outputs))
        return session.experiments[experiment]


_CACHES: dict[Workload, WorkerCache] = {}
_CACHES_LOCK = threading.Lock()


def build_variant(model: onnx.ModelProto, variant: Variant) -> onnx.ModelProto:
    """The model with Conv/Gemm weights stored in the variant's format, OP-protected or plain."""
    if variant.protected:
        word = variant.word if variant.word == "weight" else int(variant.word)
        return transform(model, format=variant.format, word=word, check="runtime", report_faults=True)
    return transform(model, format=variant.format, word="weight", check="none", report_faults=True)


def worker_cache(workload: Workload) -> WorkerCache:
    """This process's cache for `workload`, created on first use."""
    with _CACHES_LOCK:
        if workload not in _CACHES:
            _CACHES[workload] = WorkerCache(workload)
        return _CACHES[workload]


def warm_up(workload: Workload) -> None:
    """Creates this process's cache for `workload` (imports, data, model) ahead of its first trial."""
    worker_cache(workload)


def run_trials(workload: Workload, pairs: Sequence[tuple[Condition, int]]) -> list[TrialRecord]:
    """Runs (condition, trial) pairs of one model variant in this process: the task Dask ships to a worker.
    Trial `t` of a condition runs experiment `t`'s data batch under freshly drawn flips."""
    cache = worker_cache(workload)
    session = cache.session(pairs[0][0].variant)
    with session.lock:
        experiments = [cache.experiment(session, trial) for _, trial in pairs]
        targets = [session.target(condition) for condition, _ in pairs]
        largest = max(_FLIP_BYTES * target.n_bits * condition.ber
                      for target, (condition, _) in zip(targets, pairs, strict=True))
        size = max(1, int(BURST_BYTES // (largest + experiments[0].outputs.nbytes)))
        records = [
            record
            for start in range(0, len(pairs), size)
            for record in _run_burst(cache, session, pairs[start : start + size], targets[start : start + size],
                                     experiments[start : start + size])
        ]
        session.weights.verify()
    return records


def _run_burst(
    cache: WorkerCache,
    session: VariantSession,
    pairs: Sequence[tuple[Condition, int]],
    targets: Sequence[FaultTarget],
    experiments: Sequence[Experiment],
) -> list[TrialRecord]:
    clock = time.perf_counter
    started = clock()
    seed = cache.workload.seed
    injections = [target.plan(trial_rng(seed, condition.key, trial), condition.ber)
                  for (condition, trial), target in zip(pairs, targets, strict=True)]
    shared = clock() - started
    outputs, decoder_masked, inference, own = [], [], [], []
    for experiment, target, injection in zip(experiments, targets, injections, strict=True):
        started = clock()
        target.inject(injection)
        try:
            inference_started = clock()
            logits, masked = session.run(experiment.feeds)
            inference.append(clock() - inference_started)
        finally:
            target.restore(injection)
        outputs.append(logits)
        decoder_masked.append(masked)
        own.append(clock() - started - inference[-1])
    started = clock()
    known = [e.labels for e in experiments if e.labels is not None]  # all or none: one data set
    labels = np.stack(known) if known else None
    scores = cache.workload.metric.score(
        np.stack(outputs), np.stack([e.outputs for e in experiments]), labels,
        np.stack([e.correct_samples for e in experiments]), np.array([i.flips for i in injections]),
    )
    even = [None if isinstance(target, EccProtected) else even_flip_words(injection, session.weights,
                                                                          session.word_bytes)
            for target, injection in zip(targets, injections, strict=True)]
    shared = (shared + clock() - started) / len(pairs)
    return [
        TrialRecord(
            condition_key=condition.key,
            trial=trial,
            study=condition.study,
            format=condition.format,
            protection=condition.protection,
            ber=condition.ber,
            bit=condition.bit,
            n_bits=target.n_bits,
            flips=injection.flips,
            even_flip_words=even[i],
            masked_words=decoder_masked[i] + injection.masked,
            samples=experiment.samples,
            correct=int(scores.correct[i]),
            fault_free_correct=experiment.correct,
            sdc_samples=int(scores.sdc[i]),
            nonfinite_samples=int(scores.nonfinite[i]),
            outcome=scores.outcomes[i],
            inject_seconds=own[i] + shared,
            inference_seconds=inference[i],
        )
        for i, ((condition, trial), target, injection, experiment) in enumerate(
            zip(pairs, targets, injections, experiments, strict=True)
        )
    ]



def even_flip_words(injection: Injection, weights: PackedWeights, word_bytes: int) -> int:
    """Stored words of `word_bytes` bytes (each buffer cut from its start) that `injection` hits with an even,
    non-zero number of flips: the errors a parity check over such words cannot see."""
    if injection.index is None:  # a dense XOR mask of the whole block
        offsets = np.flatnonzero(injection.change)
        flipped = np.bitwise_count(injection.change[offsets])
    else:
        order = np.argsort(injection.index, kind="stable")
        offsets = injection.index[order]
        flipped = np.bitwise_count(injection.change ^ injection.clean)[order]
    if offsets.size == 0:
        return 0
    buffer_start = weights.starts[np.searchsorted(weights.starts, offsets, side="right") - 1]
    word_start = buffer_start + (offsets - buffer_start) // word_bytes * word_bytes  # sorted
    first = np.flatnonzero(np.r_[True, word_start[1:] != word_start[:-1]])
    return int(np.count_nonzero(np.add.reduceat(flipped.astype(np.int64), first) % 2 == 0))
