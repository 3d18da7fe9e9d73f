"""The serving environment: every variable `serve` reads, what each accepts, and the one parser.

SageMaker hands a model's Environment to the container, and `serve` reads it at start-up: a
value it cannot use stops the server with one line, after the instance was provisioned. The
launcher parses `deploy --env` and `transform --env` with this same code before it creates
anything, so such a value costs seconds on a laptop instead of a failed endpoint.

Settings that depend on the machine (workers: one per GPU; the largest batch: the device's)
stay None here when unset; `serve` fills them in where it knows the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from species_classifier.contract.paths import BASE_DIR_ENV, DEFAULT_BASE_DIR, JobPaths

PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
MAX_BATCH_ENV = "MODEL_SERVER_MAX_BATCH"
DTYPE_ENV = "SPECIES_SERVE_DTYPE"
ENGINE_ENV = "SPECIES_SERVE_ENGINE"
COMPILE_ENV = "SPECIES_SERVE_COMPILE"
ABSTAIN_ENV = "SPECIES_ABSTAIN_BELOW"

# The first of each is what an unset or empty variable means.
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("auto", "eager", "graph", "onnx")
COMPILE_CHOICES = ("0", "1")

DEFAULT_PORT = 8080
DEFAULT_TIMEOUT_S = 60
DEFAULT_PAYLOAD_MB = 6
# SageMaker's largest request body, for real-time endpoints and batch transform alike.
MAX_PAYLOAD_MB = 100


class ServerConfigError(ValueError):
    """An environment variable or the model folder that the server cannot start with."""


@dataclass(frozen=True)
class ServingEnvironment:
    """The serving variables, parsed; None where the machine decides."""

    model_dir: Path
    port: int
    workers: int | None
    timeout_s: int
    max_payload_mb: int
    max_batch: int | None
    dtype: str
    engine: str
    compile_model: bool
    abstain_below: float | None  # None: model.json's

    @classmethod
    def parse(cls, environ: Mapping[str, str] = os.environ) -> ServingEnvironment:
        """Every variable `serve` reads, or ServerConfigError naming the first bad one."""
        return cls(
            model_dir=JobPaths(Path(environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))).model_dir,
            port=positive_int(environ, PORT_ENV, DEFAULT_PORT, upper=65535),
            workers=positive_int(environ, WORKERS_ENV, None, unset="one per GPU"),
            timeout_s=positive_int(environ, TIMEOUT_ENV, DEFAULT_TIMEOUT_S),
            max_payload_mb=positive_int(environ, PAYLOAD_ENV, DEFAULT_PAYLOAD_MB, MAX_PAYLOAD_MB),
            max_batch=positive_int(environ, MAX_BATCH_ENV, None, unset="the device's default"),
            dtype=choice(environ, DTYPE_ENV, DTYPES),
            engine=choice(environ, ENGINE_ENV, ENGINES),
            compile_model=choice(environ, COMPILE_ENV, COMPILE_CHOICES) == "1",
            abstain_below=share(environ, ABSTAIN_ENV),
        )


def positive_int(
    environ: Mapping[str, str],
    name: str,
    default: int | None,
    upper: int | None = None,
    unset: str | None = None,
) -> int | None:
    """The variable as a whole number from 1 (to `upper`); unset or empty is `default`."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1 or (upper is not None and value > upper):
        limit = f"1 to {upper}" if upper else "a positive whole number"
        raise ServerConfigError(
            f"{name}={raw!r} is not valid: set it to {limit}, or unset it for {unset or default}"
        )
    return value


def share(environ: Mapping[str, str], name: str) -> float | None:
    """The variable as a number from 0 to 1; unset or empty is None (model.json's value)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise ServerConfigError(
            f"{name}={raw!r} is not valid: set it to a number from 0 to 1, or unset it for "
            "model.json's abstain_below"
        )
    return value


def choice(environ: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    """The variable's value, one of `allowed`; unset or empty is the first."""
    raw = environ.get(name, "").strip()
    if not raw:
        return allowed[0]
    if raw.lower() not in allowed:
        raise ServerConfigError(
            f"{name}={raw!r} is not valid: set it to one of {', '.join(allowed)}, or unset it "
            f"for {allowed[0]}"
        )
    return raw.lower()
