"""A local training channel to S3: a prefix unique to the folder's content, only what is missing sent.

The default prefix is `data/<folder name>-<hash of the file list and sizes>/`, so two folders
that share a name never share a prefix; a prefix that already holds objects the folder does not
have is refused, because SageMaker would hand them to the job too (a second CSV, stale photos).
The CSV rule is the container's own (`species_classifier.contract.channel`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from species_classifier.contract.channel import DatasetError, find_csv

from species_tools.aws import SettingsError, split_s3_uri

HASH_CHARACTERS = 10


def channel_files(folder: Path) -> list[Path]:
    """Every file of the channel, minus hidden ones (.DS_Store, .ipynb_checkpoints...)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def content_name(folder: Path, files: list[Path]) -> str:
    """`<folder name>-<hash>`: the hash covers each file's relative path and size."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\n".encode())
    return f"{folder.resolve().name}-{digest.hexdigest()[:HASH_CHARACTERS]}"


def check_channel_csv(folder: Path, csv_file: str | None) -> None:
    """The container's own CSV rule, so a folder it would refuse never leaves the laptop."""
    try:
        find_csv(folder, csv_file)
    except DatasetError as error:
        raise SettingsError(f"--data {folder}: {error}") from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def already_uploaded(path: Path, remote: tuple[int, str] | None) -> bool:
    if remote is None or remote[0] != path.stat().st_size:
        return False
    etag = remote[1]
    # A multipart or KMS ETag is no MD5: same key and size is then the best cheap evidence.
    if "-" in etag or not re.fullmatch(r"[0-9a-f]{32}", etag):
        return "-" in etag
    return etag == file_md5(path)


def list_objects(s3: Any, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key -> (size, ETag) of every object under the prefix, folder markers left out."""
    found: dict[str, tuple[int, str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found[item["Key"]] = (item["Size"], item["ETag"].strip('"'))
    return found


def upload_channel(
    s3: Any, folder: Path, files: list[Path], destination: str, out: Callable[[str], None]
) -> None:
    """Copy the channel's files under an S3 prefix that holds nothing else, skipping those there."""
    bucket, prefix = split_s3_uri(destination)
    existing = list_objects(s3, bucket, prefix)

    def key_of(path: Path) -> str:
        return prefix + path.relative_to(folder).as_posix()

    strangers = sorted(set(existing) - {key_of(path) for path in files})
    if strangers:
        raise SettingsError(
            f"{destination} already holds {len(strangers)} objects that {folder} does not have "
            f"(e.g. {strangers[0]}); the job would get them too. Upload to an empty prefix "
            "(leave out --upload-to for one named after the folder's content) or remove them"
        )
    pending = [path for path in files if not already_uploaded(path, existing.get(key_of(path)))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(s3.upload_file, str(p), bucket, key_of(p)) for p in pending]:
            future.result()
    out(
        f"data: uploaded {len(pending)} files to {destination} "
        f"({len(files) - len(pending)} already there)"
    )
