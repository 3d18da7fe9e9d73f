"""What the finished passes of a scan found, kept on this machine until the plan is saved.

On the full snapshot the five passes take tens of minutes; a Ctrl-C or a crash in the
fourth would otherwise start the first again. After each pass the selection writes what it needs
from the passes so far to one file per destination, whole or not at all (a kill mid-write
leaves the previous pass's file). The file is keyed by the selection settings and the
version of each metadata file: a changed setting or a new monthly snapshot starts over.
It lives in `$XDG_CACHE_HOME/collect-inaturalist` (`~/.cache/collect-inaturalist`), not at
the destination, which may be the training channel that SageMaker downloads whole, and it
is removed once the plan is saved.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

from species_classifier.atomic import atomic_write

_log = logging.getLogger("collect_inaturalist")


def progress_folder() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "collect-inaturalist"


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class ScanProgress:
    """The saved passes of the scan for one destination, under one settings-and-snapshot key."""

    def __init__(self, folder: Path, dest: str, fingerprint: str, versions: dict[str, str]):
        self.path = folder / f"scan-{_digest(dest)}.json.gz"
        self.key = _digest({"settings": fingerprint, "metadata": versions})

    def load(self) -> dict | None:
        """What the finished passes found, when saved under this key; else None."""
        try:
            saved = json.loads(gzip.decompress(self.path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, EOFError, ValueError) as error:
            _log.warning("cannot read %s (%s): scanning from the start", self.path, error)
            return None
        if saved.get("key") != self.key:
            _log.info(
                "the settings or the metadata snapshot changed since the interrupted scan "
                "saved in %s: scanning from the start", self.path,
            )  # fmt: skip
            return None
        return saved["scan"]

    def save(self, scan: dict) -> None:
        """Keep `scan` whole or not at all; a full disk costs the resume, not the run."""
        try:
            with (
                atomic_write(self.path) as handle,
                gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=1) as packed,
            ):
                packed.write(json.dumps({"key": self.key, "scan": scan}).encode())
        except OSError as error:
            _log.warning(
                "cannot save the scan's progress to %s (%s): an interruption now restarts "
                "the scan", self.path, error.strerror or error,
            )  # fmt: skip

    def discard(self) -> None:
        """Remove the file once the plan holds the selection; one left behind is only space."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            _log.warning("cannot remove %s (%s)", self.path, error.strerror or error)
