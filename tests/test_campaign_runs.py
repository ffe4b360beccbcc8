"""End-to-end campaign tests on the bundled digits CNN: replay, schedulers, kill -9 and resume, exports."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from oppass.campaign import CampaignConfig, run_campaign, worker
from oppass.campaign import cli as campaign_cli
from oppass.campaign.config import Condition
from oppass.campaign.metrics import NO_FAULT
from oppass.campaign.runner import make_plan
from oppass.campaign.store import STORE_FILE, Store
from oppass.errors import OppassError

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx"
TIMING_FIELDS = ("inference_seconds_mean", "inject_seconds_mean")


def small_config(out: Path, **changes: object) -> CampaignConfig:
    settings = dict(model=DIGITS_MODEL, data="digits", out=out, formats=("fp32",), protections=("none", "64"),
                    ber_min=1e-4, ber_max=1e-2, points_per_decade=1, experiments=3, batch_size=100,
                    metric="top1", scheduler="serial", seed=11)
    return CampaignConfig(**{**settings, **changes})


def results(summaries: list) -> list[dict]:
    """Summaries without the timing columns, which legitimately differ between runs."""
    return [{k: v for k, v in dataclasses.asdict(s).items() if k not in TIMING_FIELDS} for s in summaries]


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def test_campaign_sees_faults_and_op_masks_them(tmp_path: Path) -> None:
    result = run_campaign(small_config(tmp_path, ber_min=1e-3, ber_max=1e-2, experiments=4, ecc=True))
    by_key = {s.condition_key: s for s in result.summaries}
    plain, protected = by_key["ber/fp32/none/ber=0.01"], by_key["ber/fp32/64/ber=0.01"]
    assert plain.flips_mean > 0 and plain.masked_words_mean == 0
    assert plain.accuracy_mean < plain.fault_free_accuracy  # unprotected fp32 collapses at 1 % BER
    assert protected.masked_words_mean > 0
    assert by_key["ber/fp32/ecc/ber=0.001"].masked_words_mean > 0  # double errors detected
    assert result.trials_run == 3 * 2 * 4


def test_a_trial_replays_alone_in_a_fresh_process_cache(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    run_campaign(config)
    store = Store(tmp_path, make_plan(config).identity)
    stored = {(r.condition_key, r.trial): r for r in store.trials()}
    store.close()
    condition = Condition("ber", "fp32", "none", 1e-2)
    worker._CACHES.clear()
    (replayed,) = worker.run_trials(make_plan(config).workload, ((condition, 2),))
    original = stored[(condition.key, 2)]
    assert replayed.flips > 0
    assert dataclasses.replace(replayed, inject_seconds=0, inference_seconds=0) == \
        dataclasses.replace(original, inject_seconds=0, inference_seconds=0)


def test_a_trial_without_flips_reuses_the_fault_free_output(tmp_path: Path) -> None:
    result = run_campaign(small_config(tmp_path, ber_min=1e-9, ber_max=1e-9, ecc=True))
    store = Store(tmp_path, make_plan(small_config(tmp_path, ber_min=1e-9, ber_max=1e-9, ecc=True)).identity)
    trials = store.trials()
    store.close()
    assert trials and all(t.flips == 0 and t.inference_seconds == 0 and t.outcome == NO_FAULT for t in trials)
    assert all(t.correct == t.fault_free_correct and t.masked_words == 0 for t in trials)
    assert all(s.zero_loss for s in result.summaries)


@pytest.mark.slow
def test_local_cluster_with_one_or_two_workers_matches_serial(tmp_path: Path) -> None:
    serial = run_campaign(small_config(tmp_path / "serial"))
    one = run_campaign(small_config(tmp_path / "one", scheduler="local", workers=1))
    two = run_campaign(small_config(tmp_path / "two", scheduler="local", workers=2))
    assert results(one.summaries) == results(serial.summaries)
    assert results(two.summaries) == results(serial.summaries)


def test_rerun_resumes_without_running_anything(tmp_path: Path) -> None:
    first = run_campaign(small_config(tmp_path))
    second = run_campaign(small_config(tmp_path))
    assert second.trials_run == 0
    assert results(second.summaries) == results(first.summaries)


def test_a_campaign_with_other_results_in_same_folder_is_refused(tmp_path: Path) -> None:
    run_campaign(small_config(tmp_path))
    with pytest.raises(OppassError, match="metric, seed differ"):
        run_campaign(small_config(tmp_path, seed=12, metric="golden"))


KILLED_CAMPAIGN = """
import sys
from pathlib import Path
from oppass.campaign import CampaignConfig, run_campaign
run_campaign(CampaignConfig(model=Path(sys.argv[1]), data="digits", out=Path(sys.argv[2]), formats=("fp32", "int8"),
    protections=("none", "weight", "64"), ber_min=1e-5, ber_max=1e-2, points_per_decade=9, experiments=3,
    batch_size=50, metric="top1", scheduler="serial", seed=5))
"""


@pytest.mark.slow
def test_campaign_killed_several_times_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL at three random points, resuming in between: no trial lost, none counted twice."""
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-c", KILLED_CAMPAIGN, str(DIGITS_MODEL)]
    total = 2 * 3 * 28 * 3
    rng = np.random.default_rng(0)
    for kill in range(3):
        before = _row_count(killed_dir / STORE_FILE) if killed_dir.exists() else 0
        process = subprocess.Popen([*command, str(killed_dir)])
        _wait_for_rows(killed_dir / STORE_FILE, before + int(rng.integers(5, 60)), process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        after = _row_count(killed_dir / STORE_FILE)
        assert before < after < total, f"kill {kill} did not land mid-run ({before} -> {after} of {total})"
    subprocess.run([*command, str(killed_dir)], check=True)
    subprocess.run([*command, str(clean_dir)], check=True)
    assert _row_count(killed_dir / STORE_FILE) == total
    assert (killed_dir / "table2.csv").read_text() == (clean_dir / "table2.csv").read_text()
    assert _summary_without_timing(killed_dir) == _summary_without_timing(clean_dir)


@pytest.mark.slow
def test_a_dask_worker_killed_mid_run_loses_and_duplicates_no_trial(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    settings = dict(points_per_decade=9, experiments=10)
    total = 2 * 19 * 10  # protections x BERs (1e-4 .. 1e-2 at 1..9 x 10^k) x experiments
    finished: list = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        config = small_config(tmp_path / "dask", scheduler=cluster.scheduler_address, **settings)
        campaign = threading.Thread(target=lambda: finished.append(run_campaign(config)))
        campaign.start()
        store = tmp_path / "dask" / STORE_FILE
        deadline = time.monotonic() + 120
        while (not store.exists() or _row_count(store) < 40) and time.monotonic() < deadline:
            time.sleep(0.01)
        stored_at_kill = _row_count(store)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        campaign.join(timeout=300)
    assert 40 <= stored_at_kill < total, "the worker was not killed mid-run"
    assert finished, "the campaign did not finish after losing a worker"
    serial = run_campaign(small_config(tmp_path / "serial", **settings))
    assert _row_count(tmp_path / "dask" / STORE_FILE) == total
    assert results(finished[0].summaries) == results(serial.summaries)


def test_command_line_parses_into_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    campaign_cli.add_arguments(parser.add_subparsers().add_parser("campaign"))
    args = parser.parse_args(["campaign", str(DIGITS_MODEL), "--data", "digits", "--out", str(tmp_path),
                              "--formats", "fp32,int8", "--op", "none,weight", "--ber", "1e-6:1e-3",
                              "--scheduler", "serial", "--ecc"])
    config = campaign_cli.config_from_args(args)
    assert (config.formats, config.protections, config.ber_min, config.ber_max) == (("fp32", "int8"),
                                                                                     ("none", "weight"), 1e-6, 1e-3)
    assert config.ecc and config.experiments == 20 and config.metric is None
    with pytest.raises(OppassError, match="--ber"):
        campaign_cli.config_from_args(parser.parse_args(["campaign", "m", "--data", "d", "--out", "o",
                                                         "--ber", "1e-3"]))


def test_exports_and_studies_are_written(tmp_path: Path) -> None:
    config = small_config(tmp_path, formats=("int8",), protections=("none", "weight"), bit_positions=True,
                          batch_study=True, experiments=2, ber_min=1e-2, ber_max=1e-1)
    result = run_campaign(config)
    names = {path.name for path in result.files}
    assert {"trials.csv", "trials.json", "summary.csv", "summary.json", "table2.csv", "table2.md", "report.html",
            "berzad_bits.csv", "batch_study.csv", "fig6_accuracy_vs_ber_int8.svg", "fig5_berzad_vs_bit.png",
            "fig4_accuracy_vs_batch_size.png"} <= names
    assert len([row for row in result.berzad if row.study == "bit"]) == 8
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_top5_falls_back_when_there_are_no_labels(tmp_path: Path) -> None:
    data = tmp_path / "unlabeled.npz"
    np.savez(data, inputs=np.load(REPO_ROOT / "oppass" / "examples" / "digits_test.npz")["inputs"][:60])
    plan = make_plan(small_config(tmp_path / "out", data=str(data), metric="top5"))
    assert plan.workload.metric.name == "golden" and plan.workload.batch_size == 60
    assert len(plan.notes) == 2


def _row_count(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        count = _row_count(path) if path.exists() else 0
        if count >= rows:
            return count
        time.sleep(0.01)
    raise AssertionError("the campaign stored no trials in time")


def _summary_without_timing(directory: Path) -> list[list[str]]:
    lines = [line.split(",") for line in (directory / "summary.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name not in TIMING_FIELDS]
    return [[line[i] for i in keep] for line in lines]


def test_a_process_over_its_session_budget_holds_one_variant_and_runs_the_same_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config(tmp_path / "kept", formats=("fp32", "bf16"), protections=("none", "64", "secded:64"))
    worker._CACHES.clear()
    kept = run_campaign(config, log=None)
    assert max(len(cache.sessions) for cache in worker._CACHES.values()) == 6
    monkeypatch.setattr(worker, "SESSION_CACHE_BYTES", 0)
    worker._CACHES.clear()
    dropped = run_campaign(dataclasses.replace(config, out=tmp_path / "dropped"), log=None)
    assert [len(cache.sessions) for cache in worker._CACHES.values()] == [1]
    assert results(dropped.summaries) == results(kept.summaries) and dropped.trials_run == kept.trials_run > 0
