"""Copying the selected photos, many at once, and sorting out what did not arrive.

Three outcomes per photo: copied, gone from the bucket since the snapshot (`PhotoGone`:
listed, left out of the CSV), or failed (anything else: a rerun retries it). A few gone
photos are normal; more than `max_missing_percent` of the selection gone means something
else is wrong (a source that refuses this machine, the wrong bucket), so the run stops.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from species_tools.aws import aws_message
from species_tools.collector.destination import Destination, PhotoGone
from species_tools.collector.selection import IMAGES_DIR, Photo
from species_tools.collector.settings import Settings

_log = logging.getLogger("collect_inaturalist")

PROGRESS_SECONDS = 15.0


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    missing: list[Photo] = field(default_factory=list)
    failed: list[tuple[Photo, str]] = field(default_factory=list)

    def too_many_missing(self, selected: int, percent: float) -> bool:
        return len(self.missing) > selected * percent / 100


def copy_photos(settings: Settings, photos: list[Photo], dest: Destination) -> CopyReport:
    report = CopyReport()
    existing = dest.existing()
    todo = [p for p in photos if existing.get(p.image_name, 0) <= 0]
    report.skipped = len(photos) - len(todo)
    _log.info(
        "copying %d photo(s) to %s (%d already there) with %d workers",
        len(todo), dest.describe(IMAGES_DIR), report.skipped, settings.workers,
    )  # fmt: skip
    started = last_report = time.monotonic()

    def copy(photo: Photo) -> None:
        dest.copy_photo(photo.source_key(settings.photo_size), photo.image_name)

    pool = ThreadPoolExecutor(max_workers=settings.workers)
    try:
        futures = {pool.submit(copy, photo): photo for photo in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            photo = futures[future]
            try:
                future.result()
                report.copied += 1
            except PhotoGone:
                report.missing.append(photo)
            except (ClientError, BotoCoreError, OSError) as error:
                report.failed.append((photo, aws_message(error)))
            if time.monotonic() - last_report > PROGRESS_SECONDS or done == len(todo):
                last_report = time.monotonic()
                _log.info(
                    "copied %d/%d (missing at source %d, failed %d, %.0f s)",
                    report.copied, len(todo), len(report.missing), len(report.failed),
                    last_report - started,
                )  # fmt: skip
    finally:
        # On Ctrl-C, queued copies are dropped and running ones finish: whatever is at the
        # destination is whole, and the next run copies the rest.
        pool.shutdown(wait=True, cancel_futures=True)
    report.missing.sort(key=lambda p: p.photo_id)
    return report
