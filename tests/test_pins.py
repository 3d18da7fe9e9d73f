"""What the image is built from agrees with itself: torch pinned once, the base image of the
same torch, the weights file the code expects."""

from __future__ import annotations

import re
from pathlib import Path

from species_classifier.model import PRETRAINED_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
TORCH_PINS = REPO / "requirements-torch.txt"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in TORCH_PINS.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_torch_is_pinned_in_one_file_that_the_venv_and_the_image_install():
    assert set(pins()) == {"torch", "torchvision"}
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    for name, text in {"Dockerfile": dockerfile, "Makefile": makefile}.items():
        assert not re.search(r"\btorch(vision)?==", text), f"a second torch pin in the {name}"
    assert "-r requirements-torch.txt" in makefile
    assert "RUN python3 -m pip install --no-cache-dir -r /tmp/requirements-torch.txt" in dockerfile
    assert "requirements-torch.txt" in (REPO / ".dockerignore").read_text()


def test_the_default_base_image_carries_the_pinned_torch():
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    torch_version = re.escape(pins()["torch"])
    assert re.search(rf"^ARG BASE_IMAGE=\S+:{torch_version}-cuda", dockerfile, re.M)


def test_the_image_bakes_the_weights_file_the_code_loads():
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    assert f"ARG WEIGHTS_URL={PRETRAINED_WEIGHTS.url}\n" in dockerfile
