"""The real `train` at a machine's edges: a full checkpoints/ or output/ folder (small tmpfs
mounts, so the disk really is full), a damaged job.json, damaged fold checkpoints, and
cache_device=gpu without a GPU. Each ends in one line that says what to do, and nothing
that was complete is lost."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from job_helpers import failure_text, run_train

pytestmark = pytest.mark.slow

TINY = {"k_folds": "2", "num_epochs": "1"}


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs of the given size on a folder; unmounts it after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True
        )
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_checkpoint_folder_fails_in_one_line_naming_it(job, small_disk):
    base = job(TINY)
    checkpoints = small_disk(base / "spot-checkpoints", "2m")
    config = base / "input" / "config" / "checkpointconfig.json"
    config.write_text(json.dumps({"LocalPath": str(checkpoints)}))
    result = run_train(base)
    assert result.returncode == 1, result.stdout
    first = failure_text(base).splitlines()[0]
    assert first.startswith(f"{checkpoints} is full: writing checkpoint fold-1-progress.pt needed ")
    assert first.endswith("free space there or give the job a larger volume (VolumeSizeInGB)")
    assert "Unexpected error" not in first


def test_a_full_output_folder_keeps_the_model_and_the_job(job, small_disk):
    base = job(TINY)
    small_disk(base / "output" / "data", "64k")
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (base / "output" / "failure").exists()
    assert (base / "model" / "model.json").is_file() and (base / "model" / "fold-2.pt").is_file()
    assert f"report incomplete, model complete in {base / 'model'}: " in result.stdout
    assert f"{base / 'output' / 'data'} is full: writing " in result.stdout


def test_restarts_survive_damaged_checkpoints_and_say_so(job):
    base = job({**TINY, "cache_device": "gpu"})
    first = run_train(base)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cache_device=gpu, but this machine has no GPU" in first.stdout
    settings = json.loads((base / "model" / "model.json").read_text())["training"]["settings"]
    assert settings["cache_device"] == "cpu" and settings["photo_store"] == "uint8"

    checkpoints = base / "checkpoints"
    (checkpoints / "fold-1-done.pt").write_bytes(b"torn by a full disk")
    second = run_train(base)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fold 2: finished in an earlier run" in second.stdout
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["damaged_checkpoints"] == ["fold-1-done.pt"]
    report = (base / "output" / "data" / "report.md").read_text()
    assert "; damaged fold-1-done.pt trained again" in report

    (checkpoints / "job.json").write_bytes(b"\x80garbage")
    third = run_train(base)
    assert third.returncode == 0, third.stdout + third.stderr
    assert (checkpoints / "job.json.damaged").read_bytes() == b"\x80garbage"
    assert "job.json is damaged (UnicodeDecodeError" in third.stdout
