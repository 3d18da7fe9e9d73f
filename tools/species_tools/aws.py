"""What the launcher and the collector both need around boto3: settings errors in one line,
TOML settings files, S3 URIs, and AWS error answers turned into words."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

# The codes a missing resource or object comes back with, across S3 (NoSuchKey, and a bare
# 404 for HEAD, which has no body) and SageMaker/CloudWatch (ResourceNotFound...).
NOT_FOUND_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "404",
        "NotFound",
        "ResourceNotFound",
        "ResourceNotFoundException",
    }
)


class SettingsError(Exception):
    """A setting that is missing or wrong: one line saying which and how to set it."""


def load_toml(path: Path) -> dict[str, Any]:
    """A settings file's tables, or a SettingsError that names the file and the fault."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except OSError as error:
        raise SettingsError(f"cannot read config file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path} is not valid TOML: {error}") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); the key may be empty, the bucket may not."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise SettingsError(f"expected an S3 URI like s3://bucket/prefix/, got {uri!r}")
    return bucket, key


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def aws_message(error: Exception) -> str:
    """`Code: message` for an AWS error answer, the text of anything else."""
    if isinstance(error, ClientError):
        detail = error.response.get("Error", {})
        return f"{detail.get('Code', 'Error')}: {detail.get('Message') or error}"
    return str(error) or type(error).__name__


def is_not_found(error: ClientError) -> bool:
    # SageMaker answers ValidationException "Could not find ..." for a missing resource.
    message = str(error.response.get("Error", {}).get("Message", ""))
    return error_code(error) in NOT_FOUND_CODES or (
        error_code(error) == "ValidationException" and "Could not find" in message
    )


# S3 answers a request it refuses with AccessDenied, or a bare 403 for HEAD, which has no body.
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "403"})


def is_access_denied(error: ClientError) -> bool:
    return error_code(error) in ACCESS_DENIED_CODES
