"""Training survives being killed anywhere and ends exactly where an uninterrupted run ends.

A reference job runs once without interruption. Then the same job is killed again and
again (SIGKILL at random moments, SIGKILL in the middle of checkpoint writes, SIGTERM) and
restarted each time, as a spot interruption would; every chain must finish with the same
metrics and bit-for-bit the same weights as the reference. The summary line goes to CI's log.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from job_helpers import (
    assert_same_results,
    copy_job,
    failure_text,
    pristine_job,
    run_train,
    start_train,
)
from species_classifier.atomic import PARTIAL_PREFIX
from species_classifier.contract.paths import JobPaths
from species_classifier.train import scratch_dir

HYPERPARAMETERS = {
    "k_folds": "2",
    "num_epochs": "3",
    "img_size": "32",
    "batch_size": "8",
    "epoch_patience": "3",
}
FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")
pytestmark = pytest.mark.slow  # every test trains whole jobs, several times


pristine = pristine_job(HYPERPARAMETERS, photos_per_species=5)


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory) -> Path:
    base = copy_job(pristine, tmp_path_factory.mktemp("reference") / "opt_ml")
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base


def wait_for_line(process: subprocess.Popen, needle: str) -> list[str]:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


def finish(base: Path) -> None:
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr


def test_random_sigkills_then_resume_give_identical_results(pristine, reference, tmp_path, summary):
    rng = random.Random(20261127)
    base = copy_job(pristine, tmp_path / "opt_ml")
    kills, completed = 0, False
    while not completed:
        process = start_train(base)
        # After this process's first checkpointed epoch (so every restart makes progress),
        # at a random moment: mid-epoch, mid-write, between folds, or during evaluation.
        trained = any(" epoch=" in line for line in process.stdout)
        time.sleep(rng.uniform(0.0, 1.0))
        if trained and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate()
        completed = process.returncode == 0
        assert completed or process.returncode == -signal.SIGKILL
    assert_same_results(base, reference)
    summary(
        f"fault injection: {kills} SIGKILLs at random moments survived; results identical "
        "to the uninterrupted run"
    )
    assert kills >= 3


@pytest.mark.parametrize("write_number", [1, 3, 4, 6])
def test_sigkill_in_the_middle_of_a_checkpoint_write(
    pristine, reference, tmp_path, write_number, summary
):
    """Writes: 1 the photo store's slots and 2 its layout (in /tmp), 3 job.json, 4.. epoch
    checkpoints and finished folds."""
    base = copy_job(pristine, tmp_path / "opt_ml")
    process = start_train(
        base, [sys.executable, str(FAULT_RUNNER)], KILL_ON_WRITE=str(write_number)
    )
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, output
    written = scratch_dir(JobPaths(base)) if write_number == 1 else base / "checkpoints"
    assert list(written.glob(f"{PARTIAL_PREFIX}*")), "the kill did not land mid-write"
    finish(base)
    assert_same_results(base, reference)
    summary(
        f"fault injection: SIGKILL during atomic write #{write_number} survived; results identical"
    )


def test_sigterm_stops_within_seconds_and_the_restart_continues(
    pristine, reference, tmp_path, summary
):
    base = copy_job(pristine, tmp_path / "opt_ml")
    process = start_train(base)
    wait_for_line(process, "fold=1 epoch=1 ")
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, output
    assert stopped_in < 10
    failure = failure_text(base)
    assert failure.startswith("Stopped by SIGTERM"), failure
    assert "continues from there" in failure
    assert (base / "checkpoints" / "fold-1-progress.pt").is_file()
    finish(base)
    assert_same_results(base, reference)
    summary(
        f"fault injection: SIGTERM honoured in {stopped_in:.1f} s (SageMaker allows 120 s); "
        "resumed with identical results"
    )
