"""The collector's settings: flags over a TOML file, checked once into a frozen `Settings`.

Every check fails with a `SettingsError` that names the setting and says how to fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from species_classifier.contract.channel import OTHER

from species_tools.aws import SettingsError, load_toml

SOURCE_BUCKET = "inaturalist-open-data"
SOURCE_REGION = "us-east-1"
PHOTO_SIZES = ("original", "large", "medium", "small", "thumb", "square")
QUALITY_GRADES = ("research", "needs_id", "casual")
EXAMPLE = "scripts/collect_inaturalist.example.toml"
# Bumped when the plan's rows change shape, so that a plan saved by an older collector is
# scanned again instead of misread.
PLAN_FORMAT = 2


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
    max_missing_percent: float = 1.0
    rescan: bool = False
    select_only: bool = False

    def cap_for(self, group: str) -> int:
        """Most photos for a cap group (a target, a look-alike or `other`); 0 means no cap."""
        return self.caps.get(group, self.max_per_class)

    def group_of(self, species: str) -> str:
        """The cap group of a species: itself for a target or look-alike, else `other`."""
        return species if species in self.targets or species in self.lookalikes else OTHER

    def selection_fingerprint(self) -> str:
        """What decides the selection; a plan made under other values is not reused."""
        keys = (
            "targets", "lookalikes", "species_box", "other_box", "quality_grades", "licenses",
            "max_per_class", "caps", "photos_per_observation", "photo_size", "seed",
            "source_bucket",
        )  # fmt: skip
        values = {key: plain(getattr(self, key)) for key in keys}
        values["plan_format"] = PLAN_FORMAT
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def plain(value: object) -> object:
    """A setting as JSON holds it."""
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
        prog="collect-inaturalist",
        description="Collect iNaturalist open-data photos into a training channel.",
        epilog=f"Flags override the config file. Lists are comma-separated. Example: {EXAMPLE}",
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
    add("--metadata-dir", help="read the four .csv.gz files from this folder instead of S3")
    add("--csv-name", help="name of the CSV at the destination (default inaturalist.csv)")
    add("--workers", type=int, help="concurrent copies (default 16)")
    add(
        "--max-missing-percent",
        type=float,
        help="photos gone from the bucket that are left out before the run stops (default 1)",
    )
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
            raise SettingsError(f"--cap {item!r} is not NAME=N, e.g. --cap 'Acer saccharum=200'")
        caps[name.strip()] = number
    if caps:
        values["caps"] = caps
    values.update(flags)
    missing = [name for name in REQUIRED if not values.get(name)]
    if missing:
        listed = ", ".join(missing)
        flag_names = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise SettingsError(
            f"missing settings: {listed}; give them as flags ({flag_names}) or in --config "
            f"FILE (see {EXAMPLE})"
        )
    return _validate(values)


def _read_config(path: Path) -> dict[str, object]:
    data = load_toml(path)
    unknown = sorted(set(data) - set(KNOWN))
    if unknown:
        raise SettingsError(
            f"config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}"
        )
    caps = data.get("caps", {})
    if not isinstance(caps, dict):
        raise SettingsError(
            f"config {path}: caps = {caps!r} is not a table of NAME = N, "
            'e.g. caps = { other = 3000, "Acer saccharum" = 300 }'
        )
    # In TOML every line after a `[caps]` header belongs to that table, so a setting added
    # at the end of such a file would become a cap named like the setting.
    misplaced = sorted(set(caps) & set(KNOWN))
    if misplaced:
        raise SettingsError(
            f"config {path}: {', '.join(misplaced)} is inside the [caps] table (every line "
            "after [caps] belongs to it): move it above [caps], or write the caps on one line, "
            'caps = { other = 3000, "Acer saccharum" = 300 }'
        )
    return data


def _validate(values: dict[str, object]) -> Settings:
    targets = _names(values["targets"], "targets")
    lookalikes = _names(values.get("lookalikes", ()), "lookalikes")
    if OTHER in targets + lookalikes:
        raise SettingsError("'other' is not a species: the trainer names everything else so")
    both = sorted(set(targets) & set(lookalikes))
    if both:
        raise SettingsError(f"{', '.join(both)} is both a target and a look-alike: keep one")
    grades = tuple(g.lower() for g in _names(values.get("quality_grades", "research"), "grades"))
    bad = [g for g in grades if g not in QUALITY_GRADES]
    if bad:
        raise SettingsError(f"quality grade(s) {bad} unknown: use {', '.join(QUALITY_GRADES)}")
    caps = {str(k): _count(v, f"cap for {k!r}") for k, v in dict(values.get("caps", {})).items()}
    groups = set(targets) | set(lookalikes) | {OTHER}
    stray = sorted(set(caps) - groups)
    if stray:
        raise SettingsError(
            f"caps for {', '.join(stray)}: not a target, look-alike or 'other'; "
            f"cap one of: {', '.join(sorted(groups))}"
        )
    csv_name = str(values.get("csv_name", "inaturalist.csv"))
    if not csv_name.endswith(".csv") or "/" in csv_name:
        raise SettingsError(f"csv_name {csv_name!r} must be a file name ending in .csv")
    photo_size = str(values.get("photo_size", "medium"))
    if photo_size not in PHOTO_SIZES:
        raise SettingsError(f"photo_size {photo_size!r} is not one of {', '.join(PHOTO_SIZES)}")
    workers = _count(values.get("workers", 16), "workers")
    if workers < 1:
        raise SettingsError("workers must be at least 1")
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
        max_missing_percent=_percent(values.get("max_missing_percent", 1.0)),
        rescan=bool(values.get("rescan", False)),
        select_only=bool(values.get("select_only", False)),
    )


def _names(value: object, what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise SettingsError(f"{what} must be a list of names or a comma-separated string")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _count(value: object, what: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise SettingsError(f"{what} = {value!r} is not a whole number") from None
    if number < 0:
        raise SettingsError(f"{what} = {number} must not be negative (0 means no limit)")
    return number


def _percent(value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        number = -1.0
    if not 0 <= number <= 100:
        raise SettingsError(
            f"max_missing_percent = {value!r} is not a percentage from 0 to 100, e.g. 1"
        )
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
        raise SettingsError(
            f"{what} = {value!r} is not a box: give LAT_MIN,LAT_MAX,LON_MIN,LON_MAX with each "
            "minimum below its maximum, e.g. 39.19,39.37,-76.71,-76.52"
        )
    return box
