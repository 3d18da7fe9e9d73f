"""The one home of what several test modules share: a folder laid out like /opt/ml, the
real `train` run against it and its results compared, a local AWS (moto), and the summary
lines that tests report (fault injection, soak, distributed) printed at the end of the run,
where CI's log shows them even when every test passes. Free ports and waiting for a
server's 200 live in local_servers.py, which the serving benchmark imports too.

Every process a test starts, and this one, lets idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE): on a loaded machine, threads that spin waiting for work take
the cores from the ones that have it, and a 15 s training run took 480 s.
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

# Before any test module imports torch: OpenMP reads the policy once, when it starts. Nothing
# above imports torch, and every process the tests start inherits the variable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


@pytest.fixture
def job(tmp_path: Path):
    """Factory: job(hyperparameters=..., photos_per_species=...) -> base folder."""

    def factory(hyperparameters: dict | None = None, **kwargs) -> Path:
        return make_job(tmp_path / "opt_ml", hyperparameters, **kwargs)

    return factory


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A local AWS for one launcher test module (launcher_helpers.local_aws)."""
    from launcher_helpers import local_aws  # moto is slow to import: only where it is used

    with local_aws(tmp_path_factory.mktemp("home")) as local:
        yield local


@pytest.fixture
def run(aws, capsys):
    """run(*argv, environ=, wire=, clock=) -> (exit code, stdout, stderr): the launcher in process."""
    from launcher_helpers import runner

    return runner(capsys)


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
