"""`run_campaign`: plan the grid, run the missing trials, summarise and export."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import onnxruntime as ort

from oppass import files, modelio, runtime
from oppass.campaign import export
from oppass.campaign.batch_study import batch_size_study
from oppass.campaign.config import UNPROTECTED, CampaignConfig, Condition, Variant, campaign_protections, conditions
from oppass.campaign.data import Dataset, ModelInput, model_inputs, open_dataset
from oppass.campaign.metrics import ALLCLOSE, CLASSIFYING, GOLDEN, LABELLED, TOP1, TOP5, TOP5_CLASSES, Metric
from oppass.campaign.progress import Progress
from oppass.campaign.records import TrialRecord
from oppass.campaign.scheduler import execute, tasks
from oppass.campaign.store import Store
from oppass.campaign.summary import BerzadRow, ConditionSummary, berzad_rows, summarize, table2
from oppass.campaign.worker import ORT_ERRORS_ONLY, Workload, build_variant, model_digest
from oppass.errors import CampaignInterrupted, OppassError
from oppass.formats import DEFAULT_OPS
from oppass.schema import read_decode_nodes

PROBE_SAMPLES = 2


@dataclass(frozen=True)
class Plan:
    """A campaign resolved against its model and data: what will run, and what was adapted."""

    workload: Workload
    conditions: list[Condition]
    experiments: int
    notes: list[str]
    identity: dict
    formats: tuple[str, ...]
    samples: int
    data_description: str
    batch_study: bool


@dataclass(frozen=True)
class CampaignResult:
    """What a campaign produced: summaries, BERZADs, exported files and this run's throughput.

    `seconds` runs from the workers being ready to the last trial stored (cluster start-up excluded).
    """

    out: Path
    summaries: list[ConditionSummary]
    berzad: list[BerzadRow]
    table: list[BerzadRow]
    notes: list[str]
    trials_run: int
    seconds: float
    files: list[Path]

    @property
    def trials_per_second(self) -> float:
        """Trials run per second of this run (0 when nothing ran)."""
        return self.trials_run / self.seconds if self.seconds > 0 else 0.0


def run_campaign(config: CampaignConfig, log: TextIO | None = sys.stderr) -> CampaignResult:
    """Runs (or resumes, or extends) the campaign in `config.out` and writes its exports there.

    Notes and progress go to `log` (None: silent). On KeyboardInterrupt (Ctrl-C, or a signal the
    caller turns into one) the finished trials stay stored and CampaignInterrupted is raised.
    """
    _check_out(config.out)
    plan = make_plan(config)
    if log is not None:
        for note in plan.notes:
            print(f"note: {note}", file=log, flush=True)
    store = open_store(config.out, plan.identity)
    planned = [(c, t) for c in plan.conditions for t in range(plan.experiments)]
    keys = {(c.key, t) for c, t in planned}
    workload = dataclasses.replace(plan.workload, store_format=store.format_version)
    try:
        finished = store.finished()
        pending = [(c, t) for c, t in planned if (c.key, t) not in finished]
        progress = Progress(len(planned), len(planned) - len(pending), log)

        def deliver(records: list[TrialRecord]) -> None:
            store.add(records)
            progress.advance(len(records))

        try:
            seconds = execute(workload, tasks(pending), deliver, config.scheduler, config.workers)
        finally:
            progress.close()
        if config.batch_study and plan.batch_study:
            _run_batch_study(store, workload, plan.formats)
        summaries = summarize([record for record in store.trials() if (record.condition_key, record.trial) in keys])
        rows = berzad_rows(summaries)
        table = table2(rows, plan.formats, campaign_protections(config))
        written = export.write_all(config, plan, store, summaries, rows, table)
    except KeyboardInterrupt:
        stored = len(keys & store.finished())
        raise CampaignInterrupted(stored, len(planned)) from None
    finally:
        store.close()
    return CampaignResult(config.out, summaries, rows, table, plan.notes, len(pending), seconds, written)


def open_store(out: Path, identity: dict) -> Store:
    """The store in `out`, created if needed; one-line errors for a file or an unwritable folder."""
    _check_out(out)
    try:
        return Store(out, identity)
    except (OSError, sqlite3.Error) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise OppassError(f"cannot write the campaign to {out}: {reason}") from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OppassError(f"--out {out} is a file: give a folder (new, or holding this campaign)")


def make_plan(config: CampaignConfig) -> Plan:
    """Checks model and data, fits data, output, metric and formats to them, and lists the conditions."""
    files.check_input(config.model, "model file")  # missing, or a FIFO, device, folder: said so
    model = modelio.read_model(config.model, defer=True).model  # its structure: weights are read where needed
    if read_decode_nodes(model):
        raise OppassError(f"{config.model} is already protected by oppass: give the unprotected model (or "
                          "`oppass strip` it first)")
    inputs = model_inputs(model)
    dataset = open_dataset(config.data, inputs)
    notes = list(dataset.notes)
    output, probe, dataset = _probe(config, dataset, inputs, notes)
    batch_size = config.batch_size
    if dataset.size < batch_size:
        batch_size = dataset.size
        notes.append(f"the data has {dataset.size} samples, fewer than --batch {config.batch_size}: "
                     f"each experiment uses all {dataset.size} (in a seeded order)")
    metric = _metric(config, output, probe, dataset, notes)
    formats = _usable_formats(config.model, config.formats, config.ops, notes)
    batch_study = metric.name not in (GOLDEN, ALLCLOSE) and dataset.labels is not None
    if config.batch_study and not batch_study:
        notes.append(f"the batch-size study needs labels and a metric that uses them ({metric.name} does not): "
                     "skipped")
    digest = model_digest(config.model)  # the model file and its external data
    layers = _layer_names(config.model, formats[0], config.ops) if config.layers else []
    missing = [name for name in config.layers if name not in layers]
    if missing:
        raise OppassError(f"no protected weight tensor named {missing[0]!r} (--layers): choose from "
                          f"{', '.join(layers)}")
    workload = Workload(str(Path(config.model).resolve()), digest, config.data, config.seed, batch_size, metric,
                        output, dataset.batched, ops=config.ops)
    identity = {
        "model_sha256": digest,
        "data": dataset.identity,
        "batch_size": batch_size,
        "metric": metric.name,
        "output": output,
        "class_axis": metric.class_axis,
        "seed": config.seed,
    }
    if metric.name == ALLCLOSE:
        identity |= {"rtol": metric.rtol, "atol": metric.atol}
    if set(config.ops) != set(DEFAULT_OPS):  # other weights: a store of Conv and Gemm weights keeps its identity
        identity["ops"] = sorted(set(config.ops))
    # The fault model, flip counts and layers are in each condition's key (and its draws' key), like the BERs:
    # a campaign is extended with other ones in place.
    return Plan(workload, conditions(config, formats), config.experiments, notes, identity, formats, dataset.size,
                dataset.description, batch_study)


def _output_name(wanted: str | None, names: list[str]) -> str:
    if wanted is None:
        return names[0]
    if wanted not in names:
        raise OppassError(f"the model has no output {wanted!r}: its outputs are {', '.join(map(repr, names))}")
    return wanted


def _probe(config: CampaignConfig, dataset: Dataset, inputs: list[ModelInput], notes: list[str]
           ) -> tuple[str, np.ndarray, Dataset]:
    """The output the campaign scores and its fault-free values on the first samples, sample axis first (one
    run per sample if the model's output does not carry the batch along its first axis), from a session
    closed before the campaign's own are made."""
    options = ort.SessionOptions()
    options.log_severity_level = ORT_ERRORS_ONLY
    session = runtime.session_from_file(config.model, options)  # by path: onnxruntime maps the weights
    output = _output_name(config.output, [o.name for o in session.get_outputs()])
    count = min(PROBE_SAMPLES, dataset.size)
    outputs = _run(session, output, dataset.feeds(np.arange(count)), dataset.batched)
    if dataset.batched and (outputs.ndim == 0 or outputs.shape[0] != count):
        notes.append(f"output {output!r} {list(outputs.shape)} does not have the batch of {count} along its first "
                     "axis: one run per sample")
        dataset = open_dataset(config.data, inputs, batched=False)
        outputs = _run(session, output, dataset.feeds(np.arange(count)), False)
    return output, outputs, dataset


def _run(session: ort.InferenceSession, output: str, feeds: list[dict[str, np.ndarray]], batched: bool) -> np.ndarray:
    try:
        results = [session.run([output], feed)[0] for feed in feeds]
    except Exception as error:  # onnxruntime raises its own exception types for bad feeds
        expected = "; ".join(f"{i.name!r} {i.type} {i.shape}" for i in session.get_inputs())
        given = "; ".join(f"{k!r} {v.dtype} {list(v.shape)}" for k, v in feeds[0].items())
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OppassError(f"the model cannot run on the data (it takes {expected}; the data gives {given}): "
                          f"{first_line}") from None
    return results[0] if batched else np.stack(results)


def _metric(config: CampaignConfig, output: str, probe: np.ndarray, dataset: Dataset, notes: list[str]) -> Metric:
    """The metric to use: the configured one, or top1 with labels and golden without, fitted to the output."""
    labelled = dataset.labels is not None
    name = config.metric or (TOP1 if labelled else GOLDEN)
    if name in LABELLED and not labelled:
        notes.append(f"the data has no labels: metric {name} replaced by golden (agreement with the fault-free top-1)")
        name = GOLDEN
    class_axis = _class_axis(config.class_axis, probe.ndim, dataset.batched)
    if name in CLASSIFYING:
        if class_axis is None:
            raise OppassError(f"output {output!r} {list(probe.shape[1:])} per sample has no class axis "
                              f"{config.class_axis}: use --metric allclose, a user metric or another --class-axis")
        classes = probe.shape[class_axis]
        if classes == 1:
            raise OppassError(f"output {output!r} {list(probe.shape[1:])} per sample has 1 class along axis "
                              f"{config.class_axis}, so its top-1 can never change: use --metric allclose, a user "
                              "metric or another --class-axis")
        if name == TOP5 and classes <= TOP5_CLASSES:
            notes.append(f"output {output!r} has {classes} classes, so top-5 would always be right: metric top1 "
                         "used instead")
            name = TOP1
    metric = Metric(name, class_axis if class_axis is not None else -1, config.rtol, config.atol)
    if name in LABELLED and dataset.labels is not None:
        positions = tuple(int(d) for d in np.delete(np.array(probe.shape[1:]), probe.ndim + metric.class_axis - 1))
        if dataset.labels.shape[1:] != positions:
            raise OppassError(f"labels of shape {list(dataset.labels.shape)} do not fit output {output!r} "
                              f"{list(probe.shape[1:])} per sample (classes along axis {config.class_axis}): "
                              f"expected [{dataset.size}{''.join(f', {p}' for p in positions)}]")
        classes = probe.shape[metric.class_axis]
        if dataset.labels.size and int(dataset.labels.max()) >= classes:
            raise OppassError(f"the data has label {int(dataset.labels.max())} but output {output!r} has {classes} "
                              f"classes (labels must be 0..{classes - 1})")
    if metric.user:
        labels = None if dataset.labels is None else dataset.labels[: len(probe)][None]
        metric.correct(probe[None], probe[None], labels)
    return metric


def _class_axis(axis: int, rank: int, batched: bool) -> int | None:
    """The class axis as a negative index of a batch's output ([samples, ...], rank `rank`), or None when the
    output has no such axis. `axis` counts the model output's axes (which include the sample axis when batched)."""
    model_rank = rank if batched else rank - 1
    negative = axis if axis < 0 else axis - model_rank
    if not -(rank - 1) <= negative <= -1:
        return None
    return negative


def _usable_formats(model: str | Path, wanted: tuple[str, ...], ops: tuple[str, ...], notes: list[str]
                    ) -> tuple[str, ...]:
    """The formats the model file can be stored in (each built, a weight at a time); the others skipped with a note."""
    usable, reasons = [], []
    for fmt in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no weight found" is an error here, raised below
                variant, producers = build_variant(model, Variant(fmt, UNPROTECTED), ops)
                with open(os.devnull, "wb") as sink:  # each weight encoded (and dropped): what fails, fails here
                    for producer in producers.values():
                        producer.write(sink)
        except OppassError as error:
            reasons.append(f"{fmt}: {error}")
            notes.append(f"weight format {fmt} skipped: {error}")
            continue
        if not read_decode_nodes(variant):
            raise OppassError(f"the model has no weight initializers of {', '.join(ops)} that oppass protects: "
                              "there is nothing to inject faults into (name other op types with --ops, e.g. "
                              f"--ops {','.join(sorted(set(ops) | {'MatMul'}))})")
        usable.append(fmt)
    if not usable:
        raise OppassError(f"the model cannot be stored in any of the formats asked for ({'; '.join(reasons)})")
    return tuple(usable)


def _layer_names(model: str | Path, fmt: str, ops: tuple[str, ...]) -> list[str]:
    """The weight tensors faults can be restricted to (`--layers`): those oppass protects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [decode.output for decode in read_decode_nodes(build_variant(model, Variant(fmt, UNPROTECTED),
                                                                            ops)[0])]


def _run_batch_study(store: Store, workload: Workload, formats: tuple[str, ...]) -> None:
    studied = {row[0] for row in store.batch_study()}
    for fmt in formats:
        if fmt not in studied:
            store.save_batch_study(fmt, batch_size_study(workload, fmt))
