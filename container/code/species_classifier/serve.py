"""`serve`: the SageMaker serving entry point, gunicorn configured from SAGEMAKER_* variables
(parsed by the contract, `contract/serving.py`, which the launcher checks `--env` with).

The master process reads the environment and loads the model bundle once on the CPU
before forking, so a missing or broken bundle stops the server at once with one clear
log line and a non-zero exit, not a loop of crashing workers. Each worker (gthread: many
request threads, one batching thread) then loads the bundle onto its own device, builds
its fastest forward function there (CUDA graphs captured, or the faster CPU form
measured: engine.py) and warms it up before it accepts a connection, so /ping answers
200 only once the model is ready. SIGTERM is gunicorn's graceful stop: requests in flight
finish, within the 30 s SageMaker leaves before SIGKILL.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from gunicorn.app.base import BaseApplication

from species_classifier.app import create_app
from species_classifier.bundle import BundleError, load_members, read_description
from species_classifier.contract.serving import ServerConfigError, ServingEnvironment
from species_classifier.gpu import GpuUnusableError, check_host
from species_classifier.predictor import (
    Batcher,
    Predictor,
    choose_device,
    default_max_batch,
    usable_cpus,
)

_log = logging.getLogger("species_classifier.serve")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SageMaker sends SIGKILL 30 s after SIGTERM; leave a margin for the workers to exit.
GRACEFUL_TIMEOUT_S = 25
# Batch transform refuses MaxConcurrentTransforms x MaxPayloadInMB above 100.
TRANSFORM_PAYLOAD_BUDGET_MB = 100
EXIT_CONFIG_ERROR = 1


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    port: int
    workers: int
    timeout_s: int
    max_payload_mb: int
    max_batch: int
    dtype: torch.dtype | None = None  # None: measured at start-up
    engine: str = "auto"
    compile_model: bool = False
    abstain_below: float | None = None  # None: model.json's

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ServerConfig:
        """The contract's parse of the environment, with this machine's defaults filled in."""
        parsed = ServingEnvironment.parse(environ)
        gpus = torch.cuda.device_count()
        device = torch.device("cuda" if gpus else "cpu")
        return cls(
            model_dir=parsed.model_dir,
            port=parsed.port,
            workers=parsed.workers or max(gpus, 1),
            timeout_s=parsed.timeout_s,
            max_payload_mb=parsed.max_payload_mb,
            max_batch=parsed.max_batch or default_max_batch(device),
            dtype=TORCH_DTYPES.get(parsed.dtype),
            engine=parsed.engine,
            compile_model=parsed.compile_model,
            abstain_below=parsed.abstain_below,
        )

    @property
    def threads(self) -> int:
        """Request threads per worker: one batch running, the next one decoding."""
        return 2 * self.max_batch

    @property
    def max_concurrent_transforms(self) -> int:
        return max(
            1,
            min(self.workers * self.max_batch, TRANSFORM_PAYLOAD_BUDGET_MB // self.max_payload_mb),
        )


def check_bundle(model_dir: Path) -> None:
    """Load every member once on the CPU: the same checks a worker makes, made up front."""
    # One thread keeps OpenMP's thread pool unstarted in the master: a worker forked after
    # the pool started hangs in its first parallel torch op (libgomp is not fork-safe).
    torch.set_num_threads(1)
    description = read_description(model_dir)
    try:
        networks = load_members(model_dir, description)
    except BundleError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. torch.load's UnpicklingError on a damaged file
        detail = str(error).splitlines()[0][:200]
        raise BundleError(
            f"the weights in {model_dir} do not load ({type(error).__name__}: {detail}): "
            "the bundle is damaged; copy the model.tar.gz that training wrote again"
        ) from None
    _log.info(
        "model bundle %s: %d members, classes %s", model_dir, len(networks), description.classes
    )
    del networks
    gc.collect()


@contextlib.contextmanager
def _heartbeat(worker) -> Iterator[None]:
    """Tell the gunicorn master the worker is alive while it loads (which may take longer
    than the request timeout on a cold GPU); otherwise the master kills it mid-load."""
    loaded = threading.Event()

    def beat() -> None:
        while not loaded.wait(1.0):
            worker.notify()

    thread = threading.Thread(target=beat, name="load-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loaded.set()
        thread.join()


class ModelServer(BaseApplication):
    """gunicorn, configured in code: no config file to keep in step with the environment."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._worker = None
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": f"0.0.0.0:{self.config.port}",
            "workers": self.config.workers,
            "worker_class": "gthread",
            "threads": self.config.threads,
            "timeout": self.config.timeout_s,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "errorlog": "-",
            # Several servers may run on one machine (tests, benchmarks): no shared socket file.
            "control_socket_disable": True,
            "pre_fork": self._pre_fork,
            "post_fork": self._post_fork,
        }
        for name, value in settings.items():
            self.cfg.set(name, value)

    @staticmethod
    def _pre_fork(server, worker) -> None:
        # A stable slot per live worker spreads the workers over the GPUs, also after a
        # worker is replaced.
        taken = {getattr(other, "device_slot", None) for other in server.WORKERS.values()}
        worker.device_slot = next(slot for slot in itertools.count() if slot not in taken)

    def _post_fork(self, server, worker) -> None:
        self._worker = worker

    def load(self):
        config = self.config
        with _heartbeat(self._worker):
            predictor = Predictor(
                config.model_dir,
                device=choose_device(self._worker.device_slot),
                max_batch=config.max_batch,
                cpu_threads=max(1, usable_cpus() // config.workers),
                dtype=config.dtype,
                engine=config.engine,
                compile_model=config.compile_model,
                abstain_below=config.abstain_below,
            )
            predictor.warm_up()
        return create_app(
            Batcher(predictor, on_broken=_stop_this_worker),
            max_payload_mb=config.max_payload_mb,
            max_concurrent_transforms=config.max_concurrent_transforms,
            timeout_seconds=config.timeout_s,
        )


def _stop_this_worker() -> None:
    """gunicorn's graceful stop for this worker alone: requests in flight finish, then the
    master starts a fresh worker with a fresh CUDA context in its place."""
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        check_host("serve")
        config = ServerConfig.from_environment()
        check_bundle(config.model_dir)
    except (ServerConfigError, BundleError, GpuUnusableError) as error:
        _log.error("cannot start the model server: %s", error)
        return EXIT_CONFIG_ERROR
    _log.info(
        "serving %s on port %d: %d worker(s) x %d threads, max batch %d, timeout %d s, "
        "payload limit %d MB, dtype %s, engine %s%s",
        config.model_dir,
        config.port,
        config.workers,
        config.threads,
        config.max_batch,
        config.timeout_s,
        config.max_payload_mb,
        str(config.dtype).removeprefix("torch.") if config.dtype else "auto",
        config.engine,
        ", torch.compile" if config.compile_model else "",
    )
    # Everything loaded so far lives as long as the process: keep the garbage collector
    # away from it, so forked workers share those pages instead of copying them on every
    # collection (and exit in a moment instead of seconds).
    gc.freeze()
    ModelServer(config).run()
    return 0
