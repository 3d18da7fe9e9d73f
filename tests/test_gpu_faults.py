"""What the GPU path does when the GPU fails, simulated on the CPU: a real `train` and a real
gunicorn `serve` where users meet them, the guards themselves where a process adds nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from job_helpers import failure_text, train_env
from local_servers import free_port, wait_for_200
from serving_helpers import make_bundle, photo, serve_env
from species_classifier import distributed, engine, stores, trainer
from species_classifier.app import create_app
from species_classifier.checkpoint import CheckpointStore
from species_classifier.contract.hyperparameters import ConfigError
from species_classifier.distributed import Workers
from species_classifier.engine import Ensemble, build_forward, cuda_graph_forward
from species_classifier.predictor import Batcher
from species_classifier.train import train_own_folds

RUNNER = Path(__file__).with_name("gpu_fault_runner.py")


def test_a_gpu_out_of_memory_fails_the_job_with_the_setting_to_lower(job):
    base = job()
    done = subprocess.run(
        [sys.executable, str(RUNNER), "train"],
        env=train_env(base, GPU_FAULT="oom"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    first_line = failure_text(base).splitlines()[0]
    assert first_line == (
        "GPU out of memory during training: lower batch_size (now 8; validation uses 4x)"
    )


def test_more_workers_per_host_than_gpus_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^workers_per_host=2 but this instance has 1 GPU"):
        distributed.read_topology(tmp_path / "resourceconfig.json", workers_per_host=2)


class _FinishingTrainer:
    """Finishes every fold at once, its Adam state still attached, as FoldTrainer.run does."""

    config = SimpleNamespace(num_epochs=1, compile=False)
    device = torch.device("cpu")
    precision = "fp32"

    def run(self, _data, state, *_callbacks):
        weights = {"w": torch.ones(2)}
        state.epoch = state.best_epoch = 1
        state.best_macro_f1 = 0.5
        state.model = state.best_model = weights
        state.optimizer = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}
        state.scaler = {"scale": 1.0}
        return state


class _Photos:
    def fold_data(self, *_indices):
        return None


def test_finished_folds_are_gathered_without_their_optimiser_state(tmp_path):
    store = CheckpointStore(tmp_path, "fingerprint")
    store.open()
    folds = [(np.arange(2), np.arange(2, 4))] * 3
    gathered = train_own_folds(_FinishingTrainer(), store, _Photos(), folds, Workers())
    assert [state.fold for state in gathered] == [1, 2, 3]
    for state in gathered:
        assert state.optimizer == {} and state.scaler == {} and state.model == {}
        assert torch.equal(state.best_model["w"], torch.ones(2))  # what the bundle needs


def _ensemble() -> Ensemble:
    member = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    return Ensemble([member], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_a_failing_dtype_measurement_serves_float32_instead_of_killing_the_worker(
    monkeypatch, caplog
):
    monkeypatch.setattr(
        engine, "_dtype_candidates", lambda _device: [torch.bfloat16, torch.float32]
    )

    def out_of_memory(*_args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(engine, "_seconds_per_call", out_of_memory)
    with caplog.at_level(logging.WARNING):
        built = build_forward(_ensemble(), torch.device("cpu"), 16, 2, engine="eager")
    assert built.dtype == torch.float32
    assert "dtype measurement failed, serving float32: OutOfMemoryError" in caplog.text


def test_the_eager_fallback_leaves_cudnn_benchmarking_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def capture_fails(_device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "CudaGraphs", capture_fails)
    forward, _dtype, chosen = cuda_graph_forward(
        _ensemble().eval(), torch.device("cpu"), 16, 4, "auto", False
    )
    assert chosen == "eager (graph capture failed)"
    assert torch.backends.cudnn.benchmark is False
    assert forward(torch.zeros((3, 16, 16, 3), dtype=torch.uint8)).shape == (1, 3, 4)


class _BrokenGpu:
    max_batch = 4

    def decode(self, body: bytes) -> np.ndarray:
        return np.ones((8, 8, 3), dtype=np.uint8)

    def predict(self, _images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_after_a_sticky_cuda_error_ping_is_503_and_the_worker_is_replaced_once():
    replaced = []
    app = create_app(Batcher(_BrokenGpu(), on_broken=lambda: replaced.append(True)))
    client = app.test_client()
    assert client.get("/ping").status_code == 200
    for _ in range(2):
        answer = client.post("/invocations", data=b"photo", content_type="image/jpeg")
        assert answer.status_code == 500
    assert client.get("/ping").status_code == 503
    assert replaced == [True]


def test_a_passing_error_keeps_the_worker(monkeypatch):
    class OutOfMemory(_BrokenGpu):
        def predict(self, _images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    replaced = []
    app = create_app(Batcher(OutOfMemory(), on_broken=lambda: replaced.append(True)))
    client = app.test_client()
    assert client.post("/invocations", data=b"x", content_type="image/jpeg").status_code == 500
    assert client.get("/ping").status_code == 200
    assert replaced == []


def test_gunicorn_replaces_a_worker_whose_gpu_broke(tmp_path):
    """The real server: the broken worker stops itself and gunicorn starts a fresh one."""
    base = tmp_path / "opt_ml"
    make_bundle(base / "model", img_size=32, members=1)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, str(RUNNER), "serve"],
            env=serve_env(base, port, GPU_FAULT="sticky"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_200(f"{url}/ping", 180, server, log_path)
        answer = requests.post(
            f"{url}/invocations", data=photo(1), headers={"Content-Type": "image/jpeg"}
        )
        assert answer.status_code == 500
        deadline = time.monotonic() + 120
        while log_path.read_text().count("Booting worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        log = log_path.read_text()
        assert "the GPU is unusable in this worker after CUDA error: an illegal memory" in log
        assert log.count("Booting worker") == 2, log
        wait_for_200(f"{url}/ping", 180, server, log_path)  # the fresh worker serves
    finally:
        server.terminate()
        server.wait(60)


def test_compile_reaches_the_data_parallel_refit(monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        fold_trainer = object.__new__(trainer.FoldTrainer)
        fold_trainer.model = torch.nn.Linear(2, 2)
        fold_trainer.device = torch.device("cpu")
        fold_trainer.forward = fold_trainer.model
        fold_trainer.config = SimpleNamespace(compile=True)
        forward = fold_trainer._refit_forward(workers=2)
        assert compiled == [forward]
        assert isinstance(forward, torch.nn.parallel.DistributedDataParallel)
        fold_trainer.config = SimpleNamespace(compile=False)
        assert fold_trainer._refit_forward(workers=2) is not compiled[0]
        assert len(compiled) == 1
    finally:
        torch.distributed.destroy_process_group()


def test_batches_copy_the_epochs_rows_once_not_per_batch(monkeypatch):
    copies = []
    real = stores.to_device
    for module in (trainer, stores):
        monkeypatch.setattr(
            module,
            "to_device",
            lambda tensor, device: copies.append(len(tensor)) or real(tensor, device),
        )
    fold_trainer = object.__new__(trainer.FoldTrainer)
    fold_trainer.device = torch.device("cpu")
    data = trainer.FoldData(
        pixels=torch.zeros((20, 4, 4, 3), dtype=torch.uint8),
        sizes=torch.full((20, 4), 4),
        labels=torch.zeros(20, dtype=torch.int64),
        train_index=np.arange(20),
        val_index=np.arange(0),
    )
    batches = list(fold_trainer._batches(data, data.train_index, 8, torch.arange(20)))
    assert len(batches) == 3
    # One copy of the epoch's 20 rows to the cache's device, then one of each batch's labels.
    assert copies == [20, 8, 8, 4]


def test_the_normalisation_constants_are_made_once_per_device():
    from species_classifier.imaging import normalization_constants

    cpu = torch.device("cpu")
    first = normalization_constants((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), cpu)
    again = normalization_constants((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), cpu)
    assert first[0] is again[0] and first[1] is again[1]
    assert torch.allclose(first[0].flatten(), torch.tensor([127.5, 102.0, 76.5]))
