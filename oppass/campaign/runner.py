"""`run_campaign`: plan the grid, run the missing trials, summarise and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oppass import files, modelio, runtime
from oppass.campaign import export
from oppass.campaign.batch_study import batch_size_study
from oppass.campaign.config import CampaignConfig, Condition, ber_grid, conditions
from oppass.campaign.data import Dataset, open_dataset
from oppass.campaign.progress import Progress
from oppass.campaign.records import TrialRecord
from oppass.campaign.scheduler import execute, tasks
from oppass.campaign.store import Store
from oppass.campaign.summary import BerzadRow, ConditionSummary, berzad_rows, summarize, table2
from oppass.campaign.worker import Workload, model_digest
from oppass.errors import OppassError

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
    try:
        finished = store.finished()
        pending = [(c, t) for c in plan.conditions for t in range(plan.experiments) if (c.key, t) not in finished]
        progress = Progress(len(pending))

        def deliver(records: list[TrialRecord]) -> None:
            store.add(records)
            progress.advance(len(records))

        seconds = execute(plan.workload, tasks(pending), deliver, config.scheduler, config.workers)
        progress.close()
        if config.batch_study and plan.workload.metric != "golden":
            _run_batch_study(store, plan.workload, config.formats)
        summaries = summarize(store.trials())
        rows = berzad_rows(summaries)
        table = table2(rows, config.formats, config.protections + (("ecc",) if config.ecc else ()))
        files = export.write_all(config, plan.notes, store, summaries, rows, table)
    finally:
        store.close()
    return CampaignResult(config.out, summaries, rows, table, plan.notes, len(pending), seconds, files)


def make_plan(config: CampaignConfig) -> Plan:
    """Checks model and data, adapts batch size and metric to them, and lists the conditions."""
    files.check_input(config.model, "model file")  # missing, or a FIFO, device, folder: said so
    dataset = open_dataset(config.data)
    notes = []
    batch_size = config.batch_size
    if dataset.size < batch_size:
        batch_size = dataset.size
        notes.append(f"the data has {dataset.size} samples, fewer than --batch {config.batch_size}: "
                     f"each experiment uses all {dataset.size} (in a seeded order)")
    metric = _usable_metric(config.metric, dataset, _class_count(config.model, dataset), notes)
    if config.batch_study and metric == "golden":
        notes.append("the batch-size study needs labels: skipped")
    digest = model_digest(config.model)  # the model file and its external data
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
    return Plan(workload, conditions(config), config.experiments, notes, identity)


def _usable_metric(metric: str, dataset: Dataset, classes: int, notes: list[str]) -> str:
    if metric != "golden" and dataset.labels is None:
        notes.append(f"the data has no labels: metric {metric} replaced by golden (agreement with fault-free top-1)")
        return "golden"
    if metric == "top5" and classes <= TOP5_CLASSES:
        notes.append(f"the model has {classes} classes, so top-5 would always be right: metric top1 used instead")
        return "top1"
    return metric


def _class_count(model: Path, dataset: Dataset) -> int:
    """Size of the last axis of the model's first output, from one fault-free inference; checks the labels."""
    session = runtime.open_session(modelio.load_model(model))
    feeds = {session.get_inputs()[0].name: dataset.inputs(np.arange(1))}
    try:
        (output,) = session.run([session.get_outputs()[0].name], feeds)
    except runtime.RUN_ERRORS as error:
        raise OppassError(f"the model cannot run on the data's inputs ({str(error).strip().splitlines()[0][:300]})") \
            from None
    classes = int(output.shape[-1]) if output.ndim else 1
    if dataset.labels is not None and dataset.labels.size and int(dataset.labels.max()) >= classes:
        raise OppassError(f"the data has label {int(dataset.labels.max())} but the model has {classes} classes "
                          f"(labels must be 0..{classes - 1})")
    return classes


def _run_batch_study(store: Store, workload: Workload, formats: tuple[str, ...]) -> None:
    studied = {row[0] for row in store.batch_study()}
    for fmt in formats:
        if fmt not in studied:
            store.save_batch_study(fmt, batch_size_study(workload, fmt))
