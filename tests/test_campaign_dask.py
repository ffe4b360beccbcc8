"""A campaign against a Dask scheduler and workers started as separate processes (`dask scheduler`,
`dask worker`), as on a cluster (issue 13.5): one worker is killed with SIGKILL mid-run, a new one
joins, and the store ends up with every trial exactly once, with the serial campaign's results."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_campaign_runs import results, small_config

from oppass.campaign import run_campaign
from oppass.campaign.store import STORE_FILE

pytest.importorskip("distributed")

DASK = (sys.executable, "-m", "dask")


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library  # exported in $OPPASS_CUSTOM_OP_LIBRARY, which the workers inherit


class DaskProcesses:
    """A `dask scheduler` and its `dask worker`s, each a process of its own on this machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.workers: list[subprocess.Popen] = []
        self.scheduler = self._start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                     "--scheduler-file", str(self.scheduler_file))
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def _start(self, *arguments: str) -> subprocess.Popen:
        log = open(self.folder / f"{arguments[0]}-{len(self.workers)}.log", "w")  # noqa: SIM115
        return subprocess.Popen([*DASK, *arguments], stdout=log, stderr=subprocess.STDOUT)

    def add_worker(self) -> subprocess.Popen:
        """One single-threaded worker process, no nanny: killed, it stays dead."""
        worker = self._start("worker", "--scheduler-file", str(self.scheduler_file), "--nthreads", "1",
                             "--no-nanny", "--no-dashboard", "--name", f"worker-{len(self.workers)}")
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(count, timeout=120)

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.workers, self.scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    folder = tmp_path / "dask"
    folder.mkdir()
    processes = DaskProcesses(folder)
    try:
        yield processes
    finally:
        processes.stop()


def stored_pairs(store: Path) -> list[tuple]:
    if not store.exists():
        return []
    connection = sqlite3.connect(store)
    try:
        return connection.execute("SELECT condition_key, trial FROM trials").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


@pytest.mark.slow
def test_separate_dask_processes_with_a_killed_worker_lose_and_double_no_trial(
    dask_processes: DaskProcesses, tmp_path: Path
) -> None:
    settings = dict(points_per_decade=9, experiments=10)
    total = 2 * 19 * 10  # protections x BERs (1e-4 .. 1e-2 at 1..9 x 10^k) x experiments
    victim = dask_processes.add_worker()
    dask_processes.add_worker()
    dask_processes.wait_for_workers(2)
    config = small_config(tmp_path / "campaign", scheduler=dask_processes.address, **settings)
    finished: list = []
    campaign = threading.Thread(target=lambda: finished.append(run_campaign(config)))
    campaign.start()
    store = tmp_path / "campaign" / STORE_FILE
    deadline = time.monotonic() + 180
    while len(stored_pairs(store)) < 40 and time.monotonic() < deadline and campaign.is_alive():
        time.sleep(0.01)
    stored_at_kill = len(stored_pairs(store))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    dask_processes.add_worker()  # a replacement joins mid-run, not warmed up by the client
    campaign.join(timeout=600)

    assert 40 <= stored_at_kill < total, "the worker was not killed mid-run"
    assert finished, "the campaign did not finish after losing a worker"
    pairs = stored_pairs(store)
    assert len(pairs) == len(set(pairs)) == total  # nothing lost, nothing doubled
    serial = run_campaign(small_config(tmp_path / "serial", **settings))
    assert results(finished[0].summaries) == results(serial.summaries)
