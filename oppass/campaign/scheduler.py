"""Where trials run: in this process (`serial`), on an embedded Dask LocalCluster (`local`) or
on an existing Dask scheduler (`tcp://host:port`).

Work is cut into tasks of at most CHUNK_TRIALS (condition, trial) pairs of one model variant,
taken in trial order, so a task uses the data batches of one or two experiments and a
worker computes the fault-free outputs of only the batches it runs. Results stream back
as tasks finish and go to `deliver` one task at a time (one store transaction each), in
the calling process only (the store has a single writer). A task lost with its worker is
rescheduled by Dask; the store ignores trials it already holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from oppass.campaign.config import Condition, Variant
from oppass.campaign.records import TrialRecord
from oppass.campaign.worker import Workload, run_trials, warm_up
from oppass.errors import OppassError

if TYPE_CHECKING:
    from distributed import Client

CHUNK_TRIALS = 20
CONNECT_SECONDS = 10
SERIAL, LOCAL = "serial", "local"

Task = tuple[tuple[Condition, int], ...]
Deliver = Callable[[list[TrialRecord]], None]


def tasks(pending: Sequence[tuple[Condition, int]]) -> list[Task]:
    """Pending (condition, trial) pairs grouped by model variant, sorted by trial (conditions in their order),
    each group split evenly into tasks of at most CHUNK_TRIALS pairs."""
    by_variant: dict[Variant, list[tuple[Condition, int]]] = {}
    for condition, trial in pending:
        by_variant.setdefault(condition.variant, []).append((condition, trial))
    work = []
    for pairs in by_variant.values():
        pairs.sort(key=lambda pair: pair[1])
        parts = -(-len(pairs) // CHUNK_TRIALS)
        work += [tuple(pairs[i * len(pairs) // parts : (i + 1) * len(pairs) // parts]) for i in range(parts)]
    return work


def execute(workload: Workload, work: Sequence[Task], deliver: Deliver, scheduler: str, workers: int | None) -> float:
    """Runs every task and hands each finished task's records to `deliver`.

    Returns the seconds from the workers being ready (started, with oppass imported and the
    model and data loaded) to the last delivery: cluster start-up is not counted.
    """
    if scheduler == SERIAL:
        return _execute_serial(workload, work, deliver)
    return _execute_dask(workload, work, deliver, scheduler, workers)


def _execute_serial(workload: Workload, work: Sequence[Task], deliver: Deliver) -> float:
    warm_up(workload)
    started = time.perf_counter()
    for task in work:
        deliver(run_trials(workload, task))
    return time.perf_counter() - started


def _execute_dask(
    workload: Workload, work: Sequence[Task], deliver: Deliver, scheduler: str, workers: int | None
) -> float:
    from distributed import as_completed

    with _dask_client(scheduler, workers) as client:
        try:
            client.run(_ignore_interrupts)
            client.run(warm_up, workload)
            started = time.perf_counter()
            futures = [client.submit(run_trials, workload, task, pure=False) for task in work]
            for future in as_completed(futures):
                deliver(future.result())
                future.release()
            return time.perf_counter() - started
        except KeyboardInterrupt:
            # Closing the client and cluster logs every cancelled task and closed worker, here and on the workers.
            _silence_dask()
            with contextlib.suppress(Exception):
                client.run(_silence_dask)
            raise


def _ignore_interrupts() -> None:
    """Run on every worker: Ctrl-C reaches the whole process group, but only the client must stop (and stop
    the workers); a worker started by another process keeps its own handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _silence_dask() -> None:
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def _dask_client(scheduler: str, workers: int | None) -> Iterator[Client]:
    """A client of an embedded LocalCluster (one single-threaded worker process per core) or of `scheduler`."""
    import dask  # imported here: serial campaigns never start Dask
    from distributed import Client, LocalCluster

    if scheduler == LOCAL:
        n_workers = workers or os.cpu_count() or 1
        # Dask's profiler samples every worker's stacks every 10 ms, taking CPU time from the trials. Tasks are
        # few, small and known up front, so each worker may hold its next one instead of idling a round trip.
        settings = {"distributed.worker.profile.enabled": False,
                    "distributed.scheduler.worker-saturation": float("inf")}
        with dask.config.set(settings), _interrupts_ignored():  # the workers inherit SIG_IGN for SIGINT
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        with cluster, Client(cluster) as client:
            client.wait_for_workers(n_workers)
            yield client
    elif "://" in scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError) as error:
            raise OppassError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_SECONDS} s ({error}): "
                              "is `dask scheduler` running there, and the address right?") from None
        with client:
            yield client
    else:
        raise OppassError(f"unknown scheduler {scheduler!r}: use serial, local or an address like tcp://host:8786")


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (in the main thread: elsewhere signal handlers cannot change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
