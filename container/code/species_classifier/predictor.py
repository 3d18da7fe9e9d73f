"""Prediction for the endpoint: the model bundle loaded once, and request batching.

`Predictor` owns the model on its device: it reads model.json (classes, input size,
normalisation, temperature: no second copy of those constants), builds the ensemble's
fastest forward function for the device once (engine.py: ONNX Runtime among the CPU
candidates where the bundle has a checked model.onnx), and turns a list of decoded
photos into the seed's answer per photo (answers.py, shared with species-classify).
`Batcher` owns the queue between request threads and the model: each request thread
decodes its own photos, then one batching thread per worker process runs whatever is
waiting as one forward pass, so eight concurrent requests cost one batch of eight, not
eight batches of one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from species_classifier.answers import build_answers
from species_classifier.bundle import load_members, read_description
from species_classifier.engine import Ensemble, build_forward
from species_classifier.gpu import is_sticky_cuda_error
from species_classifier.imaging import PhotoError, decode_photo
from species_classifier.onnx_runtime import ONNX_FILE

_log = logging.getLogger(__name__)

# The largest forward pass. On a GPU a bigger batch is nearly free; on a CPU the time per
# photo stops falling after a handful, while the wait for the whole batch keeps growing.
GPU_MAX_BATCH = 64
CPU_MAX_BATCH = 16
# How long the batching thread waits for requests that have arrived and are still being
# decoded (a 500 px JPEG takes a few ms) before it runs without them.
GATHER_SECONDS = 0.05


def choose_device(slot: int = 0) -> torch.device:
    """GPU number `slot` (modulo the GPU count) where there is a GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", slot % torch.cuda.device_count())
    return torch.device("cpu")


def default_max_batch(device: torch.device) -> int:
    return GPU_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH


def usable_cpus() -> int:
    """CPUs this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Predictor:
    """The ensemble of a model bundle on one device, ready to predict decoded photos."""

    def __init__(
        self,
        model_dir: Path,
        device: torch.device | None = None,
        max_batch: int | None = None,
        cpu_threads: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        engine: str = "auto",
        compile_model: bool = False,
        abstain_below: float | None = None,
    ) -> None:
        """`dtype`, `engine` and `compile_model` are build_forward's: None and "auto"
        measure at start-up what is fastest on this device. `abstain_below` overrides
        model.json's: answers less confident than it are "unsure"."""
        self.description = read_description(model_dir)
        self.abstain_below = (
            self.description.abstain_below if abstain_below is None else abstain_below
        )
        self.classes = list(self.description.classes)
        self.img_size = self.description.img_size
        self.member_names = [member.name for member in self.description.members]
        self.device = device or choose_device()
        self.max_batch = max_batch or default_max_batch(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(cpu_threads or usable_cpus())
        ensemble = Ensemble(
            load_members(model_dir, self.description),
            self.description.mean,
            self.description.std,
            self.description.temperature,
        )
        self.built = build_forward(
            ensemble,
            self.device,
            self.img_size,
            self.max_batch,
            dtype=dtype,
            engine=engine,
            compile_model=compile_model,
            onnx_file=model_dir / ONNX_FILE if self.description.onnx else None,
        )
        _log.info(
            "model loaded: %d members, %d classes, %d px, temperature %g, device %s, %s, %s, "
            "max batch %d%s",
            len(self.member_names),
            len(self.classes),
            self.img_size,
            self.description.temperature,
            self.device,
            str(self.built.dtype).removeprefix("torch."),
            self.built.engine,
            self.max_batch,
            "" if self.device.type == "cuda" else f", {torch.get_num_threads()} threads",
        )

    def decode(self, body: bytes) -> np.ndarray:
        """Request bytes -> the uint8 pixels the model takes; PhotoError when unusable."""
        return decode_photo(body, self.img_size)

    def warm_up(self) -> None:
        """One forward pass, so the first real request does not pay for kernel selection."""
        self.predict([np.zeros((self.img_size, self.img_size, 3), dtype=np.uint8)])

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """One answer per photo, in the seed's format; batches of at most max_batch."""
        answers = []
        for start in range(0, len(images), self.max_batch):
            member_probs = self.probabilities(images[start : start + self.max_batch])
            answers.extend(
                build_answers(member_probs, self.classes, self.member_names, self.abstain_below)
            )
        return answers

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """members x photos x classes probabilities, float64 on the host."""
        pixels = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        # Read at once: a captured graph's output is overwritten by the next batch.
        return self.built.forward(pixels).cpu().double().numpy()


@dataclass
class _Job:
    images: list[np.ndarray]
    future: Future


class Batcher:
    """One batching thread in front of a Predictor, shared by a worker's request threads.

    After a CUDA error that breaks the process's GPU context for good, `healthy` turns False
    and `on_broken` is called once: the worker must be replaced, not keep failing requests.
    """

    def __init__(
        self,
        predictor: Predictor,
        gather_seconds: float = GATHER_SECONDS,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.healthy = True
        self._on_broken = on_broken
        self._gather_seconds = gather_seconds
        self._ready = threading.Condition()
        self._waiting: deque[_Job] = deque()
        # Requests that have arrived and are decoding: worth a short wait to batch them.
        self._decoding = 0
        self._thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
        self._thread.start()

    def predict(self, bodies: list[bytes], timeout: float) -> list[dict]:
        """Decode in the calling thread, then wait for the batching thread's answers.

        Raises PhotoError (with the photo's index when there are several) for an unusable
        photo, TimeoutError when the answer takes longer than `timeout` seconds.
        """
        with self._ready:
            self._decoding += 1
        try:
            images = [self._decode(body, index, len(bodies)) for index, body in enumerate(bodies)]
        except BaseException:
            with self._ready:
                self._decoding -= 1
                self._ready.notify()
            raise
        job = _Job(images, Future())
        with self._ready:
            self._decoding -= 1
            self._waiting.append(job)
            self._ready.notify()
        try:
            return job.future.result(timeout)
        except TimeoutError:
            job.future.cancel()
            raise

    def _decode(self, body: bytes, index: int, count: int) -> np.ndarray:
        try:
            return self.predictor.decode(body)
        except PhotoError as error:
            if count == 1:
                raise
            raise PhotoError(f"instance {index}: {error}") from None

    def _serve(self) -> None:
        while True:
            jobs = self._next_batch()
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                answers = self.predictor.predict([image for job in jobs for image in job.images])
            except Exception as error:  # noqa: BLE001 - fail these requests, keep the thread
                _log.exception("prediction failed for a batch of %d requests", len(jobs))
                for job in jobs:
                    job.future.set_exception(error)
                if self.healthy and is_sticky_cuda_error(error):
                    self._break(error)
                continue
            start = 0
            for job in jobs:
                job.future.set_result(answers[start : start + len(job.images)])
                start += len(job.images)

    def _break(self, error: Exception) -> None:
        self.healthy = False
        _log.error(
            "the GPU is unusable in this worker after %s: replacing the worker",
            str(error).splitlines()[0][:200],
        )
        if self._on_broken is not None:
            self._on_broken()

    def _next_batch(self) -> list[_Job]:
        max_batch = self.predictor.max_batch
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            deadline = time.monotonic() + self._gather_seconds
            while self._decoding and sum(len(job.images) for job in self._waiting) < max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            jobs = [self._waiting.popleft()]
            count = len(jobs[0].images)
            while self._waiting and count + len(self._waiting[0].images) <= max_batch:
                jobs.append(self._waiting.popleft())
                count += len(jobs[-1].images)
            return jobs
