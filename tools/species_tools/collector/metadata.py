"""The open data's four metadata files, streamed one row at a time from the bucket or a folder.

`taxa`, `observations`, `photos` and `observers` `.csv.gz` sit at the bucket root: gzip,
tab-separated, no quoting at all (names keep their quotes). The larger ones are gigabytes,
so nothing is held whole, and a connection that drops in the middle of one is picked up at
the byte where it stopped (a ranged GET), not read again from the start.
"""

from __future__ import annotations

import gzip
import io
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from botocore.exceptions import BotoCoreError, ClientError

from species_tools.aws import aws_message, error_code
from species_tools.collector import CollectError
from species_tools.collector.settings import SOURCE_BUCKET

_log = logging.getLogger("collect_inaturalist")

LAYOUT_DOCS = "https://github.com/inaturalist/inaturalist-open-data/tree/main/Metadata"
TAXA, OBSERVATIONS = "taxa.csv.gz", "observations.csv.gz"
PHOTOS, OBSERVERS = "photos.csv.gz", "observers.csv.gz"
FILES = (TAXA, OBSERVATIONS, PHOTOS, OBSERVERS)
PROGRESS_SECONDS = 15.0
# Drops in a row, without a byte read in between, before a scan gives up.
RESUME_ATTEMPTS = 5


class ResumableObject(io.RawIOBase):
    """One S3 object read front to back; a dropped connection resumes where it stopped.

    The resumed request asks for the rest (`Range: bytes=N-`) of the same version of the
    object (`If-Match` its ETag): the monthly snapshot replacing the file in the meantime
    fails clearly instead of splicing two snapshots together.
    """

    def __init__(self, client, bucket: str, key: str, etag: str = "") -> None:
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.position = 0
        self.etag = etag  # known beforehand when a scan reads one snapshot throughout
        self.body = self._request()

    def _request(self):
        params = {"Bucket": self.bucket, "Key": self.key}
        if self.etag:
            params["IfMatch"] = self.etag
        if self.position:
            params["Range"] = f"bytes={self.position}-"
        try:
            response = self.client.get_object(**params)
        except ClientError as error:
            if error_code(error) in ("PreconditionFailed", "412"):
                raise CollectError(
                    f"s3://{self.bucket}/{self.key} was replaced (a new snapshot) since this "
                    "scan started: run again to scan the new one"
                ) from None
            raise
        self.etag = self.etag or response["ETag"]
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        drops = 0
        while True:
            try:
                data = self.body.read(len(buffer))
            except (BotoCoreError, OSError) as error:
                drops += 1
                if drops == RESUME_ATTEMPTS:
                    raise
                _log.warning(
                    "%s: the connection dropped at byte %s (%s); resuming from there",
                    self.key, f"{self.position:,}", error,
                )  # fmt: skip
                self.body.close()
                time.sleep(0.1 * 2**drops)
                self.body = self._request()
                continue
            buffer[: len(data)] = data
            self.position += len(data)
            return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


class MetadataSource:
    """The four metadata files, streamed from the source bucket or a local folder."""

    def __init__(self, client, bucket: str, folder: str | None) -> None:
        self.client, self.bucket, self.folder = client, bucket, folder
        self.versions: dict[str, str] = {}

    def describe(self, name: str) -> str:
        return str(Path(self.folder) / name) if self.folder else f"s3://{self.bucket}/{name}"

    def snapshot(self) -> dict[str, str]:
        """Which version of each file a scan reads: the ETag in S3 (every later GET asks for
        that one), the size and modification time of a local file."""
        self.versions = {name: self._version(name) for name in FILES}
        return self.versions

    def _version(self, name: str) -> str:
        if self.folder:
            try:
                found = (Path(self.folder) / name).stat()
            except OSError as error:
                raise self._unreadable_file(name, error) from None
            return f"{found.st_size}:{found.st_mtime_ns}"
        try:
            return self.client.head_object(Bucket=self.bucket, Key=name)["ETag"]
        except ClientError as error:
            raise self._unreadable_object(name, error) from None

    def _unreadable_file(self, name: str, error: OSError) -> CollectError:
        path = Path(self.folder or "") / name
        return CollectError(
            f"cannot read {path}: {error.strerror or error}; download it with "
            f"aws s3 cp --no-sign-request s3://{SOURCE_BUCKET}/{name} {path}"
        )

    def _unreadable_object(self, name: str, error: ClientError) -> CollectError:
        return CollectError(
            f"cannot read {self.describe(name)}: {aws_message(error)}; check the bucket "
            f"name and the layout at {LAYOUT_DOCS}"
        )

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        if self.folder:
            try:
                handle = (Path(self.folder) / name).open("rb")
            except OSError as error:
                raise self._unreadable_file(name, error) from None
            with handle:
                yield handle
            return
        try:
            stream = ResumableObject(self.client, self.bucket, name, self.versions.get(name, ""))
        except ClientError as error:
            raise self._unreadable_object(name, error) from None
        with stream:
            # Large reads: gzip asks for 128 KiB at a time, and so does each resumed GET.
            yield io.BufferedReader(stream, buffer_size=1 << 20)

    def rows(self, name: str, columns: Sequence[str]) -> Iterator[list[str]]:
        """The named columns of every data row, one row at a time: nothing is held whole."""
        read = 0
        try:
            with self._open(name) as raw:
                text = io.TextIOWrapper(
                    gzip.GzipFile(fileobj=raw), encoding="utf-8", errors="replace", newline="\n"
                )
                header = text.readline().rstrip("\r\n").split("\t")
                missing = [c for c in columns if c not in header]
                if missing:
                    raise CollectError(
                        f"{self.describe(name)} lacks the column(s) {', '.join(missing)} "
                        f"(it has {', '.join(header)}): the open-data layout may have changed; "
                        f"compare with {LAYOUT_DOCS}"
                    )
                picks = [header.index(c) for c in columns]
                width = max(picks) + 1
                started = last_report = time.monotonic()
                for line in text:
                    # No quoting at all (names may contain quotes): a plain split is exact.
                    cells = line.rstrip("\r\n").split("\t")
                    if len(cells) < width:
                        continue
                    read += 1
                    yield [cells[i] for i in picks]
                    if read % 100_000 == 0 and time.monotonic() - last_report > PROGRESS_SECONDS:
                        last_report = time.monotonic()
                        _log.info(
                            "%s: %s rows read (%.0f s)", name, f"{read:,}", last_report - started
                        )
        except (BotoCoreError, ClientError, OSError, EOFError) as error:
            raise CollectError(
                f"reading {self.describe(name)} failed after {read:,} rows: {aws_message(error)}; "
                "run again, or download the file with `aws s3 cp --no-sign-request` and pass "
                "--metadata-dir"
            ) from None
        _log.info("%s: %s rows", name, f"{read:,}")
