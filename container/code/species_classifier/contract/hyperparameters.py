"""Hyperparameters: parsed once at the edge into a frozen, typed, validated TrainingConfig.

SageMaker hands every hyperparameter over as a string, and the SageMaker Python SDK
JSON-quotes them as well (`"\\"a,b\\""`). The values reach `parse_hyperparameters` already
JSON-decoded where possible (`"20"` -> 20, `"true"` -> True, `"\\"x\\""` -> "x"), so each
field accepts both the decoded value and its plain-string form. Keys may use `-` or `_`.
Unknown keys (`_tuning_objective_metric`, `sagemaker_*`) are logged and ignored; the launcher
refuses the user's own unknown keys before it uploads anything (contract/preflight.py).
Values are converted by their field's real type, so an `int | None` field parses as a number.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass

from species_classifier.contract.channel import OTHER

_log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CACHE_DEVICES = ("auto", "gpu", "cpu")
FINAL_MODELS = ("ensemble", "refit")
GROUP_BYS = ("auto", "observation", "observer", "none")
PHOTO_STORES = ("auto", "uint8", "jpeg")


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
    group_by: str = "auto"
    min_precision: float = 0.95
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
    "min_precision": (0.0, 1.0),
}
_CHOICES = {
    "precision": PRECISIONS,
    "cache_device": CACHE_DEVICES,
    "final_model": FINAL_MODELS,
    "group_by": GROUP_BYS,
    "photo_store": PHOTO_STORES,
}
_IGNORED_PREFIXES = ("sagemaker_", "_")


def parse_hyperparameters(raw: dict[str, object]) -> TrainingConfig:
    """Validate the hyperparameters of a job; raise ConfigError naming the allowed values."""
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _TYPES:
            level = logging.DEBUG if name.startswith(_IGNORED_PREFIXES) else logging.WARNING
            _log.log(level, "ignoring %s", unknown_name(key))
            continue
        values[name] = convert(name, _TYPES[name], value)
    if not values.get("target_species"):
        raise ConfigError(
            "hyperparameter target_species is required: the comma-separated species to "
            'tell apart, e.g. "Lycorma delicatula,Zenaida macroura"; all others become other'
        )
    return TrainingConfig(**values)


def is_known(key: str) -> bool:
    """A field of TrainingConfig, or a key SageMaker and its SDK add themselves
    (`sagemaker_program`, `_tuning_objective_metric`, ...), which are never the user's."""
    name = key.replace("-", "_")
    return name in _TYPES or name.startswith(_IGNORED_PREFIXES)


def unknown_name(key: str) -> str:
    """What to say about a hyperparameter the image does not know: the near miss, or the list."""
    close = difflib.get_close_matches(key.replace("-", "_"), list(_TYPES), n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(_TYPES)}"
    return f"unknown hyperparameter {key!r}: {hint}"


def parse_value(key: str, value: object) -> object:
    """One known hyperparameter's value as the image reads it, or ConfigError."""
    name = key.replace("-", "_")
    return convert(name, _TYPES[name], value)


def value_type(key: str) -> type:
    """The type a known hyperparameter's value has once parsed: int, float, bool, str or tuple."""
    kind, _ = _unwrap_optional(_TYPES[key.replace("-", "_")])
    return typing.get_origin(kind) or kind


def convert(name: str, annotation: object, value: object) -> object:
    """`value` as the field `name` of type `annotation` holds it, or ConfigError.

    Dispatches on the real type: X | None takes None or an empty string as None, bool comes
    before int (True is an int to Python, never a number here), tuple[str, ...] is a
    comma-separated list; numbers with a bound in _RANGES are checked against it.
    """
    kind, optional = _unwrap_optional(annotation)
    if optional and (value is None or str(value).strip() == ""):
        return None
    if name == "target_species":
        names = value if isinstance(value, list) else str(value).split(",")
        species = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
        if OTHER in species:
            raise ConfigError(f"target_species must not contain {OTHER!r}: that is the catch-all")
        return species
    if name in _CHOICES:
        text = str(value).strip().lower()
        if text not in _CHOICES[name]:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(_CHOICES[name])}")
        return text
    if kind is bool:
        return _to_bool(name, value)
    if kind is int:
        number = _to_number(name, value, int)
    elif kind is float:
        number = _to_number(name, value, float)
    elif kind is str:
        return str(value).strip()
    else:
        raise TypeError(f"TrainingConfig.{name}: no parser for {annotation}")
    low, high = _RANGES.get(name, (-math.inf, math.inf))
    if not low <= number <= high:
        raise ConfigError(f"{name}={value!r} is out of range: allowed {low} to {high}")
    return number


def _unwrap_optional(annotation: object) -> tuple[object, bool]:
    """(X, True) for X | None, else (annotation, False)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and type(None) in args:
        [kind] = [arg for arg in args if arg is not type(None)]
        return kind, True
    return annotation, False


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


# Field name -> its real type (the annotations are strings under `from __future__ import annotations`).
_TYPES: dict[str, object] = typing.get_type_hints(TrainingConfig)
