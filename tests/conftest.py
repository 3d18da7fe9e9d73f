"""Shared fixtures: a folder laid out like /opt/ml, the real `train` run against it, and the
summary lines that tests report (fault injection, soak, distributed) printed at the end of
the run, where CI's log shows them even when every test passes."""

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


def make_job(
    base: Path, hyperparameters: dict | None = None, photos_per_species: int = 6, **demo
) -> Path:
    """An /opt/ml-like tree: generated photos in the training channel, string hyperparameters."""
    make_demo_dataset(
        base / "input" / "data" / "training", photos_per_species, photo_size=160, **demo
    )
    write_hyperparameters(base, {**FAST_HYPERPARAMETERS, **(hyperparameters or {})})
    return base


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


def failure_text(base: Path) -> str:
    return (base / "output" / "failure").read_text()


@pytest.fixture
def job(tmp_path: Path):
    """Factory: job(hyperparameters=..., photos_per_species=...) -> base folder."""

    def factory(hyperparameters: dict | None = None, **kwargs) -> Path:
        return make_job(tmp_path / "opt_ml", hyperparameters, **kwargs)

    return factory


_SUMMARY = pytest.StashKey[list]()


def pytest_configure(config) -> None:
    config.stash[_SUMMARY] = []


@pytest.fixture
def summary(request):
    """summary("...") records one line for the end-of-run summary."""
    return request.config.stash[_SUMMARY].append


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("proof in numbers")
        for line in lines:
            terminalreporter.write_line(line)
