"""Hyperparameters: parsed once at the edge into a frozen, typed, validated TrainingConfig.

SageMaker hands every hyperparameter over as a string, and the SageMaker Python SDK
JSON-quotes them as well (`"\\"a,b\\""`). The values reach `parse_hyperparameters` already
JSON-decoded where possible (`"20"` -> 20, `"true"` -> True, `"\\"x\\""` -> "x"), so each
field accepts both the decoded value and its plain-string form. Keys may use `-` or `_`.
Unknown keys (`_tuning_objective_metric`, `sagemaker_*`) are logged and ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

_log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CACHE_DEVICES = ("auto", "gpu", "cpu")
FINAL_MODELS = ("ensemble", "refit")


class ConfigError(ValueError):
    """A hyperparameter is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class TrainingConfig:
    target_species: tuple[str, ...]
    csv_file: str | None = None
    img_size: int = 240
    batch_size: int = 64
    learning_rate: float = 1e-4
    num_epochs: int = 20
    k_folds: int = 3
    epoch_patience: int = 5
    downsample_other: bool = False
    downsample_frac: float = 0.5
    pretrained: bool = True
    seed: int = 42
    precision: str = "auto"
    compile: bool = False
    cache_device: str = "auto"
    decode_workers: int = 0
    workers_per_host: int = 0
    final_model: str = "ensemble"
    holdout_fraction: float = 0.0
    photo_store: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# name -> (inclusive lower bound, inclusive upper bound) for numbers.
_RANGES = {
    "img_size": (32, 1024),
    "batch_size": (2, 4096),
    "learning_rate": (1e-8, 1.0),
    "num_epochs": (1, 1000),
    "k_folds": (1, 20),
    "epoch_patience": (1, 1000),
    "downsample_frac": (1e-6, 1.0),
    "seed": (0, 2**31 - 1),
    "decode_workers": (0, 256),
    "workers_per_host": (0, 64),
    "holdout_fraction": (0.0, 0.5),
}
_CHOICES = {
    "precision": PRECISIONS,
    "cache_device": CACHE_DEVICES,
    "final_model": FINAL_MODELS,
    "photo_store": ("auto", "uint8", "jpeg"),
}
_IGNORED_PREFIXES = ("sagemaker_", "_")


def parse_hyperparameters(raw: dict[str, object]) -> TrainingConfig:
    """Validate the hyperparameters of a job; raise ConfigError naming the allowed values."""
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            level = logging.DEBUG if name.startswith(_IGNORED_PREFIXES) else logging.WARNING
            _log.log(level, "ignoring unknown hyperparameter %r", key)
            continue
        values[name] = _convert(name, fields[name].type, value)
    if not values.get("target_species"):
        raise ConfigError(
            "hyperparameter target_species is required: the comma-separated species to "
            'tell apart, e.g. "Lycorma delicatula,Zenaida macroura"; all others become other'
        )
    if values.get("csv_file") == "":
        values["csv_file"] = None
    return TrainingConfig(**values)


def _convert(name: str, kind: str, value: object) -> object:
    if name == "target_species":
        names = value if isinstance(value, list) else str(value).split(",")
        species = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
        if "other" in species:
            raise ConfigError("target_species must not contain 'other': that is the catch-all")
        return species
    if name in _CHOICES:
        text = str(value).strip().lower()
        if text not in _CHOICES[name]:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(_CHOICES[name])}")
        return text
    if kind == "bool":
        return _to_bool(name, value)
    if kind == "int":
        number = _to_number(name, value, int)
    elif kind == "float":
        number = _to_number(name, value, float)
    else:
        return None if value is None else str(value).strip()
    low, high = _RANGES[name]
    if not low <= number <= high:
        raise ConfigError(f"{name}={value!r} is out of range: allowed {low} to {high}")
    return number


def _to_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")


def _to_number(name: str, value: object, kind: type) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} is not a finite number")
    if kind is int:
        if number != int(number):
            raise ConfigError(f"{name}={value!r} is not a whole number")
        return int(number)
    return number
