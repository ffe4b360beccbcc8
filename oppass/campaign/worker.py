"""Running trials: one onnxruntime session per variant and process, weights corrupted in place.

Every process (a Dask worker or the client in serial mode) keeps a cache: the data set,
one `VariantSession` per model build, the data batches and their fault-free outputs.
A session reads its packed weights from numpy buffers handed to onnxruntime with
`SessionOptions.add_initializer`, so a trial flips bits in those buffers, runs its batch
and flips them back; the session is never rebuilt.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from oppass import codec, graph, modelio, runtime
from oppass.campaign import metrics
from oppass.campaign.config import BIT_STUDY, ECC, Condition, Variant
from oppass.campaign.data import Dataset, open_dataset
from oppass.campaign.injector import BitPosition, EccProtected, FaultTarget, StoredBits
from oppass.campaign.seeds import batch_indices, trial_rng
from oppass.errors import OppassError

# Sessions run on one intra-op thread everywhere, so outputs do not depend on the scheduler.
SESSION_THREADS = 1


@dataclass(frozen=True)
class Workload:
    """What a process needs to run trials of a campaign: small and picklable (paths, not arrays)."""

    model: str
    model_digest: str
    data: str
    seed: int
    batch_size: int
    metric: str


@dataclass(frozen=True)
class TrialRecord:
    """The result of one trial (one row of the store)."""

    condition_key: str
    trial: int
    study: str
    format: str
    protection: str
    ber: float
    bit: int | None
    n_bits: int
    flips: int
    masked_words: int
    samples: int
    correct: int
    fault_free_correct: int
    top1_changed: int
    nonfinite_samples: int
    outcome: str
    inject_seconds: float
    inference_seconds: float


class VariantSession:
    """One protected (or plain) build of the model with its packed weights in live numpy buffers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        decoders = [node for node in model.graph.node if node.domain == runtime.DOMAIN and node.op_type == runtime.OP_TYPE]
        if not decoders:
            raise OppassError("the model has no Conv/Gemm weight initializers to inject faults into")
        initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self.buffers = [numpy_helper.to_array(initializers[node.input[0]]).copy() for node in decoders]
        self.weight_bits = codec.FORMATS[_attribute(decoders[0], "format")].bits
        options = runtime.session_options(threads=SESSION_THREADS)
        # The OrtValues must outlive the session: onnxruntime reads the numpy memory directly.
        self._values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.buffers]
        for node, value in zip(decoders, self._values):
            options.add_initializer(node.input[0], value)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        initializer_names = set(initializers)
        self.input_name = next(i.name for i in model.graph.input if i.name not in initializer_names)
        self.output_name = model.graph.output[0].name
        self.stored = StoredBits(self.buffers)
        self.lock = threading.Lock()
        self.references: dict[int, np.ndarray] = {}

    @functools.cached_property
    def ecc(self) -> EccProtected:
        return EccProtected(self.buffers)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """(first model output, masked words reported by the decoders) for one batch."""
        logits, masked = self.session.run([self.output_name, graph.MASKED_WORDS_OUTPUT], {self.input_name: inputs})
        return logits, int(masked)

    def target(self, condition: Condition) -> FaultTarget:
        """Where the faults of `condition` land."""
        if condition.study == BIT_STUDY:
            return BitPosition(self.stored, self.weight_bits, condition.bit)
        return self.ecc if condition.protection == ECC else self.stored


class WorkerCache:
    """Per-process state shared by the trials a process runs."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.dataset: Dataset = open_dataset(workload.data)
        self.model = modelio.load_model(workload.model)
        self.sessions: dict[Variant, VariantSession] = {}
        self.batches: dict[int, np.ndarray] = {}

    def session(self, variant: Variant) -> VariantSession:
        if variant not in self.sessions:
            self.sessions[variant] = VariantSession(build_variant(self.model, variant))
        return self.sessions[variant]

    def batch(self, experiment: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs and labels of the data batch of experiment `experiment`."""
        indices = batch_indices(self.workload.seed, experiment, self.dataset.size, self.workload.batch_size)
        if experiment not in self.batches:
            self.batches[experiment] = self.dataset.inputs(indices)
        labels = None if self.dataset.labels is None else self.dataset.labels[indices]
        return self.batches[experiment], labels

    def reference(self, session: VariantSession, experiment: int) -> np.ndarray:
        """Fault-free outputs of `session` on the batch of `experiment`, computed once."""
        if experiment not in session.references:
            session.references[experiment] = session.run(self.batch(experiment)[0])[0]
        return session.references[experiment]


_CACHES: dict[Workload, WorkerCache] = {}
_CACHES_LOCK = threading.Lock()


def build_variant(model: onnx.ModelProto, variant: Variant) -> onnx.ModelProto:
    """The model with Conv/Gemm weights stored in the variant's format, OP-protected or plain."""
    if variant.protected:
        word = variant.word if variant.word == "weight" else int(variant.word)
        return graph.transform(model, format=variant.format, word=word, check="runtime", report_faults=True)
    return graph.transform(model, format=variant.format, word="weight", check="none", report_faults=True)


def worker_cache(workload: Workload) -> WorkerCache:
    """This process's cache for `workload`, created on first use."""
    with _CACHES_LOCK:
        if workload not in _CACHES:
            _CACHES[workload] = WorkerCache(workload)
        return _CACHES[workload]


def run_trials(workload: Workload, condition: Condition, trials: tuple[int, ...]) -> list[TrialRecord]:
    """Runs trials of one condition in this process (the task Dask ships to a worker)."""
    cache = worker_cache(workload)
    session = cache.session(condition.variant)
    with session.lock:
        return [run_trial(cache, session, condition, trial) for trial in trials]


def run_trial(cache: WorkerCache, session: VariantSession, condition: Condition, trial: int) -> TrialRecord:
    """Trial `trial` of `condition`: experiment `trial`'s batch under freshly drawn flips."""
    inputs, labels = cache.batch(trial)
    reference = cache.reference(session, trial)
    target = session.target(condition)
    started = time.perf_counter()
    positions = target.draw(trial_rng(cache.workload.seed, condition.key, trial), condition.ber)
    ecc_masked = target.inject(positions)
    inference_started = time.perf_counter()
    try:
        logits, decoder_masked = session.run(inputs)
    finally:
        inference_seconds = time.perf_counter() - inference_started
        target.restore(positions)
    reference_top1 = metrics.top1(reference)
    metric = cache.workload.metric
    correct = int(metrics.correct(logits, labels, reference_top1, metric).sum())
    fault_free_correct = int(metrics.correct(reference, labels, reference_top1, metric).sum())
    top1_changed = int((metrics.top1(logits) != reference_top1).sum())
    nonfinite_samples = int((~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)).sum())
    outcome = metrics.outcome(logits, reference)
    inject_seconds = time.perf_counter() - started - inference_seconds
    return TrialRecord(
        condition_key=condition.key,
        trial=trial,
        study=condition.study,
        format=condition.format,
        protection=condition.protection,
        ber=condition.ber,
        bit=condition.bit,
        n_bits=target.n_bits,
        flips=int(positions.size),
        masked_words=decoder_masked + ecc_masked,
        samples=int(inputs.shape[0]),
        correct=correct,
        fault_free_correct=fault_free_correct,
        top1_changed=top1_changed,
        nonfinite_samples=nonfinite_samples,
        outcome=outcome,
        inject_seconds=inject_seconds,
        inference_seconds=inference_seconds,
    )


def _attribute(node: onnx.NodeProto, name: str) -> object:
    value = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
    return value.decode() if isinstance(value, bytes) else value
