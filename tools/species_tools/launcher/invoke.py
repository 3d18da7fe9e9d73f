"""`invoke`: photos (files or folders) to an endpoint, one request each, predictions printed.

A phone photo is often over InvokeEndpoint's 6 MiB limit (4 MB on a serverless endpoint), and
the model looks at 240 px: a photo over the limit or longer than 2,048 px on its long side is
re-encoded (EXIF orientation applied, JPEG quality 95) before it is sent, and the tool says so.
Throttling and connection errors are retried; a read time-out is not (the endpoint got the
photo and is stuck on it: retrying would only wait another 70 s, up to ten times).

On an asynchronous endpoint each photo is uploaded beside the endpoint's answers (under
`inputs/`), queued with InvokeEndpointAsync, and its answer read from S3 once it lands,
printed like a real-time one.
"""

from __future__ import annotations

import argparse
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from PIL import Image, ImageOps, UnidentifiedImageError

from species_tools.aws import SettingsError, aws_message, error_code, is_not_found, split_s3_uri
from species_tools.launcher.session import Command, Context, poll_until
from species_tools.launcher.settings import (
    SettingsParser,
    add_wait_timeout,
    join_s3,
    require,
)

# InvokeEndpoint's request limit (botocore BodyBlob); the serving container's default is the same.
MAX_INVOKE_BYTES = 6_291_456
# A serverless endpoint takes requests of up to 4 MB (SageMaker's serverless guide).
MAX_SERVERLESS_BYTES = 4_000_000
MAX_SIDE_PX = 2048
JPEG_QUALITY = 95
PHOTO_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "application/x-image",
    ".bmp": "application/x-image",
    ".gif": "application/x-image",
    ".tif": "application/x-image",
    ".tiff": "application/x-image",
}
THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "ServiceUnavailable"}
)
ATTEMPTS = 4
FIRST_BACKOFF_S = 1.0


def collect_photos(paths: Sequence[str]) -> list[Path]:
    photos: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            photos += sorted(p for p in path.rglob("*") if p.suffix.lower() in PHOTO_CONTENT_TYPES)
        elif path.is_file():
            photos.append(path)
        else:
            raise SettingsError(f"{text}: no such file or folder")
    if not photos:
        raise SettingsError(
            f"no photos ({', '.join(sorted(PHOTO_CONTENT_TYPES))}) in {', '.join(paths)}"
        )
    return photos


class PhotoError(Exception):
    """This photo cannot be sent; the message says why."""


def prepared_photo(
    photo: Path, ctx: Context, max_bytes: int = MAX_INVOKE_BYTES
) -> tuple[bytes, str]:
    """The bytes to send and their content type: the file itself, or a smaller JPEG of it."""
    body = photo.read_bytes()
    content_type = PHOTO_CONTENT_TYPES.get(photo.suffix.lower(), "application/x-image")
    try:
        with Image.open(io.BytesIO(body)) as image:
            size = image.size
            if len(body) <= max_bytes and max(size) <= MAX_SIDE_PX:
                return body, content_type
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        if len(body) <= max_bytes:
            return body, content_type  # the endpoint says what it thinks of it
        raise PhotoError(
            f"{len(body)} bytes is over the endpoint's {max_bytes}-byte limit and it "
            f"cannot be re-encoded ({error}); use transform"
        ) from None
    upright.thumbnail((MAX_SIDE_PX, MAX_SIDE_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    upright.save(buffer, "JPEG", quality=JPEG_QUALITY)
    smaller = buffer.getvalue()
    if len(smaller) > max_bytes:
        raise PhotoError(f"still {len(smaller)} bytes after re-encoding; use transform")
    ctx.err(
        f"{photo}: re-encoded {size[0]}x{size[1]} ({len(body)} bytes) to "
        f"{upright.width}x{upright.height} JPEG q{JPEG_QUALITY} ({len(smaller)} bytes) before sending"
    )
    return smaller, "image/jpeg"


def retryable(error: Exception) -> bool:
    """Throttling and failed connections, never a read time-out (the request did arrive)."""
    if isinstance(error, ReadTimeoutError):
        return False
    if isinstance(error, BotoConnectionError):
        return True
    return isinstance(error, ClientError) and error_code(error) in THROTTLING_CODES


def invoke_with_retries(ctx: Context, endpoint: str, body: bytes, content_type: str) -> bytes:
    backoff = FIRST_BACKOFF_S
    attempt = 1
    while True:
        try:
            response = ctx.aws.runtime.invoke_endpoint(
                EndpointName=endpoint,
                Body=body,
                ContentType=content_type,
                Accept="application/json",
            )
            return response["Body"].read()
        except (ClientError, BotoCoreError) as error:
            if attempt == ATTEMPTS or not retryable(error):
                raise
        ctx.sleep(backoff)
        backoff *= 2
        attempt += 1


def endpoint_kind(ctx: Context, endpoint: str) -> tuple[str | None, int]:
    """(where an asynchronous endpoint writes its answers or None, the request size limit)."""
    try:
        config = ctx.aws.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as error:
        if is_not_found(error):
            return None, MAX_INVOKE_BYTES  # InvokeEndpoint says so, in AWS's words
        raise
    described = ctx.aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    output = (
        (described.get("AsyncInferenceConfig") or {}).get("OutputConfig", {}).get("S3OutputPath")
    )
    serverless = any("ServerlessConfig" in v for v in described["ProductionVariants"])
    return output, MAX_SERVERLESS_BYTES if serverless else MAX_INVOKE_BYTES


def read_if_there(ctx: Context, uri: str) -> bytes | None:
    bucket, key = split_s3_uri(uri)
    try:
        return ctx.aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if is_not_found(error):
            return None
        raise


def invoke_async(
    ctx: Context, args: argparse.Namespace, output: str, photo: Path, body: bytes, content_type: str
) -> bytes:
    """Queue one photo on an asynchronous endpoint and wait for its answer in S3."""
    bucket, key = split_s3_uri(join_s3(output, "inputs", f"{uuid.uuid4().hex}{photo.suffix}"))
    ctx.aws.s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    queued = ctx.aws.runtime.invoke_endpoint_async(
        EndpointName=args.endpoint,
        InputLocation=f"s3://{bucket}/{key}",
        ContentType=content_type,
        Accept="application/json",
    )
    failure_uri = queued.get("FailureLocation")

    def outcome() -> tuple[str, bytes] | None:
        answer = read_if_there(ctx, queued["OutputLocation"])
        if answer is not None:
            return "answer", answer
        failure = read_if_there(ctx, failure_uri) if failure_uri else None
        return ("failure", failure) if failure is not None else None

    kind, data = poll_until(
        outcome,
        lambda result: result is not None,
        what=f"the answer for {photo} at {queued['OutputLocation']}",
        timeout_s=args.wait_timeout,
        poll_seconds=args.poll_seconds,
        ctx=ctx,
    )
    if kind == "failure":
        raise PhotoError(f"the endpoint failed on it: {data.decode('utf-8', 'replace')[:500]}")
    return data


def parse_answer(body: bytes) -> Any:
    """The endpoint's JSON, or its text when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def describe_prediction(body: bytes) -> str:
    prediction = parse_answer(body)
    if isinstance(prediction, str):
        return prediction
    if isinstance(prediction, dict) and "predicted_species" in prediction:
        species = prediction["predicted_species"]
        runners_up = sorted(
            (
                (name, p)
                for name, p in (prediction.get("class_probabilities") or {}).items()
                if name != species
            ),
            key=lambda item: item[1],
            reverse=True,
        )[:2]
        others = ", ".join(f"{name} {p:.3f}" for name, p in runners_up)
        return f"{species} (confidence {prediction.get('confidence', 0):.3f})" + (
            f"; next: {others}" if others else ""
        )
    return json.dumps(prediction)


def add_invoke_arguments(invoke: SettingsParser) -> None:
    invoke.add_argument("photos", nargs="+", metavar="PHOTO_OR_FOLDER")
    invoke.add_argument("--endpoint", help="endpoint name")
    invoke.add_argument("--json", action="store_true", help="print each answer as one JSON line")
    add_wait_timeout(invoke, "20m", "each answer of an asynchronous endpoint")


def command_invoke(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "endpoint")
    photos = collect_photos(args.photos)
    output, max_bytes = endpoint_kind(ctx, args.endpoint)
    failures = 0
    for photo in photos:
        try:
            body, content_type = prepared_photo(photo, ctx, max_bytes)
            if output:
                answer = invoke_async(ctx, args, output, photo, body, content_type)
            else:
                answer = invoke_with_retries(ctx, args.endpoint, body, content_type)
        except PhotoError as error:
            ctx.err(f"{photo}: {error}")
            failures += 1
            continue
        except (ClientError, BotoCoreError) as error:
            ctx.err(f"{photo}: {aws_message(error)}")
            failures += 1
            continue
        if args.json:
            ctx.out(json.dumps({"photo": str(photo), "prediction": parse_answer(answer)}))
        else:
            ctx.out(f"{photo}: {describe_prediction(answer)}")
    return 1 if failures else 0


COMMANDS = [
    Command(
        "invoke",
        "send photos (files or folders) to an endpoint and print the predictions",
        add_invoke_arguments,
        command_invoke,
    )
]
