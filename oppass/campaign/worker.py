"""Running trials: one onnxruntime session per variant and process, weights corrupted in place.

Every process (a Dask worker or the client in serial mode) keeps a cache: the data set,
one `VariantSession` per model build, the data batches and their fault-free outputs.
A session reads its packed weights from numpy buffers handed to onnxruntime with
`SessionOptions.add_initializer`, so a trial flips bits in those buffers, runs its batch
and flips them back; the session is never rebuilt.

A task (trials of one model variant) runs in bursts: draw and prepare every trial's flips,
then inject, run and restore trial by trial, then score all outputs at once, so that the
work between two inferences is a few numpy calls. A trial's `inference_seconds` is its
`session.run`; its `inject_seconds` is the rest of its own work (seeding, drawing and preparing
its flips, its inject and restore) plus an even share of the burst's scoring, not the one-off
cache fills. A trial whose draw flips nothing runs no inference and is not scored: its outputs
and scores are the fault-free ones (exact, as its weights are; scored once per experiment),
with `inference_seconds` 0.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from oppass import codec, faults, modelio, runtime
from oppass.campaign import faultmodels, protection
from oppass.campaign.config import BIT_STUDY, Condition, Variant
from oppass.campaign.data import Dataset, model_inputs, open_dataset
from oppass.campaign.injector import (
    BitPosition,
    EccProtected,
    FaultTarget,
    Injection,
    NumpyDecoded,
    PackedWeights,
    StoredBits,
    StoredWords,
    Subspace,
)
from oppass.campaign.metrics import CLASSIFYING, Metric, top1
from oppass.campaign.records import TrialRecord
from oppass.campaign.seeds import TrialStreams, batch_indices
from oppass.campaign.store import FORMAT_VERSION
from oppass.encoder import CHUNK_WEIGHTS
from oppass.errors import OppassError
from oppass.formats import DEFAULT_OPS, FORMATS, SECDED
from oppass.modelio import Producer
from oppass.modelio.fields import point_to
from oppass.protect import transform_to_placeholders
from oppass.schema import MASKED_WORDS_OUTPUT, read_decode_nodes

# Sessions run on one intra-op thread everywhere, so outputs do not depend on the scheduler.
SESSION_THREADS = 1
ORT_ERRORS_ONLY = 3
ARENA_GROWS_AS_ASKED = 1  # onnxruntime's kSameAsRequested
# Words whose flips are counted from a dense mask, by size in bits.
_WORD_DTYPES: dict[int, np.dtype] = {8: np.dtype("u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4"), 64: np.dtype("<u8")}
# A process keeps the sessions of the variants it made while their weight blocks, with one more of the largest,
# fit in this many bytes; else it drops them before making the next. The variants run one after another, so a
# model whose weights take more than half of it is held one variant at a time; a small model's are all kept.
SESSION_CACHE_BYTES = 64 * 2**20
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
    store_format: int = FORMAT_VERSION
    ops: tuple[str, ...] = DEFAULT_OPS

    @property
    def sampler(self) -> int:
        """How flip positions are drawn for this campaign's store (oppass.faults): store format N, sampler N."""
        return {1: faults.SAMPLER_CHOICE, 2: faults.SAMPLER_GAPS}.get(self.store_format, faults.SAMPLER_WORDS)


@dataclass(frozen=True)
class TrialScore:
    """One trial's scores: correct samples, silently corrupted (finite) samples, non-finite samples, outcome."""

    correct: int
    sdc: int
    nonfinite: int
    outcome: str


@dataclass(frozen=True)
class Experiment:
    """The data batch of one experiment and a variant's fault-free outputs on it (sample axis first)."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    outputs: np.ndarray
    correct_samples: np.ndarray
    samples: int
    fault_free_scores: TrialScore  # those of a trial without flips
    fault_free_top1: np.ndarray | None  # the top-1 of `outputs` under a classifying metric, taken once

    @property
    def correct(self) -> int:
        """Samples correct without faults."""
        return int(np.count_nonzero(self.correct_samples))


class VariantSession:
    """One protected (or plain) build of the model with its packed weights in live numpy buffers.

    With `stored_code` (CODE, W) the model is plain and its weights are re-encoded with that code: the
    buffers then hold the code's fault-free decode and `code_words` the figures of the words the code stores.
    """

    def __init__(self, model: onnx.ModelProto, producers: Mapping[str, Producer], output: str, batched: bool,
                 stored_code: tuple[str, str] | None = None) -> None:
        """`model`'s packed tensors are placeholders whose `producers` (by name) write them into the buffers."""
        decoders = read_decode_nodes(model)
        if not decoders:
            raise OppassError("the model has no weights of the --ops types to inject faults into")
        initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        packed = [initializers[decode.packed] for decode in decoders]
        self.format = decoders[0].format
        self.tensor_names = [decode.output for decode in decoders]
        layouts = [(tuple(tensor.dims), helper.tensor_dtype_to_np_dtype(tensor.data_type)) for tensor in packed]
        ordered = [producers[decode.packed] for decode in decoders]
        self.code_words: StoredWords | None = None
        if stored_code is None:
            fill: Callable[[int, np.ndarray], None] = functools.partial(_produce_into, ordered)
        else:
            self.code_words, fill = coded_fill(ordered, layouts, self.format, *stored_code)
        self.weights = PackedWeights(layouts, fill)
        self.weight_bits = decoders[0].weight_format.bits
        self.word_bytes = decoders[0].word_bits // 8
        _share_one_arena()
        options = runtime.session_options(threads=SESSION_THREADS, config={"session.use_env_allocators": "1"})
        options.log_severity_level = ORT_ERRORS_ONLY  # a model's shape annotations may disagree with its outputs
        # A memory pattern allocates every planned tensor of a run as one block, from the second run on: a block
        # that the first run's separate chunks cannot hold (an int8 weight's 16 MiB decode and 64 MiB dequantized
        # copy took 80 MiB more).
        options.enable_mem_pattern = False
        # The OrtValues must outlive the session: onnxruntime reads the numpy memory directly.
        self._values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.weights.buffers]
        for decode, value in zip(decoders, self._values, strict=True):
            options.add_initializer(decode.packed, value)
        self.session = _session_over_buffers(model, options, {decode.packed for decode in decoders})
        self.output_name = output
        self.batched = batched
        self.stored = StoredBits(self.weights)
        self.lock = threading.Lock()
        self.experiments: dict[int, Experiment] = {}
        self._decoders: dict[str, NumpyDecoded] = {}
        self._subspaces: dict[str, Subspace] = {}

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

    def decoded(self, chosen: protection.Protection) -> NumpyDecoded:
        """The numpy decoder of `chosen` (range check and/or SEC-DED) over this session's weights, made once."""
        key = chosen.name
        if key not in self._decoders:
            width = chosen.word_bits(self.format)
            if chosen.code == protection.PLAIN:  # plain storage: the words are the weights (zero-padded), no code
                code = None
                counts = [codec.packed_shape(array.nbytes * 8 // self.weight_bits, self.format, width)[0]
                          for array in self.weights.buffers]
                ones = [int(np.bitwise_count(array.reshape(-1).view(np.uint8)).sum()) for array in self.weights.buffers]
                words = StoredWords(np.array(counts, dtype=np.int64), np.array(ones, dtype=np.int64))
            else:
                assert self.code_words is not None, "a session of coded words encodes them when it is made"
                code, words = chosen.code, self.code_words
            bounds = None
            if chosen.range_check:
                fmt_dtype = FORMATS[self.format].dtype
                bounds = [_range_bound(array.reshape(-1).view(fmt_dtype)) for array in self.weights.buffers]
            self._decoders[key] = NumpyDecoded(self.weights, self.format, width, code, words, bounds)
        return self._decoders[key]

    def word_bits_of(self, target: FaultTarget) -> int | None:
        """The bits of one word of `target`'s stored bits, as its positions count them (None for ECC, whose
        codewords are decoded outside the model)."""
        if isinstance(target, EccProtected):
            return None
        if isinstance(target, BitPosition):
            return 1  # a position is one plain weight, its own word
        if isinstance(target, NumpyDecoded):
            return target.word_bits
        return self.word_bytes * 8

    def target(self, condition: Condition) -> FaultTarget:
        """Where the faults of `condition` land (whole tensors: see `space`)."""
        if condition.study == BIT_STUDY and condition.bit is not None:
            return BitPosition(self.stored, self.weight_bits, condition.bit)
        chosen = protection.parse(condition.protection)
        if chosen.code == protection.ECC:
            return self.ecc
        return self.decoded(chosen) if chosen.decoded_in_numpy else self.stored

    def space(self, condition: Condition, target: FaultTarget) -> FaultTarget | Subspace:
        """The bits the faults of `condition` are drawn over: the target's, or those of its chosen layers."""
        if not condition.layers:
            return target
        key = condition.key
        if key not in self._subspaces:
            missing = [name for name in condition.layers if name not in self.tensor_names]
            if missing:
                raise OppassError(f"no protected weight tensor named {missing[0]!r}: choose from "
                                  f"{', '.join(self.tensor_names)}")
            self._subspaces[key] = Subspace(target, [self.tensor_names.index(name) for name in condition.layers])
        return self._subspaces[key]


def _range_bound(weights: np.ndarray) -> float:
    """The range check's bound of a tensor's weights (inf, no check, when one is not finite: as the pass does),
    found a chunk at a time so that its float32 temporaries stay small."""
    maxima = [codec.max_magnitude(weights[start : start + CHUNK_WEIGHTS])
              for start in range(0, weights.size, CHUNK_WEIGHTS)]
    finite = [largest for largest in maxima if largest is not None]
    return max(finite, default=0.0) if len(finite) == len(maxima) else math.inf


def coded_fill(producers: Sequence[Producer], layouts: Sequence[tuple[tuple[int, ...], np.dtype]], fmt: str,
               code: str, word: str) -> tuple[StoredWords, Callable[[int, np.ndarray], None]]:
    """The figures of the words `code` over `word` stores for the plain weight tensors `producers` write (shapes
    and dtypes `layouts`), and the fill of a buffer with its tensor's fault-free decode that counts them (the
    tensor written into the buffer, then encoded from it a chunk at a time; the words are not kept)."""
    fmt_dtype = FORMATS[fmt].dtype
    width = codec.word_bits(fmt, word if word == "weight" else int(word), code)
    shapes = [codec.packed_shape(math.prod(shape), fmt, width) for shape, _ in layouts]
    words = StoredWords(np.array([rows for rows, _ in shapes], dtype=np.int64), np.zeros(len(shapes), np.int64))

    def fill(index: int, buffer: np.ndarray) -> None:
        _produce_into(producers, index, buffer)
        weights = buffer.reshape(-1).view(fmt_dtype)
        for start in range(0, weights.size, CHUNK_WEIGHTS):  # each chunk read, then its decode written back
            encoded = codec.encode(weights[start : start + CHUNK_WEIGHTS], width, code=code)
            assert encoded.adjusted is not None
            words.ones[index] += int(np.bitwise_count(encoded.packed).sum())
            weights[start : start + CHUNK_WEIGHTS] = encoded.adjusted
    return words, fill


class _BufferStream:
    """A binary stream whose writes fill a numpy buffer's bytes in order."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.bytes = buffer.reshape(-1).view(np.uint8)
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        chunk = np.frombuffer(data, dtype=np.uint8)
        if self.written + chunk.size > self.bytes.size:
            raise OppassError(f"a packed weight was written with more than its {self.bytes.size} bytes")
        self.bytes[self.written : self.written + chunk.size] = chunk
        self.written += chunk.size
        return chunk.size


def _produce_into(producers: Sequence[Producer], index: int, buffer: np.ndarray) -> None:
    """Has `producers[index]` write its packed weight into `buffer`, which it must fill exactly."""
    stream = _BufferStream(buffer)
    producers[index].write(cast(BinaryIO, stream))
    if stream.written != stream.bytes.size:
        raise OppassError(f"a packed weight was written with {stream.written} bytes, expected {stream.bytes.size}")


@functools.cache
def _share_one_arena() -> None:
    """Registers, once per process, the CPU memory arena every campaign session uses: one arena for all
    variants' sessions, grown by what is asked. A session's own arena doubles its last region instead: after
    the 64 MiB decode of a 64 MiB weight, a 16 KiB request took another 64 MiB (onnxruntime 1.32)."""
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"arena_extend_strategy": ARENA_GROWS_AS_ASKED}))


def _session_over_buffers(model: onnx.ModelProto, options: ort.SessionOptions, packed: set[str]
                          ) -> ort.InferenceSession:
    """A session of `model` whose packed tensors (emptied) are the initializers `options` adds: onnxruntime
    needs each in the graph with its bytes, so they are zeros in a temporary data file it opens by path (never
    read: the added ones replace them), and the model's other tensors are written there too, not serialised."""
    with tempfile.TemporaryDirectory(prefix="oppass-campaign-") as folder:
        path = Path(folder) / "variant.onnx"
        tensors = [tensor for tensor in model.graph.initializer if tensor.name in packed]
        for tensor in tensors:  # a sparse file: its zeros take no disk and no memory
            data = Path(folder) / f"{len(tensor.external_data)}{id(tensor)}.zeros"
            with open(data, "wb") as stream:
                stream.truncate(math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
            point_to(tensor, {"location": data.name})
        try:
            onnx.save_model(model, path)
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            for tensor in tensors:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT


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
        self._check_unchanged()
        self.dataset: Dataset = open_dataset(  # the model's structure only: each variant reads the file
            workload.data, model_inputs(modelio.read_model(workload.model, defer=True).model), workload.batched)
        self.sessions: dict[Variant, VariantSession] = {}
        self.batches: dict[int, tuple[list[dict[str, np.ndarray]], np.ndarray | None]] = {}

    def session(self, variant: Variant) -> VariantSession:
        """The session of `variant`, built on first use."""
        if variant not in self.sessions:
            blocks = [session.weights.block.nbytes for session in self.sessions.values()]
            if blocks and sum(blocks) + max(blocks) > SESSION_CACHE_BYTES:
                self.sessions.clear()  # a task still running on one keeps it until it ends
            code, _, word = variant.word.rpartition(":")
            session = VariantSession(*build_variant(self.workload.model, variant, self.workload.ops),
                                     self.workload.output,
                                     self.workload.batched, (code, word) if code else None)
            self._check_unchanged()  # what was read (weights are read as the session is made) is what was hashed
            self.sessions[variant] = session
        return self.sessions[variant]

    def _check_unchanged(self) -> None:
        if model_digest(self.workload.model) != self.workload.model_digest:
            raise OppassError(f"the model {self.workload.model} or its external data changed while the campaign "
                              "ran: run the campaign again")

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
            metric = self.workload.metric
            predicted = top1(outputs, metric.class_axis) if metric.name in CLASSIFYING else None
            unscored = Experiment(feeds, labels, outputs, correct, len(outputs), TrialScore(0, 0, 0, ""), predicted)
            (scores,) = _score(self.workload.metric, [outputs], [unscored], [0])
            session.experiments[experiment] = replace(unscored, fault_free_scores=scores)
        return session.experiments[experiment]


_NO_FLIPS = Injection(0, 0, None, np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8))
_NO_FLIPS_CORRECTED = replace(_NO_FLIPS, corrected=0)
_CACHES: dict[Workload, WorkerCache] = {}
_CACHES_LOCK = threading.Lock()


def build_variant(model: str | Path, variant: Variant, ops: Sequence[str] = DEFAULT_OPS
                  ) -> tuple[onnx.ModelProto, dict[str, Producer]]:
    """The model file with the weights of `ops` stored in the variant's format, OP-protected or plain (a `CODE:W`
    variant is plain: its session re-encodes the weights), each packed weight a placeholder, and the producers
    that encode them from the file (`protect.transform_to_placeholders`); a model with no such weight comes
    back without decode nodes (a warning)."""
    word: str | int = "weight"
    if variant.protected and variant.word != "weight":
        word = int(variant.word)
    return transform_to_placeholders(model, format=variant.format, word=word, ops=tuple(ops),
                                     check="runtime" if variant.protected else "none", report_faults=True,
                                     allow_unprotected=True)


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
        largest = max(_FLIP_BYTES * (target.n_bits * condition.ber if condition.count is None else condition.count)
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


def _draw(workload: Workload, session: VariantSession, streams: TrialStreams, condition: Condition, trial: int,
          target: FaultTarget) -> tuple[Injection, int | None]:
    """Trial `trial` of `condition`: its faults drawn from its own stream (`_stream_key`) and prepared, with the
    words they hit an even number of times (None for ECC). Flips drawn as a mask are injected from it, when
    the target takes masks, with the same result as from their positions."""
    space = session.space(condition, target)
    model, rng = faultmodels.parse(condition.fault), streams.rng(workload.seed, _stream_key(workload, condition),
                                                                   trial)
    word_bits = session.word_bits_of(target)
    if (isinstance(space, StoredBits) and space.takes_masks and word_bits is not None
            and _counted_from_mask(word_bits, space.n_bits // 8)
            and model.draws_mask(space, condition.ber, condition.count, workload.sampler)):
        drawn = faults.draw_flip_mask(rng, space.n_bits, condition.ber).view(np.uint8)
        hits = _mask_word_hits(drawn, word_bits)
        return space.prepare_mask(drawn, int(hits.sum())), _even_words(hits)
    positions = model.positions(rng, space, condition.ber, condition.count, workload.sampler)
    if positions.size == 0:  # never injected
        corrects = isinstance(target, EccProtected) or (isinstance(target, NumpyDecoded) and target.code == SECDED)
        return _NO_FLIPS_CORRECTED if corrects else _NO_FLIPS, None if word_bits is None else 0
    if isinstance(space, Subspace):
        positions = space.to_target(positions)
    injection = target.prepare(positions)
    if word_bits is None:
        return injection, None
    mask = target.stream_mask(injection) if isinstance(target, StoredBits) else None
    return injection, even_flip_words(positions, word_bits, mask)


def _stream_key(workload: Workload, condition: Condition) -> str:
    """The name of the random stream a trial of `condition` draws from, with the campaign seed and the trial: store
    format 1 has one stream per condition; 2 and 3 one per draw key, shared by protections over the same bits."""
    return condition.key if workload.store_format == 1 else condition.draw_key


def _run_burst(
    cache: WorkerCache,
    session: VariantSession,
    pairs: Sequence[tuple[Condition, int]],
    targets: Sequence[FaultTarget],
    experiments: Sequence[Experiment],
) -> list[TrialRecord]:
    clock = time.perf_counter
    injections, even, own = [], [], []
    streams = TrialStreams()
    for (condition, trial), target in zip(pairs, targets, strict=True):
        started = clock()
        injection, words = _draw(cache.workload, session, streams, condition, trial, target)
        injections.append(injection)
        even.append(words)
        own.append(clock() - started)
    inference = [0.0] * len(pairs)
    outputs: dict[int, np.ndarray] = {}
    decoder_masked = [0] * len(pairs)
    for i, (experiment, target, injection) in enumerate(zip(experiments, targets, injections, strict=True)):
        if injection.flips == 0:
            continue  # its weights are the fault-free ones: so are its outputs and scores
        started = clock()
        target.inject(injection)
        try:
            inference_started = clock()
            outputs[i], decoder_masked[i] = session.run(experiment.feeds)
            inference[i] = clock() - inference_started
        finally:
            target.restore(injection)
        own[i] += clock() - started - inference[i]
    scores = [experiment.fault_free_scores for experiment in experiments]
    if outputs:
        started = clock()
        run = list(outputs)
        faulty = _score(cache.workload.metric, [outputs[i] for i in run], [experiments[i] for i in run],
                        [injections[i].flips for i in run])
        for i, score in zip(run, faulty, strict=True):
            scores[i] = score
        shared = (clock() - started) / len(run)
        for i in run:
            own[i] += shared
    spaces = [session.space(condition, target) for (condition, _), target in zip(pairs, targets, strict=True)]
    return [
        TrialRecord(
            condition_key=condition.key,
            trial=trial,
            study=condition.study,
            format=condition.format,
            protection=condition.protection,
            ber=condition.ber if condition.count is None else condition.count / spaces[i].n_bits,
            bit=condition.bit,
            n_bits=spaces[i].n_bits,
            flips=injection.flips,
            even_flip_words=even[i],
            masked_words=decoder_masked[i] + injection.masked,
            samples=experiment.samples,
            correct=scores[i].correct,
            fault_free_correct=experiment.correct,
            sdc_samples=scores[i].sdc,
            nonfinite_samples=scores[i].nonfinite,
            outcome=scores[i].outcome,
            inject_seconds=own[i],
            inference_seconds=inference[i],
            corrected_words=injection.corrected,
        )
        for i, ((condition, trial), injection, experiment) in enumerate(
            zip(pairs, injections, experiments, strict=True)
        )
    ]


def _score(metric: Metric, outputs: Sequence[np.ndarray], experiments: Sequence[Experiment],
           flips: Sequence[int]) -> list[TrialScore]:
    """The scores of runs `outputs` on the batches of `experiments` (one call for all of them)."""
    known = [e.labels for e in experiments if e.labels is not None]  # all or none: one data set
    predicted = [e.fault_free_top1 for e in experiments if e.fault_free_top1 is not None]  # all or none: one metric
    scores = metric.score(np.stack(outputs), np.stack([e.outputs for e in experiments]),
                          np.stack(known) if known else None, np.stack([e.correct_samples for e in experiments]),
                          np.asarray(flips), np.stack(predicted) if predicted else None)
    return [TrialScore(int(scores.correct[i]), int(scores.sdc[i]), int(scores.nonfinite[i]), scores.outcomes[i])
            for i in range(len(outputs))]


def even_flip_words(positions: np.ndarray, word_bits: int, mask: np.ndarray | None = None) -> int:
    """Words of `word_bits` bits that the sorted distinct flipped bits `positions` hit an even, non-zero number
    of times: the errors a parity check over such words cannot see. `mask`, when given, holds the same flips as
    a little-endian uint8 bit mask (zero past the stream): words are then counted from it where they can be."""
    if positions.size < 2 or word_bits == 1:  # a word hit twice needs two flips
        return 0
    if mask is not None and _counted_from_mask(word_bits, mask.size):
        return _even_words(_mask_word_hits(mask, word_bits))
    words = positions // word_bits
    changes = words[1:] != words[:-1]
    if changes.all():  # every word hit once
        return 0
    ends = np.empty(words.size + 1, dtype=np.int64)  # -1, then the last flip of each word hit
    ends[0] = -1
    last = np.flatnonzero(changes)
    ends[1 : last.size + 1] = last
    ends[last.size + 1] = words.size - 1
    hits = np.diff(ends[: last.size + 2])
    return int(np.count_nonzero(hits % 2 == 0))


def _counted_from_mask(word_bits: int, mask_bytes: int) -> bool:
    """Whether `_mask_word_hits` counts words of `word_bits` bits in a mask of `mask_bytes` bytes."""
    if word_bits % 8 or not (word_bits in _WORD_DTYPES or word_bits % 64 == 0):
        return False
    return mask_bytes % (word_bits // 8) == 0


def _mask_word_hits(mask: np.ndarray, word_bits: int) -> np.ndarray:
    """The bits set in each word of `word_bits` bits of the little-endian uint8 `mask`."""
    if word_bits in _WORD_DTYPES:
        return np.bitwise_count(mask.view(_WORD_DTYPES[word_bits]))
    return np.bitwise_count(mask.view("<u8")).reshape(-1, word_bits // 64).sum(axis=1, dtype=np.int64)


def _even_words(hits: np.ndarray) -> int:
    """How many of the words hit `hits` times were hit an even, non-zero number of times."""
    return int(np.count_nonzero(hits)) - int(np.count_nonzero(hits & 1))
