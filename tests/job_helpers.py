"""Real training jobs for the tests: a folder laid out like /opt/ml with generated photos,
the real `container/train` run against it (in a subprocess, as SageMaker starts it), and its
results compared run against run. Imported by the test modules that train; conftest.py builds
the `job` fixture from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from species_classifier.demo_data import DEMO_TARGETS, make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "container" / "train"

# Small and fast on a 2-core CPU; individual tests override what they exercise.
FAST_HYPERPARAMETERS = {
    "target_species": ",".join(DEMO_TARGETS),
    "k_folds": "3",
    "num_epochs": "2",
    "img_size": "48",
    "batch_size": "8",
    "pretrained": "false",
}


def write_hyperparameters(base: Path, hyperparameters: dict) -> None:
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))


def update_hyperparameters(base: Path, **changes: str) -> None:
    path = base / "input" / "config" / "hyperparameters.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def make_job(
    base: Path, hyperparameters: dict | None = None, photos_per_species: int = 6, **demo
) -> Path:
    """An /opt/ml-like tree: generated photos in the training channel, string hyperparameters."""
    make_demo_dataset(
        base / "input" / "data" / "training", photos_per_species, photo_size=160, **demo
    )
    write_hyperparameters(base, {**FAST_HYPERPARAMETERS, **(hyperparameters or {})})
    return base


def pristine_job(hyperparameters: dict, photos_per_species: int, **demo):
    """A module-scoped fixture `pristine`: a job (make_job) made once per module, for its
    tests to copy (copy_job) and run."""

    @pytest.fixture(scope="module", name="pristine")
    def pristine(tmp_path_factory) -> Path:
        folder = tmp_path_factory.mktemp("pristine") / "opt_ml"
        return make_job(folder, hyperparameters, photos_per_species, **demo)

    return pristine


def copy_job(source: Path, destination: Path) -> Path:
    """A copy of a prepared job folder, so runs of the same job can be compared."""
    shutil.copytree(source, destination)
    return destination


def train_env(base: Path, **extra: str) -> dict:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_train(base: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """The real container/train in a subprocess, as SageMaker would start it."""
    return subprocess.run(
        [str(TRAIN)], env=train_env(base, **env), capture_output=True, text=True, timeout=timeout
    )


def start_train(base: Path, command: list[str] | None = None, **env: str) -> subprocess.Popen:
    """`train` (or `command`) started against `base`: its output, both streams, as text lines."""
    return subprocess.Popen(
        command or [str(TRAIN)],
        env=train_env(base, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def failure_text(base: Path) -> str:
    return (base / "output" / "failure").read_text()


TIMING_FIELDS = ("seconds", "img_per_s")


def comparable_metrics(base: Path) -> dict:
    """A finished job's metrics.json without the timings, which differ from run to run."""
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    for fold in metrics["folds"]:
        for record in fold["history"]:
            for name in TIMING_FIELDS:
                record.pop(name)
    return metrics


def assert_same_results(base: Path, reference: Path) -> None:
    """Two finished jobs: the same metrics (timings aside) and bit-identical weights."""
    assert comparable_metrics(base) == comparable_metrics(reference)
    assert same_weights(model_weights(base), model_weights(reference))


def model_weights(base: Path) -> dict[str, dict]:
    """Every weights file of a finished job's model bundle, by file name."""
    import torch  # here, not at the top: only once OMP_WAIT_POLICY is set

    return {p.name: torch.load(p, weights_only=True) for p in sorted((base / "model").glob("*.pt"))}


def same_weights(a: dict, b: dict) -> bool:
    """Bit for bit: the same files, the same tensors."""
    import torch  # here, not at the top: only once OMP_WAIT_POLICY is set

    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a
    )
