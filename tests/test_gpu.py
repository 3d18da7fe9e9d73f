"""The CUDA path, run for real: `train` and `serve` on a GPU (`pytest -m gpu`).

Each test starts the real container/train or container/serve in a subprocess, as SageMaker
would, on small generated photos (2 folds x 2 epochs). Where torch sees no CUDA device
every test here is skipped with that reason, so CI stays green; `make gpu-check` runs them
on a GPU machine.

Exact resumes need deterministic kernels: cuDNN's fastest backward convolutions sum with
atomics, in an order that changes from run to run. The tests that compare runs bit for bit
start `train` with deterministic_site/ on PYTHONPATH (its sitecustomize turns on
`torch.use_deterministic_algorithms` in `train` and in every worker it spawns) and
CUBLAS_WORKSPACE_CONFIG set; scripts/bench_training.py measures what that costs (its
"deterministic algorithms" row).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests
import torch
from job_helpers import (
    TRAIN,
    assert_same_results,
    comparable_metrics,
    copy_job,
    pristine_job,
    run_train,
    train_env,
    update_hyperparameters,
)
from local_servers import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none"),
]

# Sizes that keep every batch one shape (40 photos of 5 classes: 20 train, 20 validation per
# fold; batch 10, validation batches of 40), so a compiled model compiles once per mode.
HYPERPARAMETERS = {
    "k_folds": "2",
    "num_epochs": "2",
    "epoch_patience": "2",
    "img_size": "64",
    "batch_size": "10",
}
DETERMINISTIC_SITE = Path(__file__).with_name("deterministic_site")


def deterministic_train(base, **env: str) -> subprocess.Popen:
    """`train` (and every worker it spawns) with deterministic kernels: see the folder's
    sitecustomize.py."""
    path = [str(DETERMINISTIC_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.Popen(
        [str(TRAIN)],
        env=train_env(
            base, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=os.pathsep.join(path), **env
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def settings(base) -> dict:
    return json.loads((base / "model" / "model.json").read_text())["training"]["settings"]


def learned(base) -> float:
    return json.loads((base / "output" / "data" / "metrics.json").read_text())["mean_macro_f1"]


# 8 photos of each of 4 targets and of 1 other species: 8 per class.
pristine = pristine_job(
    HYPERPARAMETERS,
    photos_per_species=8,
    species=("Lycorma delicatula", "Zenaida macroura", "Acer rubrum", "Erigeron canadensis")
    + ("Quercus alba",),
)


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    """Cache on the GPU, bf16, deterministic kernels: also the uninterrupted run to resume to."""
    base = copy_job(pristine, tmp_path_factory.mktemp("reference") / "opt_ml")
    update_hyperparameters(base, cache_device="gpu", precision="bf16")
    output = finished(deterministic_train(base))
    assert "in GPU memory" in output, output
    return base


def test_train_with_the_cache_in_gpu_memory_in_bf16(reference, summary):
    chosen = settings(reference)
    assert chosen["precision"] == "bf16"
    assert chosen["device"] == torch.cuda.get_device_name(0)
    assert (reference / "output" / "data" / "report.md").is_file()
    summary(f"gpu: train, cache in GPU memory, bf16: mean macro-F1 {learned(reference):.3f}")


def test_train_with_the_cache_in_pinned_host_memory_in_fp16(pristine, tmp_path, summary):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, cache_device="cpu", precision="fp16")
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "photo store: uint8 in host memory" in result.stdout
    assert settings(base)["precision"] == "fp16"
    losses = [
        r["train_loss"]
        for fold in json.loads((base / "output" / "data" / "metrics.json").read_text())["folds"]
        for r in fold["history"]
    ]
    assert all(0 < loss < 100 for loss in losses), losses  # the scaler kept fp16 finite
    summary(f"gpu: train, cache pinned in host memory, fp16 + scaler: losses {losses}")


def test_sigkill_and_resume_on_the_gpu_gives_the_uninterrupted_results(
    pristine, reference, tmp_path, summary
):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, cache_device="gpu", precision="bf16")
    process = deterministic_train(base)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "fold=1 epoch=1 " in line:
            break
    else:
        raise AssertionError("".join(seen))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    output = finished(deterministic_train(base))
    assert "resuming after epoch" in output or "finished in an earlier run" in output, output
    assert_same_results(base, reference)
    summary("gpu: SIGKILL after fold 1 epoch 1, resumed: metrics and weights bit-identical")


def test_serve_on_the_gpu_answers_as_on_the_cpu(reference, tmp_path, summary):
    from serving_helpers import ServerProcess

    photos = sorted((reference / "input" / "data" / "training" / "images").rglob("*.jpg"))[::4]
    answers = {}
    # float32 on both: bf16 alone can move a probability by 1e-2, the tolerance, and would
    # hide a real difference between the devices.
    for device, env in (
        ("gpu", {"SPECIES_SERVE_DTYPE": "float32"}),
        ("cpu", {"CUDA_VISIBLE_DEVICES": ""}),
    ):
        server = ServerProcess(reference, tmp_path / f"serve-{device}.log", **env)
        try:
            server.wait_ready(timeout=300)
            answers[device] = [
                requests.post(
                    f"{server.url}/invocations",
                    data=photo.read_bytes(),
                    headers={"Content-Type": "image/jpeg"},
                    timeout=120,
                ).json()
                for photo in photos
            ]
        finally:
            server.terminate()
        assert ("device cuda" in server.log()) == (device == "gpu"), server.log()
        assert "float32" in server.log(), server.log()
    worst = max(
        abs(gpu["class_probabilities"][name] - cpu["class_probabilities"][name])
        for gpu, cpu in zip(answers["gpu"], answers["cpu"], strict=True)
        for name in cpu["class_probabilities"]
    )
    assert worst <= 1e-2, worst
    summary(f"gpu: serve on CUDA vs CPU over HTTP, {len(photos)} photos: max |dp| {worst:.2e}")


def test_train_compiled(pristine, tmp_path, summary):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, compile="true")
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compile True" in result.stdout
    assert settings(base)["compile"] is True
    summary(f"gpu: train with compile=true: mean macro-F1 {learned(base):.3f}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs or more for NCCL")
def test_nccl_workers_on_one_host_match_one_worker(pristine, reference, tmp_path, summary):
    base = copy_job(pristine, tmp_path / "opt_ml")
    update_hyperparameters(base, cache_device="gpu", precision="bf16")
    config = {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(config))
    output = finished(deterministic_train(base, MASTER_PORT=str(free_port())))
    assert "[rank 1] " in output
    assert comparable_metrics(base) == comparable_metrics(reference)
    summary(f"gpu: {torch.cuda.device_count()} NCCL workers on one host: results identical")
