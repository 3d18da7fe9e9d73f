"""The fixtures several test modules share: `job` (a folder laid out like /opt/ml), `aws` and
`run` (a local AWS and the launcher against it), and `summary`, the lines tests report (fault
injection, soak, distributed) printed at the end of the run, where CI's log shows them even
when every test passes. Helpers are imported from their own modules, never from here:
job_helpers.py (real training jobs), launcher_helpers.py, serving_helpers.py, and
local_servers.py (free ports, waiting for a 200, moto), which the serving benchmark imports too.

Every process a test starts, and this one, lets idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE): on a loaded machine, threads that spin waiting for work take
the cores from the ones that have it, and a 15 s training run took 480 s.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from job_helpers import make_job

# Before any test module imports torch: OpenMP reads the policy once, when it starts. Nothing
# above imports torch, and every process the tests start inherits the variable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


@pytest.fixture(scope="module")
def collector_s3(tmp_path_factory):
    """A local S3 holding the open data, for one collector test module
    (collector_helpers.local_open_data); the environment points boto3 at it."""
    from collector_helpers import local_open_data  # moto is slow to import: only where used

    with local_open_data(tmp_path_factory.mktemp("open_data")) as local:
        yield local


@pytest.fixture
def s3_front(collector_s3):
    """collector_s3's front with no special behaviour; whatever a test sets is undone after it."""
    front = collector_s3["front"]
    front.reset()
    yield front
    front.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's in-process forward passes: on a shared 2-core
    machine, spinning OpenMP threads make every forward pass slow."""
    import torch  # here, not at the top: OMP_WAIT_POLICY must be set before torch loads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
