"""Every documented SageMaker request limit the launcher can break, checked before any upload.

The numbers are botocore's service model (sagemaker 2017-07-24) and, where the model is silent,
the API reference: MaxPayloadInMB at most 100 and MaxConcurrentTransforms x MaxPayloadInMB at
most 100, tag keys not starting with `aws:`. Each check fails with one line that names the
limit and the value that broke it, so a mistake costs seconds, not an upload and a failed call.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

from species_classifier import gpu

from species_tools.aws import SettingsError

MAX_HYPERPARAMETERS = 100
MAX_HYPERPARAMETER_KEY = 256
MAX_HYPERPARAMETER_VALUE = 2500
MAX_TAGS = 50
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
# Tag keys and values: letters, spaces, digits and `_ . : / = + - @` (any script).
TAG_SYMBOLS = frozenset("_.:/=+-@")
ENVIRONMENT_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_PAYLOAD_MB = 100
MAX_PAYLOAD_PRODUCT = 100


def shorten(value: str, width: int = 40) -> str:
    return repr(value if len(value) <= width else value[:width] + "...")


def check_hyperparameters(hyperparameters: Mapping[str, str]) -> None:
    if len(hyperparameters) > MAX_HYPERPARAMETERS:
        raise SettingsError(
            f"{len(hyperparameters)} hyperparameters: SageMaker takes at most {MAX_HYPERPARAMETERS}"
        )
    for key, value in hyperparameters.items():
        if not key or len(key) > MAX_HYPERPARAMETER_KEY:
            raise SettingsError(
                f"hyperparameter name {shorten(key)} has {len(key)} characters: "
                f"1 to {MAX_HYPERPARAMETER_KEY} allowed"
            )
        if len(value) > MAX_HYPERPARAMETER_VALUE:
            raise SettingsError(
                f"hyperparameter {key} has a value of {len(value)} characters: "
                f"at most {MAX_HYPERPARAMETER_VALUE} allowed"
            )


def tag_text_is_valid(text: str) -> bool:
    return all(unicodedata.category(char)[0] in "LZN" or char in TAG_SYMBOLS for char in text)


def check_tags(tags: Sequence[Mapping[str, str]]) -> None:
    if len(tags) > MAX_TAGS:
        raise SettingsError(
            f"{len(tags)} tags (project=species-classifier included): at most {MAX_TAGS} allowed"
        )
    for tag in tags:
        key, value = tag["Key"], tag["Value"]
        if not key or len(key) > MAX_TAG_KEY:
            raise SettingsError(f"tag key {shorten(key)}: 1 to {MAX_TAG_KEY} characters allowed")
        if len(value) > MAX_TAG_VALUE:
            raise SettingsError(
                f"tag {key} has a value of {len(value)} characters: at most {MAX_TAG_VALUE} allowed"
            )
        if key.lower().startswith("aws:"):
            raise SettingsError(f"tag key {key!r}: the aws: prefix is reserved for AWS")
        for what, text in (("key", key), ("value", value)):
            if not tag_text_is_valid(text):
                raise SettingsError(
                    f"tag {what} {shorten(text)}: only letters, digits, spaces and _ . : / = + - @ "
                    "are allowed"
                )


def check_environment(
    environment: Mapping[str, str], where: str, max_entries: int, max_length: int
) -> None:
    """Container environment: names like shell variables; entry and length limits per API."""
    if len(environment) > max_entries:
        raise SettingsError(
            f"{len(environment)} environment variables for {where}: at most {max_entries} allowed"
        )
    for name, value in environment.items():
        if not ENVIRONMENT_NAME.fullmatch(name) or len(name) > max_length:
            raise SettingsError(
                f"environment variable name {shorten(name)}: letters, digits and _ , not starting "
                f"with a digit, at most {max_length} characters"
            )
        if len(value) > max_length:
            raise SettingsError(
                f"environment variable {name} has a value of {len(value)} characters: "
                f"at most {max_length} allowed for {where}"
            )


def check_instance_type(instance_type: str) -> None:
    """Refuse an instance type whose GPU the image cannot run on (gpu.py), before anything
    is uploaded or created."""
    reason = gpu.unsupported_instance(instance_type)
    if reason is not None:
        raise SettingsError(reason)


def check_range(value: int, low: int, high: int, flag: str) -> None:
    if not low <= value <= high:
        raise SettingsError(f"{flag} must be between {low} and {high}, got {value}")


def check_transform_payload(max_payload_mb: int, max_concurrent: int | None) -> None:
    check_range(max_payload_mb, 0, MAX_PAYLOAD_MB, "--max-payload-mb")
    if max_concurrent is not None:
        check_range(max_concurrent, 1, MAX_PAYLOAD_PRODUCT, "--max-concurrent")
        if max_concurrent * max_payload_mb > MAX_PAYLOAD_PRODUCT:
            raise SettingsError(
                f"--max-concurrent {max_concurrent} x --max-payload-mb {max_payload_mb} = "
                f"{max_concurrent * max_payload_mb}: SageMaker allows at most "
                f"{MAX_PAYLOAD_PRODUCT} MB in flight per instance"
            )
