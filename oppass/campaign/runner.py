"""`run_campaign`: plan the grid, run the missing trials, summarise and export."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from oppass import modelio
from oppass.campaign import export
from oppass.campaign.batch_study import batch_size_study
from oppass.campaign.config import CampaignConfig, Condition, ber_grid, campaign_protections, conditions
from oppass.campaign.data import Dataset, open_dataset
from oppass.campaign.progress import Progress
from oppass.campaign.records import TrialRecord
from oppass.campaign.scheduler import execute, tasks
from oppass.campaign.store import Store
from oppass.campaign.summary import BerzadRow, ConditionSummary, berzad_rows, summarize, table2
from oppass.campaign.worker import Workload
from oppass.errors import OppassError
from oppass.protect import transform
from oppass.schema import read_decode_nodes

TOP5_CLASSES = 5


@dataclass(frozen=True)
class Plan:
    """A campaign resolved against its model and data: what will run, and what was adapted."""

    workload: Workload
    conditions: list[Condition]
    experiments: int
    notes: list[str]
    identity: dict


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


def run_campaign(config: CampaignConfig) -> CampaignResult:
    """Runs (or resumes) the campaign in `config.out` and writes its exports there."""
    plan = make_plan(config)
    store = Store(config.out, plan.identity)
    workload = dataclasses.replace(plan.workload, store_format=store.format_version)
    try:
        finished = store.finished()
        pending = [(c, t) for c in plan.conditions for t in range(plan.experiments) if (c.key, t) not in finished]
        progress = Progress(len(pending))

        def deliver(records: list[TrialRecord]) -> None:
            store.add(records)
            progress.advance(len(records))

        seconds = execute(workload, tasks(pending), deliver, config.scheduler, config.workers)
        progress.close()
        if config.batch_study and plan.workload.metric != "golden":
            _run_batch_study(store, workload, config.formats)
        summaries = summarize(store.trials())
        rows = berzad_rows(summaries)
        table = table2(rows, config.formats, campaign_protections(config))
        files = export.write_all(config, plan.notes, store, summaries, rows, table)
    finally:
        store.close()
    return CampaignResult(config.out, summaries, rows, table, plan.notes, len(pending), seconds, files)


def make_plan(config: CampaignConfig) -> Plan:
    """Checks model and data, adapts batch size and metric to them, and lists the conditions."""
    if not Path(config.model).is_file():
        raise OppassError(f"no such model file: {config.model}")
    dataset = open_dataset(config.data)
    notes = []
    batch_size = config.batch_size
    if dataset.size < batch_size:
        batch_size = dataset.size
        notes.append(f"the data has {dataset.size} samples, fewer than --batch {config.batch_size}: "
                     f"each experiment uses all {dataset.size} (in a seeded order)")
    metric = _usable_metric(config.metric, dataset, _class_count(config.model, dataset), notes)
    if config.layers:
        _check_layers(config)
    if config.batch_study and metric == "golden":
        notes.append("the batch-size study needs labels: skipped")
    digest = hashlib.sha256(Path(config.model).read_bytes()).hexdigest()
    workload = Workload(str(Path(config.model).resolve()), digest, config.data, config.seed, batch_size, metric)
    identity = {
        "model_sha256": digest,
        "data": dataset.identity,
        "formats": list(config.formats),
        "protections": list(config.protections),
        "ecc": config.ecc,
        "bers": list(ber_grid(config.ber_min, config.ber_max, config.points_per_decade)),
        "experiments": config.experiments,
        "batch_size": batch_size,
        "metric": metric,
        "seed": config.seed,
        "bit_positions": config.bit_positions,
        "batch_study": config.batch_study,
    }
    # Keys of later options appear only when set, so that stores made before them keep their identity.
    if config.fault != "flip":
        identity["fault"] = config.fault
    if config.flip_counts:
        identity["flip_counts"] = list(config.flip_counts)
    if config.layers:
        identity["layers"] = list(config.layers)
    return Plan(workload, conditions(config), config.experiments, notes, identity)


def _check_layers(config: CampaignConfig) -> None:
    """Refuses, in one line, a `layers` name that is no protected weight tensor of the model."""
    decoders = read_decode_nodes(transform(modelio.load_model(config.model), format=config.formats[0], word="weight",
                                           check="none"))
    names = [decode.output for decode in decoders]
    missing = [name for name in config.layers if name not in names]
    if missing:
        raise OppassError(f"no protected weight tensor named {missing[0]!r} (--layers): choose from {', '.join(names)}")


def _usable_metric(metric: str, dataset: Dataset, classes: int, notes: list[str]) -> str:
    if metric != "golden" and dataset.labels is None:
        notes.append(f"the data has no labels: metric {metric} replaced by golden (agreement with fault-free top-1)")
        return "golden"
    if metric == "top5" and classes <= TOP5_CLASSES:
        notes.append(f"the model has {classes} classes, so top-5 would always be right: metric top1 used instead")
        return "top1"
    return metric


def _class_count(model: Path, dataset: Dataset) -> int:
    """Size of the last axis of the model's first output, from one fault-free inference."""
    session = ort.InferenceSession(modelio.load_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: dataset.inputs(np.arange(1))}
    (output,) = session.run([session.get_outputs()[0].name], feeds)
    return int(output.shape[-1])


def _run_batch_study(store: Store, workload: Workload, formats: tuple[str, ...]) -> None:
    studied = {row[0] for row in store.batch_study()}
    for fmt in formats:
        if fmt not in studied:
            store.save_batch_study(fmt, batch_size_study(workload, fmt))
