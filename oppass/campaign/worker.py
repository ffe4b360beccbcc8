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
A trial whose draw flips nothing runs no inference: its outputs are the fault-free ones (exact,
as its weights are), with `inference_seconds` 0.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from oppass import faults, modelio, runtime
from oppass.campaign import metrics
from oppass.campaign.config import BIT_STUDY, ECC, Condition, Variant
from oppass.campaign.data import Dataset, open_dataset
from oppass.campaign.injector import BitPosition, EccProtected, FaultTarget, PackedWeights, StoredBits
from oppass.campaign.records import TrialRecord
from oppass.campaign.seeds import batch_indices, trial_rng
from oppass.campaign.store import FORMAT_VERSION
from oppass.errors import OppassError
from oppass.protect import transform
from oppass.schema import MASKED_WORDS_OUTPUT, read_decode_nodes

# Sessions run on one intra-op thread everywhere, so outputs do not depend on the scheduler.
SESSION_THREADS = 1
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
    metric: str
    store_format: int = FORMAT_VERSION

    @property
    def sampler(self) -> int:
        """How flip positions are drawn for this campaign's store (oppass.faults)."""
        return faults.SAMPLER_CHOICE if self.store_format == 1 else faults.SAMPLER_DISTINCT


@dataclass(frozen=True)
class Experiment:
    """The data batch of one experiment and a variant's fault-free outputs on it."""

    inputs: np.ndarray
    labels: np.ndarray | None
    logits: np.ndarray
    top1: np.ndarray
    correct: int


class VariantSession:
    """One protected (or plain) build of the model with its packed weights in live numpy buffers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        decoders = read_decode_nodes(model)
        if not decoders:
            raise OppassError("the model has no Conv/Gemm weight initializers to inject faults into")
        initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self.weights = PackedWeights([numpy_helper.to_array(initializers[decode.packed]) for decode in decoders])
        self.weight_bits = decoders[0].weight_format.bits
        options = runtime.session_options(threads=SESSION_THREADS)
        # The OrtValues must outlive the session: onnxruntime reads the numpy memory directly.
        self._values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.weights.buffers]
        for decode, value in zip(decoders, self._values, strict=True):
            options.add_initializer(decode.packed, value)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        initializer_names = set(initializers)
        self.input_name = next(i.name for i in model.graph.input if i.name not in initializer_names)
        self.output_name = model.graph.output[0].name
        self.stored = StoredBits(self.weights)
        self.lock = threading.Lock()
        self.experiments: dict[int, Experiment] = {}

    @functools.cached_property
    def ecc(self) -> EccProtected:
        """The ECC baseline over the same stored bits, made on first use."""
        return EccProtected(self.weights)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """(first model output, masked words reported by the decoders) for one batch."""
        logits, masked = self.session.run([self.output_name, MASKED_WORDS_OUTPUT], {self.input_name: inputs})
        return logits, int(masked)

    def target(self, condition: Condition) -> FaultTarget:
        """Where the faults of `condition` land."""
        if condition.study == BIT_STUDY and condition.bit is not None:
            return BitPosition(self.stored, self.weight_bits, condition.bit)
        return self.ecc if condition.protection == ECC else self.stored


class WorkerCache:
    """Per-process state shared by the trials a process runs."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.dataset: Dataset = open_dataset(workload.data)
        self.model = modelio.load_model(workload.model)
        self.sessions: dict[Variant, VariantSession] = {}
        self.batches: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def session(self, variant: Variant) -> VariantSession:
        """The session of `variant`, built on first use."""
        if variant not in self.sessions:
            self.sessions[variant] = VariantSession(build_variant(self.model, variant))
        return self.sessions[variant]

    def batch(self, experiment: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs and labels of the data batch of experiment `experiment`, made once."""
        if experiment not in self.batches:
            indices = batch_indices(self.workload.seed, experiment, self.dataset.size, self.workload.batch_size)
            labels = None if self.dataset.labels is None else self.dataset.labels[indices]
            self.batches[experiment] = self.dataset.inputs(indices), labels
        return self.batches[experiment]

    def experiment(self, session: VariantSession, experiment: int) -> Experiment:
        """The batch of `experiment` with the fault-free outputs of `session` on it, computed once."""
        if experiment not in session.experiments:
            inputs, labels = self.batch(experiment)
            logits = session.run(inputs)[0]
            top1 = metrics.top1(logits)
            correct = int(np.count_nonzero(metrics.correct(logits, labels, top1, self.workload.metric)))
            session.experiments[experiment] = Experiment(inputs, labels, logits, top1, correct)
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
        size = max(1, int(BURST_BYTES // (largest + experiments[0].logits.nbytes)))
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
    sampler = cache.workload.sampler
    injections = [target.plan(trial_rng(seed, condition.key, trial), condition.ber, sampler)
                  for (condition, trial), target in zip(pairs, targets, strict=True)]
    shared = clock() - started
    outputs, decoder_masked, inference, own = [], [], [], []
    for experiment, target, injection in zip(experiments, targets, injections, strict=True):
        started = clock()
        if injection.flips == 0:
            outputs.append(experiment.logits)
            decoder_masked.append(0)
            inference.append(0.0)
            own.append(clock() - started)
            continue
        target.inject(injection)
        try:
            inference_started = clock()
            logits, masked = session.run(experiment.inputs)
            inference.append(clock() - inference_started)
        finally:
            target.restore(injection)
        outputs.append(logits)
        decoder_masked.append(masked)
        own.append(clock() - started - inference[-1])
    started = clock()
    known = [e.labels for e in experiments if e.labels is not None]  # all or none: one data set
    labels = np.stack(known) if known else None
    correct, changed, nonfinite, outcomes = metrics.score(
        np.stack(outputs), np.stack([e.logits for e in experiments]), np.stack([e.top1 for e in experiments]),
        labels, cache.workload.metric,
    )
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
            masked_words=decoder_masked[i] + injection.masked,
            samples=len(experiment.inputs),
            correct=int(correct[i]),
            fault_free_correct=experiment.correct,
            top1_changed=int(changed[i]),
            nonfinite_samples=int(nonfinite[i]),
            outcome=outcomes[i],
            inject_seconds=own[i] + shared,
            inference_seconds=inference[i],
        )
        for i, ((condition, trial), target, injection, experiment) in enumerate(
            zip(pairs, targets, injections, experiments, strict=True)
        )
    ]

