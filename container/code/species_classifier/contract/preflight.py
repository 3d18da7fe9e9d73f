"""The image's hyperparameter rules, applied on the laptop before anything is uploaded.

The launcher sends hyperparameters as strings; the image receives them JSON-decoded where
they parse (the sagemaker-training toolkit's way) and reads them with `parse_hyperparameters`.
Here the launcher does the same, and more strictly than the image, which logs an unknown key
and trains on: a key the image would ignore is refused, with "did you mean" for a near miss,
and a tuning range's every bound and choice is read as a trial would receive it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from species_classifier.contract.hyperparameters import (
    ConfigError,
    TrainingConfig,
    is_known,
    parse_hyperparameters,
    parse_value,
    unknown_name,
)


def as_sagemaker_delivers(strings: Mapping[str, str]) -> dict[str, object]:
    """The values as the image receives them: JSON-decoded where they parse, as the
    sagemaker-training toolkit does (`"20"` -> 20, `"true"` -> True), else the string."""
    decoded: dict[str, object] = {}
    for key, text in strings.items():
        try:
            decoded[key] = json.loads(text)
        except ValueError:
            decoded[key] = text
    return decoded


def check_names(keys: Iterable[str]) -> None:
    """Refuse the first key the image would ignore (SageMaker's own keys are allowed)."""
    for key in keys:
        if not is_known(key):
            raise ConfigError(unknown_name(key))


def check_hyperparameters(strings: Mapping[str, str]) -> TrainingConfig:
    """A job's hyperparameters, as strings, read by the image's rules; ConfigError otherwise."""
    check_names(strings)
    return parse_hyperparameters(as_sagemaker_delivers(strings))


def check_value(key: str, text: str) -> object:
    """One value SageMaker may hand a trial (a range's bound or choice), read as the image
    reads it; `key` must be known."""
    [value] = as_sagemaker_delivers({key: text}).values()
    return parse_value(key, value)
