"""Where photos come from and where they go: the public bucket, an S3 prefix, a local folder.

The source bucket is read anonymously, as the open data is meant to be. An S3 destination
copies server-side, so the photo bytes never pass through this machine; but S3 signs a
CopyObject with the user's credentials, and checks their own right to read the source: a
policy that allows only the user's bucket is denied. Then the photos come through this
machine instead (an anonymous GET, then a PUT), and the log says so once.

A photo deleted since the snapshot is answered 404, or 403 when the requester may not list
the bucket (S3 then does not say whether a key exists). An anonymous HEAD tells the two
denials apart: a photo that the public bucket refuses to everyone is gone (`PhotoGone`); one
it serves to everyone was refused to the user's credentials only.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from botocore.exceptions import ClientError
from species_classifier.atomic import PARTIAL_PREFIX, atomic_write

from species_tools.aws import aws_message, is_access_denied, is_not_found, split_s3_uri
from species_tools.collector.selection import IMAGES_DIR

_log = logging.getLogger("collect_inaturalist")

IAM_POLICY = "docs/iam/collector-policy.json"


class PhotoGone(Exception):
    """The source bucket no longer serves this photo to anyone."""


class SourceBucket:
    """The public bucket, read without signing."""

    def __init__(self, client, bucket: str) -> None:
        self.client, self.bucket = client, bucket

    def is_gone(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if is_not_found(error) or is_access_denied(error):
                return True
            raise
        return False

    def check_gone(self, key: str, error: ClientError) -> None:
        """Raise PhotoGone when `error`, from a request for `key`, means the photo is gone."""
        if is_not_found(error) or (is_access_denied(error) and self.is_gone(key)):
            raise PhotoGone(f"s3://{self.bucket}/{key}") from error

    def open(self, key: str):
        """The streamed body of a photo; PhotoGone when the bucket no longer has it."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as error:
            self.check_gone(key, error)
            raise


class Destination(Protocol):
    """Where the channel goes: what is there already, one photo copy, small text files."""

    def existing(self) -> dict[str, int]: ...

    def copy_photo(self, source_key: str, name: str) -> None: ...

    def read_text(self, name: str) -> str | None: ...

    def write_text(self, name: str, text: str) -> None: ...

    def describe(self, name: str = "") -> str: ...


class S3Destination:
    """Server-side copies while the user's credentials may read the source, else GET + PUT."""

    def __init__(self, client, bucket: str, prefix: str, source: SourceBucket) -> None:
        self.client, self.bucket, self.source = client, bucket, source
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.server_side = True
        self._lock = threading.Lock()

    def existing(self) -> dict[str, int]:
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{IMAGES_DIR}/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) :]] = item["Size"]
        return found

    def copy_photo(self, source_key: str, name: str) -> None:
        if self.server_side:
            try:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.prefix + name,
                    CopySource={"Bucket": self.source.bucket, "Key": source_key},
                )
                return
            except ClientError as error:
                self.source.check_gone(source_key, error)
                if not is_access_denied(error):
                    raise
                self._copy_through_this_machine(error)
        # Photos are small (medium: at most 500 px): one read, then a PUT with its length.
        with self.source.open(source_key) as body:
            data = body.read()
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def _copy_through_this_machine(self, error: ClientError) -> None:
        with self._lock:
            if not self.server_side:
                return
            self.server_side = False
        _log.warning(
            "S3 refused a server-side copy from s3://%s to your credentials (%s): the photos "
            "now come through this machine (anonymous GET, then PUT), which is slower. For "
            "server-side copies allow s3:GetObject on arn:aws:s3:::%s/photos/* (see %s)",
            self.source.bucket, aws_message(error), self.source.bucket, IAM_POLICY,
        )  # fmt: skip

    def read_text(self, name: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        except ClientError as error:
            if is_not_found(error):
                return None
            raise
        return body.read().decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=text.encode())

    def describe(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"


class LocalDestination:
    """Anonymous downloads into a folder, for `make train-local`."""

    def __init__(self, root: Path, source: SourceBucket) -> None:
        self.root, self.source = root, source

    def existing(self) -> dict[str, int]:
        folder = self.root / IMAGES_DIR
        if not folder.is_dir():
            return {}
        # A partial file is what an interrupted write leaves: never a photo that is there.
        return {
            f"{IMAGES_DIR}/{entry.name}": entry.stat().st_size
            for entry in os.scandir(folder)
            if entry.is_file() and not entry.name.startswith(PARTIAL_PREFIX)
        }

    def copy_photo(self, source_key: str, name: str) -> None:
        with self.source.open(source_key) as body, atomic_write(self.root / name) as handle:
            for chunk in iter(lambda: body.read(1 << 16), b""):
                handle.write(chunk)

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        with atomic_write(self.root / name) as handle:
            handle.write(text.encode("utf-8"))

    def describe(self, name: str = "") -> str:
        return str(self.root / name)


def open_destination(dest: str, source: SourceBucket, target_client) -> Destination:
    if dest.startswith("s3://"):
        bucket, prefix = split_s3_uri(dest)
        return S3Destination(target_client, bucket, prefix, source)
    return LocalDestination(Path(dest), source)
