#!/usr/bin/env python3
"""Collect a training channel from iNaturalist's open data: the CSV and photos `train` reads.

This script owns the path from the public `inaturalist-open-data` S3 bucket to a training
channel. It streams the bucket's metadata (`taxa.csv.gz`, `observations.csv.gz`,
`photos.csv.gz`: tab-separated, gzip, unquoted, at the bucket root), picks photos by species,
bounding box, quality grade and licence, caps each class with a seeded choice, copies
`photos/<photo_id>/<size>.<extension>` server-side to an S3 prefix or down to a local folder
as `images/<photo_id>.<extension>`, and writes the CSV next to `images/`.

What is selected:
- targets and look-alikes: observations inside `species_box` of those species (or of a taxon
  below one, such as a subspecies), each labelled with its species name;
- other: observations inside `other_box` of any other taxon ranked species, labelled with
  their own species name;
- photos attached to more than one observation are dropped; of each observation the first
  `photos_per_observation` photos by position are kept.
The CSV keeps every real species name. Folding non-targets into `other` is the trainer's job
(its `target_species` hyperparameter), so one collection serves any choice of targets.

Resuming: the selection is saved at the destination (`collect_inaturalist.plan.json`) and
reused while the selection settings are unchanged; photos already at the destination are not
copied again (every write is atomic, so what exists is whole); the CSV is written last and in
one piece, so it exists only once every selected photo is in place.

Usage: scripts/collect_inaturalist.py --config scripts/collect_inaturalist.example.toml \
           --dest s3://my-bucket/inaturalist/training      (or --dest local/inaturalist)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

_log = logging.getLogger("collect_inaturalist")

SOURCE_BUCKET = "inaturalist-open-data"
SOURCE_REGION = "us-east-1"
LAYOUT_DOCS = "https://github.com/inaturalist/inaturalist-open-data/tree/main/Metadata"
TAXA, OBSERVATIONS, PHOTOS = "taxa.csv.gz", "observations.csv.gz", "photos.csv.gz"
PLAN_NAME = "collect_inaturalist.plan.json"
IMAGES_DIR = "images"
OTHER = "other"
SPECIES_RANK_LEVEL = 10.0
PHOTO_SIZES = ("original", "large", "medium", "small", "thumb", "square")
QUALITY_GRADES = ("research", "needs_id", "casual")
CSV_COLUMNS = (
    "species_name",
    "image_name",
    "observation_uuid",
    "photo_id",
    "license",
    "observer_id",
)
# S3 answers a copy or a get of a photo that is gone with one of these: the metadata can
# name photos that were deleted since the snapshot (the dataset's README says so).
MISSING_CODES = ("NoSuchKey", "404", "NotFound")
PROGRESS_SECONDS = 15.0
# train's default k_folds: a class with fewer photos than this fails a default training job.
SCARCE = 3


class CollectError(Exception):
    """The collection cannot go on; the message says what was wrong and what to do."""


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def contains(self, lat: float, lon: float) -> bool:
        return self.lat_min <= lat <= self.lat_max and self.lon_min <= lon <= self.lon_max


@dataclass(frozen=True)
class Settings:
    dest: str
    targets: tuple[str, ...]
    species_box: Box
    other_box: Box
    lookalikes: tuple[str, ...] = ()
    quality_grades: tuple[str, ...] = ("research",)
    licenses: tuple[str, ...] = ()
    max_per_class: int = 0
    caps: dict[str, int] = field(default_factory=dict)
    photos_per_observation: int = 1
    photo_size: str = "medium"
    seed: int = 0
    source_bucket: str = SOURCE_BUCKET
    metadata_dir: str | None = None
    csv_name: str = "inaturalist.csv"
    workers: int = 16
    rescan: bool = False
    select_only: bool = False

    def cap_for(self, group: str) -> int:
        """Most photos for a cap group (a target, a look-alike or `other`); 0 means no cap."""
        return self.caps.get(group, self.max_per_class)

    def selection_fingerprint(self) -> str:
        """What decides the selection; a plan made under other values is not reused."""
        keys = (
            "targets", "lookalikes", "species_box", "other_box", "quality_grades", "licenses",
            "max_per_class", "caps", "photos_per_observation", "photo_size", "seed",
            "source_bucket",
        )  # fmt: skip
        values = {key: _plain(getattr(self, key)) for key in keys}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


REQUIRED = ("dest", "targets", "species_box", "other_box")
# What a config file may set: everything but the switches that only make sense per run.
KNOWN = tuple(
    f.name for f in dataclasses.fields(Settings) if f.name not in ("rescan", "select_only")
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Collect iNaturalist open-data photos into a training channel.",
        epilog="Flags override the config file. Lists are comma-separated. "
        "Example config: scripts/collect_inaturalist.example.toml",
    )
    add = parser.add_argument
    add("--config", type=Path, help="TOML file with any of the settings below")
    add("--dest", help="s3://bucket/prefix (server-side copies) or a local folder (downloads)")
    add("--targets", help="species to tell apart, e.g. 'Acer rubrum,Zenaida macroura'")
    add("--lookalikes", help="similar species collected from species_box into the CSV")
    add("--species-box", help="LAT_MIN,LAT_MAX,LON_MIN,LON_MAX for targets and look-alikes")
    add("--other-box", help="LAT_MIN,LAT_MAX,LON_MIN,LON_MAX for every other species")
    add("--quality-grades", help=f"observation grades to keep, of {', '.join(QUALITY_GRADES)}")
    add("--licenses", help="photo licences to keep, e.g. CC0,CC-BY (default: all)")
    add("--max-per-class", type=int, help="cap for each target, look-alike and other (0: none)")
    add("--cap", action="append", metavar="NAME=N", help="cap for one group (repeatable)")
    add("--photos-per-observation", type=int, help="photos kept per observation (0: all)")
    add("--photo-size", choices=PHOTO_SIZES, help="which stored size to copy (default medium)")
    add("--seed", type=int, help="seed of the capped choice")
    add("--source-bucket", help=f"bucket with photos and metadata (default {SOURCE_BUCKET})")
    add("--metadata-dir", help="read the three .csv.gz files from this folder instead of S3")
    add("--csv-name", help="name of the CSV at the destination (default inaturalist.csv)")
    add("--workers", type=int, help="concurrent copies (default 16)")
    add("--rescan", action="store_true", help="scan the metadata even if a plan exists")
    add("--select-only", action="store_true", help="scan and save the plan, copy nothing")
    return parser


def load_settings(argv: Sequence[str] | None) -> Settings:
    args = build_parser().parse_args(argv)
    values: dict[str, object] = {}
    if args.config:
        values.update(_read_config(args.config))
    flags = {
        k: v for k, v in vars(args).items() if v is not None and v is not False and k != "config"
    }
    caps = dict(values.get("caps") or {})
    for item in flags.pop("cap", []):
        name, _, number = item.rpartition("=")
        if not name.strip():
            raise CollectError(f"--cap {item!r} is not NAME=N, e.g. --cap 'Acer saccharum=200'")
        caps[name.strip()] = number
    if caps:
        values["caps"] = caps
    values.update(flags)
    missing = [name for name in REQUIRED if not values.get(name)]
    if missing:
        listed = ", ".join(missing)
        flag_names = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise CollectError(
            f"missing settings: {listed}; give them as flags ({flag_names}) or in --config "
            "FILE (see scripts/collect_inaturalist.example.toml)"
        )
    return _validate(values)


def _read_config(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise CollectError(f"cannot read config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise CollectError(f"config {path} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(KNOWN))
    if unknown:
        raise CollectError(
            f"config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}"
        )
    return data


def _validate(values: dict[str, object]) -> Settings:
    targets = _names(values["targets"], "targets")
    lookalikes = _names(values.get("lookalikes", ()), "lookalikes")
    if OTHER in targets + lookalikes:
        raise CollectError("'other' is not a species: the trainer names everything else so")
    both = sorted(set(targets) & set(lookalikes))
    if both:
        raise CollectError(f"{', '.join(both)} is both a target and a look-alike: keep one")
    grades = tuple(g.lower() for g in _names(values.get("quality_grades", "research"), "grades"))
    bad = [g for g in grades if g not in QUALITY_GRADES]
    if bad:
        raise CollectError(f"quality grade(s) {bad} unknown: use {', '.join(QUALITY_GRADES)}")
    caps = {str(k): _count(v, f"cap for {k!r}") for k, v in dict(values.get("caps", {})).items()}
    groups = set(targets) | set(lookalikes) | {OTHER}
    stray = sorted(set(caps) - groups)
    if stray:
        raise CollectError(
            f"caps for {', '.join(stray)}: not a target, look-alike or 'other'; "
            f"cap one of: {', '.join(sorted(groups))}"
        )
    csv_name = str(values.get("csv_name", "inaturalist.csv"))
    if not csv_name.endswith(".csv") or "/" in csv_name:
        raise CollectError(f"csv_name {csv_name!r} must be a file name ending in .csv")
    photo_size = str(values.get("photo_size", "medium"))
    if photo_size not in PHOTO_SIZES:
        raise CollectError(f"photo_size {photo_size!r} is not one of {', '.join(PHOTO_SIZES)}")
    workers = _count(values.get("workers", 16), "workers")
    if workers < 1:
        raise CollectError("workers must be at least 1")
    metadata_dir = values.get("metadata_dir") or None
    return Settings(
        dest=str(values["dest"]),
        targets=targets,
        lookalikes=lookalikes,
        species_box=_box(values["species_box"], "species_box"),
        other_box=_box(values["other_box"], "other_box"),
        quality_grades=grades,
        licenses=tuple(x.upper() for x in _names(values.get("licenses", ()), "licenses")),
        max_per_class=_count(values.get("max_per_class", 0), "max_per_class"),
        caps=caps,
        photos_per_observation=_count(values.get("photos_per_observation", 1), "photos per obs"),
        photo_size=photo_size,
        seed=_count(values.get("seed", 0), "seed"),
        source_bucket=str(values.get("source_bucket", SOURCE_BUCKET)),
        metadata_dir=str(metadata_dir) if metadata_dir else None,
        csv_name=csv_name,
        workers=workers,
        rescan=bool(values.get("rescan", False)),
        select_only=bool(values.get("select_only", False)),
    )


def _names(value: object, what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise CollectError(f"{what} must be a list of names or a comma-separated string")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _count(value: object, what: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise CollectError(f"{what} = {value!r} is not a whole number") from None
    if number < 0:
        raise CollectError(f"{what} = {number} must not be negative (0 means no limit)")
    return number


def _box(value: object, what: str) -> Box:
    keys = ("lat_min", "lat_max", "lon_min", "lon_max")
    if isinstance(value, dict):
        parts = [value.get(key) for key in keys]
    elif isinstance(value, str):
        parts = value.split(",")
    else:
        parts = list(value) if isinstance(value, list | tuple) else []
    try:
        box = Box(*(float(p) for p in parts)) if len(parts) == 4 else None
    except (TypeError, ValueError):
        box = None
    if box is None or not (box.lat_min < box.lat_max and box.lon_min < box.lon_max):
        raise CollectError(
            f"{what} = {value!r} is not a box: give LAT_MIN,LAT_MAX,LON_MIN,LON_MAX with each "
            "minimum below its maximum, e.g. 39.19,39.37,-76.71,-76.52"
        )
    return box


# --- metadata -------------------------------------------------------------------------------


class MetadataSource:
    """The three metadata files, streamed from the source bucket or a local folder."""

    def __init__(self, client, bucket: str, folder: str | None) -> None:
        self.client, self.bucket, self.folder = client, bucket, folder

    def describe(self, name: str) -> str:
        return str(Path(self.folder) / name) if self.folder else f"s3://{self.bucket}/{name}"

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        if self.folder:
            path = Path(self.folder) / name
            try:
                handle = path.open("rb")
            except OSError as error:
                raise CollectError(
                    f"cannot read {path}: {error.strerror or error}; download it with "
                    f"aws s3 cp --no-sign-request s3://{SOURCE_BUCKET}/{name} {path}"
                ) from None
            with handle:
                yield handle
            return
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
        except ClientError as error:
            raise CollectError(
                f"cannot read {self.describe(name)}: {aws_message(error)}; check the bucket "
                f"name and the layout at {LAYOUT_DOCS}"
            ) from None
        try:
            yield body
        finally:
            body.close()

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
                    # The files are tab-separated without any quoting (names may contain
                    # quotes), so a plain split is the exact parse.
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
        except (BotoCoreError, OSError, EOFError) as error:
            raise CollectError(
                f"reading {self.describe(name)} failed after {read:,} rows: {error}; run again, "
                "or download the file with `aws s3 cp --no-sign-request` and pass --metadata-dir"
            ) from None
        _log.info("%s: %s rows", name, f"{read:,}")


# --- selection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One selected photo and its provenance: a row of the plan and of the CSV."""

    species_name: str
    photo_id: int
    extension: str
    observation_uuid: str
    license: str
    observer_id: str

    @property
    def image_name(self) -> str:
        return f"{IMAGES_DIR}/{self.photo_id}.{self.extension}"

    def source_key(self, size: str) -> str:
        return f"photos/{self.photo_id}/{size}.{self.extension}"


@dataclass
class Selection:
    photos: list[Photo]
    dropped: Counter = field(default_factory=Counter)


def select_photos(settings: Settings, metadata: MetadataSource) -> Selection:
    """Three streamed passes: taxa -> observations in the boxes -> their photos."""
    chosen = _chosen_taxa(settings, metadata)
    labels, other_taxa = _observations(settings, metadata, chosen)
    other_names = _species_names(metadata, set(other_taxa.values()))
    for uuid, taxon_id in other_taxa.items():
        if taxon_id in other_names:
            labels[uuid] = other_names[taxon_id]
    _log.info(
        "observations selected: %s",
        ", ".join(f"{name} {count}" for name, count in sorted(Counter(labels.values()).items())),
    )
    return _photos(settings, metadata, labels)


def _chosen_taxa(settings: Settings, metadata: MetadataSource) -> dict[int, str]:
    """taxon_id -> species name for the targets, the look-alikes and every taxon below one."""
    wanted = set(settings.targets) | set(settings.lookalikes)
    chosen: dict[int, str] = {}
    below_species: list[tuple[int, str]] = []
    columns = ("taxon_id", "ancestry", "rank_level", "rank", "name")
    for taxon_id, ancestry, rank_level, rank, name in metadata.rows(TAXA, columns):
        if not taxon_id.isdigit():
            continue
        if rank == "species":
            if name in wanted:
                chosen[int(taxon_id)] = name
        elif _rank_level(rank_level) < SPECIES_RANK_LEVEL:
            below_species.append((int(taxon_id), ancestry))
    missing = sorted(wanted - set(chosen.values()))
    if missing:
        raise CollectError(
            f"no taxon of rank species named {', '.join(map(repr, missing))} in "
            f"{metadata.describe(TAXA)}: check the spelling against iNaturalist's scientific name"
        )
    species_ids = dict(chosen)
    for taxon_id, ancestry in below_species:
        for ancestor in ancestry.split("/"):
            if ancestor.isdigit() and int(ancestor) in species_ids:
                chosen[taxon_id] = species_ids[int(ancestor)]
                break
    return chosen


def _rank_level(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _observations(
    settings: Settings, metadata: MetadataSource, chosen: dict[int, str]
) -> tuple[dict[str, str], dict[str, int]]:
    """(observation -> species name for targets and look-alikes, observation -> taxon for
    the candidates of `other`): in the right box, of a kept quality grade."""
    labelled: dict[str, str] = {}
    other_taxa: dict[str, int] = {}
    grades = set(settings.quality_grades)
    columns = ("observation_uuid", "latitude", "longitude", "taxon_id", "quality_grade")
    for uuid, lat_text, lon_text, taxon_text, grade in metadata.rows(OBSERVATIONS, columns):
        if grade not in grades or not taxon_text:
            continue
        try:
            lat, lon, taxon_id = float(lat_text), float(lon_text), int(taxon_text)
        except ValueError:
            continue  # no coordinates, or a malformed row
        name = chosen.get(taxon_id)
        if name is not None:
            if settings.species_box.contains(lat, lon):
                labelled[uuid] = name
        elif settings.other_box.contains(lat, lon):
            other_taxa[uuid] = taxon_id
    return labelled, other_taxa


def _species_names(metadata: MetadataSource, taxon_ids: set[int]) -> dict[int, str]:
    """Names of those taxa that are ranked species; genus-level and other IDs are left out."""
    names: dict[int, str] = {}
    for taxon_id, rank, name in metadata.rows(TAXA, ("taxon_id", "rank", "name")):
        if rank == "species" and taxon_id.isdigit() and int(taxon_id) in taxon_ids:
            names[int(taxon_id)] = name
    return names


def _photos(settings: Settings, metadata: MetadataSource, labels: dict[str, str]) -> Selection:
    dropped: Counter = Counter()
    # One bit per photo_id seen so far (under 100 MB for today's ids): a photo met a second
    # time belongs to more than one observation, even when the first row was not selected.
    seen = bytearray(1 << 20)
    multi: set[int] = set()
    by_observation: dict[str, list[tuple[int, Photo]]] = defaultdict(list)
    licenses = set(settings.licenses)
    columns = ("photo_id", "observation_uuid", "observer_id", "extension", "license", "position")
    for photo_text, uuid, observer_id, extension, license_code, position in metadata.rows(
        PHOTOS, columns
    ):
        if not photo_text.isdigit():
            continue
        photo_id = int(photo_text)
        byte, bit = photo_id >> 3, 1 << (photo_id & 7)
        if byte >= len(seen):
            seen.extend(bytes(byte + 1 - len(seen) + len(seen) // 4))
        if seen[byte] & bit:
            multi.add(photo_id)
        seen[byte] |= bit
        species = labels.get(uuid)
        if species is None:
            continue
        if licenses and license_code.upper() not in licenses:
            dropped["licence not allowed"] += 1
            continue
        photo = Photo(species, photo_id, extension, uuid, license_code, observer_id)
        by_observation[uuid].append((int(position) if position.isdigit() else 0, photo))
    del seen
    groups: dict[str, list[Photo]] = defaultdict(list)
    targets_and_lookalikes = set(settings.targets) | set(settings.lookalikes)
    for entries in by_observation.values():
        kept = [(pos, p) for pos, p in entries if p.photo_id not in multi]
        dropped["on more than one observation"] += len(entries) - len(kept)
        kept.sort(key=lambda entry: (entry[0], entry[1].photo_id))
        limit = settings.photos_per_observation or len(kept)
        dropped["beyond photos_per_observation"] += max(0, len(kept) - limit)
        for _, photo in kept[:limit]:
            group = photo.species_name if photo.species_name in targets_and_lookalikes else OTHER
            groups[group].append(photo)
    photos: list[Photo] = []
    for group, members in groups.items():
        # A seeded hash of the photo id, not the file order, decides: the choice does not
        # depend on how a snapshot happens to be sorted, and a later one mostly agrees.
        members.sort(
            key=lambda p: hashlib.sha256(f"{settings.seed}:{p.photo_id}".encode()).digest()
        )
        cap = settings.cap_for(group) or len(members)
        if len(members) > cap:
            dropped[f"over the cap of {group}"] += len(members) - cap
        photos.extend(members[:cap])
    photos.sort(key=lambda p: (p.species_name, p.photo_id))
    return Selection(photos, +dropped)


# --- destination ----------------------------------------------------------------------------


class Destination(Protocol):
    """Where the channel goes: what is there already, one photo copy, small text files."""

    def existing(self) -> dict[str, int]: ...

    def copy_photo(self, source_bucket: str, source_key: str, name: str) -> None: ...

    def read_text(self, name: str) -> str | None: ...

    def write_text(self, name: str, text: str) -> None: ...

    def describe(self, name: str = "") -> str: ...


class S3Destination:
    """Server-side copies: the photo bytes never pass through this machine."""

    def __init__(self, client, bucket: str, prefix: str) -> None:
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def existing(self) -> dict[str, int]:
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{IMAGES_DIR}/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) :]] = item["Size"]
        return found

    def copy_photo(self, source_bucket: str, source_key: str, name: str) -> None:
        self.client.copy_object(
            Bucket=self.bucket,
            Key=self.prefix + name,
            CopySource={"Bucket": source_bucket, "Key": source_key},
        )

    def read_text(self, name: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        except ClientError as error:
            if _code(error) in MISSING_CODES:
                return None
            raise
        return body.read().decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=text.encode())

    def describe(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"


class LocalDestination:
    """Downloads through the anonymous source client into a folder for `make train-local`."""

    def __init__(self, source_client, root: Path) -> None:
        self.source_client, self.root = source_client, root

    def existing(self) -> dict[str, int]:
        folder = self.root / IMAGES_DIR
        if not folder.is_dir():
            return {}
        return {
            f"{IMAGES_DIR}/{entry.name}": entry.stat().st_size
            for entry in os.scandir(folder)
            if entry.is_file() and not entry.name.startswith(".")
        }

    def copy_photo(self, source_bucket: str, source_key: str, name: str) -> None:
        body = self.source_client.get_object(Bucket=source_bucket, Key=source_key)["Body"]
        with body:
            self._write_atomically(name, lambda handle: _copy_stream(body, handle))

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        self._write_atomically(name, lambda handle: handle.write(text.encode("utf-8")))

    def _write_atomically(self, name: str, write) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temporary name in the same folder: an interrupted write never leaves a
        # partial file under the real name, and `existing` ignores the leftovers.
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        # mkstemp creates 0600; a container that mounts the folder may run as another user.
        os.fchmod(descriptor, 0o644)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                write(handle)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def describe(self, name: str = "") -> str:
        return str(self.root / name)


def _copy_stream(body, handle) -> None:
    for chunk in iter(lambda: body.read(1 << 16), b""):
        handle.write(chunk)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def aws_message(error: Exception) -> str:
    """`Code: message` for an AWS error answer, the text of anything else."""
    if isinstance(error, ClientError):
        detail = error.response.get("Error", {})
        return f"{detail.get('Code', 'Error')}: {detail.get('Message') or error}"
    return str(error) or type(error).__name__


# --- copying --------------------------------------------------------------------------------


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    missing: list[Photo] = field(default_factory=list)
    failed: list[tuple[Photo, str]] = field(default_factory=list)


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
        dest.copy_photo(
            settings.source_bucket, photo.source_key(settings.photo_size), photo.image_name
        )

    pool = ThreadPoolExecutor(max_workers=settings.workers)
    try:
        futures = {pool.submit(copy, photo): photo for photo in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            photo = futures[future]
            try:
                future.result()
                report.copied += 1
            except ClientError as error:
                if _code(error) in MISSING_CODES:
                    report.missing.append(photo)
                else:
                    report.failed.append((photo, aws_message(error)))
            except (BotoCoreError, OSError) as error:
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
    return report


# --- the run --------------------------------------------------------------------------------


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


def open_destination(settings: Settings, source_client, target_client) -> Destination:
    if settings.dest.startswith("s3://"):
        bucket, _, prefix = settings.dest[len("s3://") :].partition("/")
        if not bucket:
            raise CollectError(f"dest {settings.dest!r} names no bucket: use s3://bucket/prefix")
        return S3Destination(target_client, bucket, prefix)
    return LocalDestination(source_client, Path(settings.dest))


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
        _log.info("the settings changed since %s was saved: scanning again", PLAN_NAME)
    selection = select_photos(settings, metadata)
    plan = {
        "fingerprint": fingerprint,
        "settings": {k: _plain(v) for k, v in dataclasses.asdict(settings).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dropped": dict(selection.dropped),
        "photos": [dataclasses.asdict(p) for p in selection.photos],
    }
    dest.write_text(PLAN_NAME, json.dumps(plan))
    return selection


def csv_text(photos: list[Photo]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in photos:
        writer.writerow(
            (p.species_name, p.image_name, p.observation_uuid, p.photo_id, p.license, p.observer_id)
        )
    return buffer.getvalue()


def run(settings: Settings, source_client, target_client) -> int:
    """Select, copy and write the CSV; return the exit status."""
    dest = open_destination(settings, source_client, target_client)
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
        print(f"plan saved to {dest.describe(PLAN_NAME)}; run again without --select-only")
        return 0
    report = copy_photos(settings, photos, dest)
    missing = {p.photo_id for p in report.missing}
    kept = [p for p in photos if p.photo_id not in missing]
    if not report.failed:
        dest.write_text(settings.csv_name, csv_text(kept))
    print("Summary")
    _print_dropped(selection)
    _print_copies(settings, dest, kept, report)
    return 1 if report.failed else 0


def _print_dropped(selection: Selection) -> None:
    if selection.dropped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(selection.dropped.items()))
        print(f"  left out while selecting: {reasons}")


def _print_counts(heading: str, settings: Settings, photos: list[Photo]) -> None:
    per_species = Counter(p.species_name for p in photos)
    per_class = Counter(dict.fromkeys(settings.targets, 0))
    per_class.update(
        p.species_name if p.species_name in settings.targets else OTHER for p in photos
    )
    print(f"{heading}: {len(photos)} photos")
    print("  per class (as train labels them with target_species = the targets):")
    for name in sorted(per_class):
        print(f"    {name:<32} {per_class[name]:>7}")
    scarce = [name for name, count in sorted(per_class.items()) if count < SCARCE]
    if scarce:
        print(
            f"  warning: fewer than {SCARCE} photos for {', '.join(scarce)}: train needs at "
            "least k_folds (default 3) per class; widen the boxes or grades, or lower k_folds"
        )
    print("  per species in the CSV:")
    for name in sorted(per_species):
        role = "target" if name in settings.targets else (
            "look-alike" if name in settings.lookalikes else OTHER
        )  # fmt: skip
        print(f"    {name:<32} {per_species[name]:>7}  ({role})")


def _print_copies(
    settings: Settings, dest: Destination, kept: list[Photo], report: CopyReport
) -> None:
    print(
        f"  copied now {report.copied}, already there {report.skipped}, "
        f"missing at source {len(report.missing)}, failed {len(report.failed)}"
    )
    for photo in report.missing[:5]:
        print(f"  missing at source: s3://{settings.source_bucket}/"
              f"{photo.source_key(settings.photo_size)} (left out of the CSV)")  # fmt: skip
    for photo, reason in report.failed[:10]:
        print(f"  failed: photo {photo.photo_id}: {reason}")
    if report.failed:
        print(
            f"  {len(report.failed)} copies failed, so no CSV was written: run the same "
            "command again to retry them (nothing already copied is copied twice)"
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
    except CollectError as error:
        print(f"collect_inaturalist: error: {error}", file=sys.stderr)
        return 2
    except (ClientError, BotoCoreError) as error:
        print(f"collect_inaturalist: AWS error: {aws_message(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "collect_inaturalist: interrupted; run the same command again to go on where it "
            "stopped",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
