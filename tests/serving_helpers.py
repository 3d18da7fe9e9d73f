"""Helpers for the serving tests and benchmark: a model bundle, photos, and a real `serve`."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from local_servers import free_port, wait_for_200
from photos import encode
from PIL import Image
from species_classifier.bundle import load_members, read_description
from species_classifier.demo_data import DEMO_CLASSES, make_random_bundle
from species_classifier.imaging import decode_photo, normalize

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "container" / "serve"
CLASSES = list(DEMO_CLASSES)


def make_bundle(model_dir: Path, img_size: int = 64, members: int = 3) -> Path:
    """A bundle like training writes: random weights (a different seed per member), with
    batch-norm statistics that let different photos get different answers."""
    make_random_bundle(model_dir, img_size, members)
    calibrate_batch_norm(model_dir)
    return model_dir


def photo(seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG") -> bytes:
    """A noisy photo with a coloured block: different seeds give clearly different answers."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2, : size[0] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def serve_env(base: Path, port: int, **extra: str) -> dict:
    """The environment of `serve` outside the image: this venv's python first on PATH."""
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", **extra}
    env["SAGEMAKER_BIND_TO_PORT"] = str(port)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class ServerProcess:
    """container/serve in a subprocess, its output in a file (a pipe could fill and block).

    As a context manager: ready on entering (wait_ready), terminated on leaving."""

    def __init__(self, base: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log_file = log_path.open("w")
        self.process = subprocess.Popen(
            [str(SERVE)],
            env=serve_env(base, self.port, **env),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        # The server's log as it stood when the first /ping answered 200.
        self.log_at_first_200: str | None = None

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.terminate()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        """Poll /ping until 200, then keep the log as it stood that moment in log_at_first_200."""
        wait_for_200(f"{self.url}/ping", timeout, self.process, self.log_path)
        self.log_at_first_200 = self.log()

    def terminate(self, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log_file.close()


def run_serve(base: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """`serve` to completion: for start-ups that must fail."""
    return subprocess.run(
        [str(SERVE)],
        env=serve_env(base, free_port(), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def calibrate_batch_norm(model_dir) -> None:
    """Make the random members tell photos apart.

    A freshly initialised efficientnet_b1 shrinks its activations block after block (its
    depthwise convolutions' init is scaled for many more inputs than they have) until the
    features are ~1e-14: every photo gets the same answer, and a check that each request got
    its own photo's answer back would pass even if a batch handed answers to the wrong
    requests. Setting the BatchNorm statistics from one batch of photos like the ones sent
    (other seeds) restores unit-scale activations, so answers differ from photo to photo
    while batch-size float noise stays ~1e-8; the weights stay random.
    """
    description = read_description(model_dir)
    size = description.img_size
    pixels = np.stack([decode_photo(photo(seed), size) for seed in range(1000, 1032)])
    batch = normalize(torch.from_numpy(pixels), description.mean, description.std)
    threads = torch.get_num_threads()
    # One thread: on a loaded 2-core machine spinning OpenMP threads make this take seconds.
    torch.set_num_threads(1)
    try:
        for member, network in zip(
            description.members, load_members(model_dir, description), strict=True
        ):
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                    module.momentum = None  # a plain average over the calibration batch
            network.train()
            with torch.no_grad():
                network(batch)
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    # A channel nearly constant over the batch would divide by ~sqrt(eps)
                    # and amplify float noise block after block, until a photo's answer
                    # depended on the batch's kernels; the floor keeps that below 1e-7.
                    module.running_var.clamp_(min=1e-3)
            torch.save(network.state_dict(), model_dir / member.weights_file)
    finally:
        torch.set_num_threads(threads)
