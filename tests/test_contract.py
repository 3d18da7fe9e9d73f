"""The contract (species_classifier.contract) and the tools that run on a laptop import without
torch and numpy: a laptop that has neither must be able to launch, check and collect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs first in the child: any import of torch or numpy (or a submodule) fails, as on a laptop.
BLOCKER = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numpy"):
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by the test)")
        return None

sys.meta_path.insert(0, Absent())
"""

MODULES = [
    "species_classifier.contract",
    "species_classifier.contract.channel",
    "species_classifier.contract.hyperparameters",
    "species_classifier.contract.metric_lines",
    "species_classifier.contract.paths",
    "species_classifier.contract.preflight",
    "species_classifier.contract.serving",
    "species_tools.launcher.cli",
    "species_tools.collector.cli",
]


def run_without_torch_and_numpy(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = [str(tmp_path), str(REPO / "container" / "code"), str(REPO / "tools")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_tools_and_the_contract_import_without_torch_and_numpy(tmp_path):
    imports = "; ".join(f"import {module}" for module in MODULES)
    check = "import sys; assert not {'torch', 'numpy'} & set(sys.modules)"
    done = run_without_torch_and_numpy(tmp_path, f"{imports}; {check}; print('ok')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_blocker_blocks(tmp_path):
    # Otherwise the test above would pass on any machine, torch or not.
    done = run_without_torch_and_numpy(tmp_path, "import numpy")
    assert done.returncode != 0
    assert "made unimportable by the test" in done.stderr
