"""Folds across workers and hosts (gloo on CPU) give exactly the single-worker results.

Every run here pins one CPU thread per process: CPU kernels may sum in another order with
another thread count, and the comparison is bit for bit.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from job_helpers import (
    assert_same_results,
    comparable_metrics,
    copy_job,
    failure_text,
    pristine_job,
    run_train,
    start_train,
    update_hyperparameters,
)
from local_servers import free_port
from species_classifier.bundle import load_members, read_description
from species_classifier.distributed import (
    LOOPBACK_ADDRESS,
    Topology,
    rendezvous_address,
    wait_for_hosts,
)

HYPERPARAMETERS = {"k_folds": "3", "num_epochs": "2", "img_size": "32", "batch_size": "8"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # every test trains whole jobs, several times


def host_config(base: Path, current: str, hosts: list[str]) -> None:
    config = {"current_host": current, "hosts": hosts, "network_interface_name": "lo"}
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(config))


pristine = pristine_job(HYPERPARAMETERS, photos_per_species=4)


@pytest.fixture(scope="module")
def single_worker(pristine, tmp_path_factory) -> Path:
    base = copy_job(pristine, tmp_path_factory.mktemp("single") / "opt_ml")
    result = run_train(base, **ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    return base


def test_two_workers_on_one_host_match_one_worker(pristine, single_worker, tmp_path, summary):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, workers_per_host="2")
    result = run_train(base, MASTER_PORT=str(free_port()), **ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank 0] " in result.stdout and "[rank 1] " in result.stdout
    assert "fold(s) [1, 3] of 3" in result.stdout and "fold(s) [2] of 3" in result.stdout
    assert_same_results(base, single_worker)
    summary("distributed: 2 workers on 1 host, per-fold results identical to 1 worker")


def test_two_hosts_match_one_worker_and_only_the_leader_writes(
    pristine, single_worker, tmp_path, summary
):
    hosts = ["127.0.0.1", "localhost"]  # sorted: 127.0.0.1 leads
    bases = [copy_job(pristine, tmp_path / host / "opt_ml") for host in hosts]
    port = str(free_port())
    processes = []
    for host, base in zip(hosts, bases, strict=True):
        host_config(base, host, list(reversed(hosts)))
        processes.append(start_train(base, MASTER_PORT=port, **ONE_THREAD))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    leader, follower = bases
    assert_same_results(leader, single_worker)
    assert not (follower / "model" / "model.json").exists()
    assert not (follower / "output" / "data" / "metrics.json").exists()
    assert not (follower / "output" / "failure").exists()
    summary(
        "distributed: 2 hosts x 1 worker, per-fold results identical to 1 worker; "
        "only the leader wrote model/ and output/"
    )


def test_a_dead_worker_fails_the_job_with_its_reason(pristine, tmp_path):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, workers_per_host="2", num_epochs="50", epoch_patience="50")
    launcher = start_train(base, MASTER_PORT=str(free_port()), **ONE_THREAD)
    for line in launcher.stdout:
        if "[rank 1] " in line and "fold=2 epoch=1 " in line:
            break
    workers = [
        child
        for child in psutil.Process(launcher.pid).children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    ]
    assert len(workers) == 2, workers
    victim = max(workers, key=lambda child: child.create_time())
    victim.send_signal(signal.SIGKILL)
    started = time.monotonic()
    launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert time.monotonic() - started < 60
    reason = failure_text(base).splitlines()[0]
    assert re.match(r"worker rank [01] failed: Signal 9 \(SIGKILL\)", reason), reason
    assert not (base / "model" / "model.json").exists()


def test_refit_trains_one_model_on_all_photos_across_workers(pristine, tmp_path):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, workers_per_host="2", final_model="refit")
    result = run_train(base, MASTER_PORT=str(free_port()), **ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    best_epochs = sorted(f["best_epoch"] for f in metrics["folds"])
    assert metrics["final_model"]["strategy"] == "refit"
    assert metrics["final_model"]["epochs"] == best_epochs[1]  # the median of three folds
    assert len(metrics["final_model"]["train_loss"]) == metrics["final_model"]["epochs"]
    description = read_description(base / "model")
    assert [m.name for m in description.members] == ["refit"]
    assert sorted(p.name for p in (base / "model").iterdir()) == [
        "model.json",
        "model.onnx",
        "refit.pt",
    ]
    assert len(load_members(base / "model", description)) == 1
    assert "refit epoch=1/" in result.stdout
    assert (
        "Served model: one model refit on all photos"
        in (base / "output" / "data" / "report.md").read_text()
    )


def test_one_host_with_a_name_that_never_resolves_meets_on_loopback(
    pristine, single_worker, tmp_path, summary
):
    """SageMaker's resourceconfig.json for one instance: its name and interface need not exist."""
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, workers_per_host="2")
    config = {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "ethwe"}
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(config))
    with pytest.raises(socket.gaierror):
        socket.gethostbyname("algo-1")
    started = time.monotonic()
    result = run_train(base, MASTER_PORT=str(free_port()), **ONE_THREAD)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rendezvous at {LOOPBACK_ADDRESS}:" in result.stdout
    assert "waiting for host" not in result.stdout
    assert comparable_metrics(base) == comparable_metrics(single_worker)
    summary(
        f"distributed: 1 host named algo-1 (unresolvable), 2 workers: met on loopback, "
        f"finished in {seconds:.0f} s with the single worker's results"
    )


def test_only_a_multi_host_job_rendezvous_at_the_leader():
    one = Topology(hosts=("algo-1",), current_host="algo-1", workers_per_host=8)
    two = Topology(hosts=("algo-1", "algo-2"), current_host="algo-2", workers_per_host=8)
    assert rendezvous_address(one) == LOOPBACK_ADDRESS
    assert rendezvous_address(two) == "algo-1"


def test_waiting_for_hosts_says_what_it_waits_for_at_once_and_then_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="species_classifier.distributed")
    started = time.time()
    with pytest.raises(RuntimeError, match=r"host algo-2\.invalid did not resolve within 1 s"):
        wait_for_hosts(("localhost", "algo-2.invalid"), timeout_s=1.0, log_every_s=0.3, poll_s=0.05)
    waits = [r for r in caplog.records if "waiting for host algo-2.invalid" in r.getMessage()]
    assert waits and waits[0].created - started < 0.2, "the first line must come at once"
    gaps = [b.created - a.created for a, b in itertools.pairwise(waits)]
    assert len(waits) >= 3 and all(0.25 <= gap < 0.6 for gap in gaps), gaps
    assert not any("localhost" in r.getMessage() for r in caplog.records)
