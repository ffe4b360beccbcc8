"""Starts Dask workers as SLURM jobs (dask-jobqueue) for `oppass campaign --scheduler`, and keeps them up.

    pip install dask-jobqueue==0.9.0
    python tools/slurm_cluster.py --address-file ADDRESS [--jobs 10] [--cores 8] [--memory 32GB]
        [--walltime 12:00:00] [--queue cpu] [--account A] [--prologue "source /path/venv/bin/activate"]
        [--dry-run]

Runs the Dask scheduler in this process (on the login or head node) and submits `--jobs` batch
jobs, each running `--cores` single-threaded worker processes (trials are single-threaded
onnxruntime sessions). The scheduler's address goes to ADDRESS once it listens: give it to
`oppass campaign --scheduler "$(cat ADDRESS)"`. Stop with Ctrl-C or SIGTERM (the jobs are
cancelled). `--dry-run` prints the job script and exits without submitting anything. The
recipe in docs/METHODS.md ("Running on a cluster") uses it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parses the arguments, starts the cluster, writes its address and waits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address-file", type=Path, required=True, help="where to write the scheduler's address")
    parser.add_argument("--jobs", type=int, default=10, help="batch jobs to submit (default: 10)")
    parser.add_argument("--cores", type=int, default=8, help="worker processes per job, one core each (default: 8)")
    parser.add_argument("--memory", default="32GB", help="memory per job (default: 32GB)")
    parser.add_argument("--walltime", default="12:00:00", help="time limit per job (default: 12:00:00)")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--prologue", action="append", default=[],
                        help="shell line run in each job before the workers (repeatable), e.g. a venv activation")
    parser.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    arguments = parser.parse_args(argv)
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        queue=arguments.queue, account=arguments.account, cores=arguments.cores, processes=arguments.cores,
        memory=arguments.memory, walltime=arguments.walltime, job_script_prologue=arguments.prologue,
        scheduler_options={"dashboard_address": None},
    )
    with cluster:
        if arguments.dry_run:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=arguments.jobs)
        arguments.address_file.write_text(cluster.scheduler_address + "\n")
        print(f"scheduler at {cluster.scheduler_address}: {arguments.jobs} jobs of {arguments.cores} workers "
              "submitted; Ctrl-C stops them", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
