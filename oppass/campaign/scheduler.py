"""Where trials run: in this process (`serial`), on an embedded Dask LocalCluster (`local`) or
on an existing Dask scheduler (`tcp://host:port`).

Work is cut into tasks of at most CHUNK_TRIALS trials of one condition. Results stream
back as tasks finish and go to `deliver`, which runs in the calling process only (the
store has a single writer). A task lost with its worker is rescheduled by Dask; the
store ignores trials it already holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

from oppass.campaign.config import Condition
from oppass.campaign.worker import TrialRecord, Workload, run_trials, worker_cache
from oppass.errors import OppassError

CHUNK_TRIALS = 20
SERIAL, LOCAL = "serial", "local"

Task = tuple[Condition, tuple[int, ...]]
Deliver = Callable[[list[TrialRecord]], None]


def tasks(pending: Sequence[tuple[Condition, int]]) -> list[Task]:
    """Pending (condition, trial) pairs grouped into tasks of at most CHUNK_TRIALS trials of one condition."""
    by_condition: dict[Condition, list[int]] = {}
    for condition, trial in pending:
        by_condition.setdefault(condition, []).append(trial)
    return [
        (condition, tuple(trials[start : start + CHUNK_TRIALS]))
        for condition, trials in by_condition.items()
        for start in range(0, len(trials), CHUNK_TRIALS)
    ]


def execute(workload: Workload, work: Sequence[Task], deliver: Deliver, scheduler: str, workers: int | None) -> None:
    """Runs every task and hands each finished task's records to `deliver`."""
    if scheduler == SERIAL:
        _execute_serial(workload, work, deliver)
    else:
        _execute_dask(workload, work, deliver, scheduler, workers)


def _execute_serial(workload: Workload, work: Sequence[Task], deliver: Deliver) -> None:
    worker_cache(workload)
    for condition, trials in work:
        for trial in trials:
            deliver(run_trials(workload, condition, (trial,)))


def _execute_dask(workload: Workload, work: Sequence[Task], deliver: Deliver, scheduler: str, workers: int | None) -> None:
    from distributed import as_completed

    with _dask_client(scheduler, workers) as client:
        futures = [client.submit(run_trials, workload, condition, trials, pure=False) for condition, trials in work]
        for future in as_completed(futures):
            deliver(future.result())
            future.release()


@contextlib.contextmanager
def _dask_client(scheduler: str, workers: int | None) -> Iterator[object]:
    """A client of an embedded LocalCluster (one single-threaded worker process per core) or of `scheduler`."""
    from distributed import Client, LocalCluster  # imported here: serial campaigns never start Dask
    if scheduler == LOCAL:
        n_workers = workers or os.cpu_count() or 1
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                yield client
    elif "://" in scheduler:
        with Client(scheduler) as client:
            yield client
    else:
        raise OppassError(f"unknown scheduler {scheduler!r}: use serial, local or an address like tcp://host:8786")
