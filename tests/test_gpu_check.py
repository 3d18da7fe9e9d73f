"""`make gpu-check` proven on a CPU before any GPU is lent: its wheel folder and its dry run.

The wheel folder is downloaded from the package index (as `make gpu-wheels` does), installed
the way the check installs it on a machine with no index, and imported by an interpreter
that sees nothing but the folder, the standard library and the few packages the GPU
machine's image is known to hold. The dry run then runs every stage of the check on the
CPU with tiny sizes, with that folder installed, and must write what a GPU run writes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import REPO

pytestmark = pytest.mark.slow


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    return load_check()


@pytest.fixture(scope="module")
def wheels(check, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("whl")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--prepare-wheels", str(folder)],
        check=True,
        timeout=600,
    )
    return folder


def test_the_wheel_folder_is_all_a_gpu_machine_needs_besides_its_own_packages(
    check, wheels, tmp_path
):
    names = sorted(p.name for p in wheels.iterdir())
    projects = [re.split(r"-\d", name)[0].lower().replace("_", "-") for name in names]
    assert sorted(projects) == sorted(check.GPU_MACHINE_LACKS), names  # one version of each
    assert all(n.endswith(("-py3-none-any.whl", ".tar.gz")) or "cp312" in n for n in names)
    site = tmp_path / "site"
    check.install_wheels(wheels, site)
    machine = tmp_path / "machine"  # stands in for the GPU image's site-packages
    machine.mkdir()
    for name in check.GPU_MACHINE_HAS:
        origin = Path(importlib.util.find_spec(name).origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (machine / source.name).symlink_to(source)
    imports = "flask, gunicorn.app.base, gunicorn.workers.gthread, sagemaker_training.environment"
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path[:0] = [{str(site)!r}, {str(machine)!r}]; import {imports}; "
            "print(sagemaker_training.environment.__file__, flask.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(str(site)) == 2, result.stdout


def test_the_dry_run_runs_every_stage_and_writes_what_a_gpu_run_writes(wheels, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--wheels",
            str(wheels),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert result.returncode == 0, result.stdout + log[-5000:]
    summary = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    rows = dict(re.findall(r"^\| ([a-z-]+) \| ([a-z ]+) \|", summary, re.MULTILINE))
    assert rows.pop("stage") == "result"  # the header
    assert rows == {
        "gpu-tests": "passed",
        "multi-gpu": "skipped",
        "training": "passed",
        "job": "passed",
        "stores": "passed",
        "serving": "passed",
    }, summary
    assert "needs a CUDA GPU: torch sees none" in summary
    assert "NCCL needs two or more" in summary
    assert re.search(
        r"our training loop, `compile=true` compiled \(eager\): [\d.,]+ img/s", summary
    )
    assert re.search(r"projected 20000 photos, 2 x 20: \d+", summary)
    assert re.search(r"jpeg epochs at \d+% of uint8 \([\d.]+ vs [\d.]+ images/s\)", summary)
    assert re.search(r"c=2: ours [\d.]+ req/s", summary)
    assert "wheels: 9 wheels and 1 source package(s)" in summary
    # What the device tool brings back: at most 8 plain files, names it accepts.
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "check.log",
        "job.md",
        "serving.md",
        "stores.md",
        "summary.md",
        "training.md",
    ], files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
