"""The `collect-inaturalist` command: select (or reuse the saved plan), copy, write the CSV.

Resuming: a scan interrupted part-way resumes after its last finished pass (scan_progress);
the selection is saved at the destination (`collect_inaturalist.plan.json`) and
reused while the selection settings are unchanged; photos already at the destination are not
copied again (every write is whole or absent); the CSV is written last and in one piece, so
it exists only once every selected photo is in place or known to be gone.

Exit status: 0 done, 1 copies failed or too many photos gone (a rerun retries), 2 wrong
settings or metadata, 130 interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from species_classifier.contract.channel import REQUIRED_COLUMNS
from species_classifier.contract.hyperparameters import TrainingConfig

from species_tools.aws import SettingsError, aws_message
from species_tools.collector import CollectError
from species_tools.collector.copying import CopyReport, copy_photos
from species_tools.collector.destination import (
    IAM_POLICY,
    Destination,
    SourceBucket,
    open_destination,
)
from species_tools.collector.metadata import MetadataSource
from species_tools.collector.scan_progress import ScanProgress, progress_folder
from species_tools.collector.selection import (
    LISTED_SPECIES,
    Photo,
    Selection,
    largest_others,
    select_photos,
)
from species_tools.collector.settings import OTHER, SOURCE_REGION, Settings, load_settings, plain

_log = logging.getLogger("collect_inaturalist")

PLAN_NAME = "collect_inaturalist.plan.json"
# Attribution sits next to the licence: every CC-BY licence asks to credit the photographer.
CSV_COLUMNS = (
    *REQUIRED_COLUMNS,
    "observation_uuid",
    "photo_id",
    "license",
    "observer_login",
    "observer_name",
    "observer_id",
)
# train's default k_folds: a class with fewer photos than this fails a default training job.
SCARCE = TrainingConfig.k_folds
LISTED = 20


def _say(line: str) -> None:
    # The summary is the command's output, on stdout; progress is logged to stderr.
    print(line)  # noqa: T201


def _err(message: str) -> None:
    print(f"collect-inaturalist: {message}", file=sys.stderr)  # noqa: T201


def make_clients(settings: Settings):
    """(anonymous client for the public bucket, the user's client for the destination).

    Both honour AWS_ENDPOINT_URL, which is how the tests point them at a local S3.
    """
    pool = settings.workers + 4
    retries = {"max_attempts": 8, "mode": "adaptive"}
    source = boto3.client(
        "s3",
        region_name=SOURCE_REGION,
        config=Config(signature_version=UNSIGNED, max_pool_connections=pool, retries=retries),
    )
    target = boto3.client("s3", config=Config(max_pool_connections=pool, retries=retries))
    return source, target


def load_or_select(settings: Settings, dest: Destination, metadata: MetadataSource) -> Selection:
    fingerprint = settings.selection_fingerprint()
    saved = dest.read_text(PLAN_NAME)
    if saved and not settings.rescan:
        plan = json.loads(saved)
        if plan.get("fingerprint") == fingerprint:
            _log.info(
                "reusing the selection in %s (%d photos); --rescan scans the metadata again",
                dest.describe(PLAN_NAME), len(plan["photos"]),
            )  # fmt: skip
            return Selection([Photo(**row) for row in plan["photos"]], Counter(plan["dropped"]))
        _log.info(
            "the settings (or this collector's plan format) changed since %s was saved: "
            "scanning again", PLAN_NAME,
        )  # fmt: skip
    progress = ScanProgress(progress_folder(), settings.dest, fingerprint, metadata.snapshot())
    selection = select_photos(settings, metadata, progress)
    plan = {
        "fingerprint": fingerprint,
        "settings": {k: plain(v) for k, v in dataclasses.asdict(settings).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dropped": dict(selection.dropped),
        "per_species": dict(Counter(p.species_name for p in selection.photos).most_common()),
        "photos": [dataclasses.asdict(p) for p in selection.photos],
    }
    dest.write_text(PLAN_NAME, json.dumps(plan))
    progress.discard()
    return selection


def csv_text(photos: list[Photo]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for photo in photos:
        writer.writerow([getattr(photo, column) for column in CSV_COLUMNS])
    return buffer.getvalue()


def run(settings: Settings, source_client, target_client) -> int:
    """Select, copy and write the CSV; return the exit status."""
    source = SourceBucket(source_client, settings.source_bucket)
    dest = open_destination(settings.dest, source, target_client)
    metadata = MetadataSource(source_client, settings.source_bucket, settings.metadata_dir)
    selection = load_or_select(settings, dest, metadata)
    photos = selection.photos
    if not photos:
        raise CollectError(
            "no photo matched the settings: widen the boxes, grades or licences, or check "
            "the species names"
        )
    if settings.select_only:
        _print_dropped(selection)
        _print_counts("selected", settings, photos)
        _say(f"plan saved to {dest.describe(PLAN_NAME)}; run again without --select-only")
        return 0
    report = copy_photos(settings, photos, dest)
    too_many_missing = report.too_many_missing(len(photos), settings.max_missing_percent)
    missing = {p.photo_id for p in report.missing}
    kept = [p for p in photos if p.photo_id not in missing]
    if not report.failed and not too_many_missing:
        dest.write_text(settings.csv_name, csv_text(kept))
    _say("Summary")
    _print_dropped(selection)
    _print_copies(settings, dest, kept, report, too_many_missing)
    return 1 if report.failed or too_many_missing else 0


def _print_dropped(selection: Selection) -> None:
    if selection.dropped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(selection.dropped.items()))
        _say(f"  left out while selecting: {reasons}")


def _print_counts(heading: str, settings: Settings, photos: list[Photo]) -> None:
    per_species = Counter(p.species_name for p in photos)
    per_class = Counter(dict.fromkeys(settings.targets, 0))
    per_class.update(
        p.species_name if p.species_name in settings.targets else OTHER for p in photos
    )
    _say(f"{heading}: {len(photos)} photos")
    _say("  per class (as train labels them with target_species = the targets):")
    for name in sorted(per_class):
        _say(f"    {name:<32} {per_class[name]:>7}")
    scarce = [name for name, count in sorted(per_class.items()) if count < SCARCE]
    if scarce:
        _say(
            f"  warning: fewer than {SCARCE} photos for {', '.join(scarce)}: train needs at "
            "least k_folds (default 3) per class; widen the boxes or grades, or lower k_folds"
        )
    _say(f"  per species ({len(per_species):,}):")
    for name in sorted(n for n in per_species if settings.group_of(n) != OTHER):
        role = "target" if name in settings.targets else "look-alike"
        _say(f"    {name:<32} {per_species[name]:>7}  ({role})")
    others = largest_others(per_species, settings)
    for name, count in others[:LISTED_SPECIES]:
        _say(f"    {name:<32} {count:>7}  ({OTHER})")
    if len(others) > LISTED_SPECIES:
        rest = others[LISTED_SPECIES:]
        _say(
            f"    ... and {len(rest):,} more {OTHER} species ({sum(c for _, c in rest):,} "
            f"photos): {PLAN_NAME} counts every species under per_species"
        )


def _print_copies(
    settings: Settings,
    dest: Destination,
    kept: list[Photo],
    report: CopyReport,
    too_many_missing: bool,
) -> None:
    _say(
        f"  copied now {report.copied}, already there {report.skipped}, "
        f"missing at source {len(report.missing)}, failed {len(report.failed)}"
    )
    for photo in report.missing[:LISTED]:
        _say(f"  missing at source: s3://{settings.source_bucket}/"
              f"{photo.source_key(settings.photo_size)} (left out of the CSV)")  # fmt: skip
    if len(report.missing) > LISTED:
        _say(f"  ... and {len(report.missing) - LISTED} more missing at source")
    for photo, reason in report.failed[:10]:
        _say(f"  failed: photo {photo.photo_id}: {reason}")
    if report.failed:
        _say(
            f"  {len(report.failed)} copies failed, so no CSV was written: run the same "
            "command again to retry them (nothing already copied is copied twice); an "
            f"AccessDenied means your credentials lack a permission listed in {IAM_POLICY}"
        )
        return
    if too_many_missing:
        share = 100 * len(report.missing) / (len(kept) + len(report.missing))
        _say(
            f"  {len(report.missing)} photos ({share:.1f}%) are missing at source, more than "
            f"max_missing_percent = {settings.max_missing_percent:g}, so no CSV was written: "
            f"check that s3://{settings.source_bucket} is the open-data bucket and is readable "
            "from here without credentials, then run again; or allow more with "
            "--max-missing-percent"
        )
        return
    _print_counts(f"wrote {dest.describe(settings.csv_name)}", settings, kept)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    _log.setLevel(logging.INFO)
    try:
        settings = load_settings(argv)
        source_client, target_client = make_clients(settings)
        return run(settings, source_client, target_client)
    except (SettingsError, CollectError) as error:
        _err(f"error: {error}")
        return 2
    except (ClientError, BotoCoreError) as error:
        _err(f"AWS error: {aws_message(error)}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted; run the same command again to go on where it stopped")
        return 130
