"""What the collector's tests (test_collector_*.py) share: a tiny open-data bucket built so
that every selection rule shows in the counts, the counts worked out by hand, a local S3 that
behaves like the real one (moto behind `S3Front`, tests/inaturalist_bucket.py), and the ways
to run the collector (the script in a subprocess, or `cli.run` with its copies counted).

The main bucket's metadata holds targets and look-alikes from the Maryland box, other species
from the Baltimore box, a subspecies of a target and a variety of an `other` species (both
rolled up to their species), genus-level IDs, inactive taxa, wrong grades, a disallowed
licence, photos shared between observations, a second photo of an observation, an observer
missing from observers.csv.gz, a cap, and a photo that the metadata names but the bucket no
longer holds. The fixtures `collector_s3` and `s3_front` (conftest.py) are built from
`local_open_data` here.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from inaturalist_bucket import OpenData, S3Front, observer_login, observer_name
from local_servers import moto_server
from species_tools.collector import cli
from species_tools.collector.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "collect_inaturalist.py"
POLICY = REPO / "docs" / "iam" / "collector-policy.json"
SOURCE = "inaturalist-open-data"
GONE = "inaturalist-open-data-later"  # a snapshot whose bucket lost a few photos since
TARGET = "my-training-data"
CSV_HEADER = [
    "species_name", "image_name", "observation_uuid", "photo_id", "license",
    "observer_login", "observer_name", "observer_id",
]  # fmt: skip

TARGETS = ["Lycorma delicatula", "Zenaida macroura", "Acer rubrum", "Erigeron canadensis"]
LOOKALIKES = ["Acer saccharum", "Acer saccharinum", "Acer platanoides"]
ALLOWED_LICENSES = ["CC0", "CC-BY", "CC-BY-NC", "CC-BY-SA", "CC-BY-NC-SA"]
QUOTED_NAME = "Solanum \"dulcamara\" 'var'"

# What the CSV must hold, worked out by hand from the rows built in `open_data` below.
EXPECTED_SPECIES = {
    "Lycorma delicatula": 4,  # 5 in the box, capped at 4; needs_id and out-of-box rows ignored
    "Zenaida macroura": 5,  # 5 + 1 of a subspecies, minus 1 photo missing from the bucket
    "Acer rubrum": 5,  # one observation has two photos: only position 0 is kept
    "Erigeron canadensis": 4,  # 5, minus 1 photo also attached to an observation in New York
    "Acer saccharum": 3,
    "Acer saccharinum": 3,
    "Acer platanoides": 2,  # 3, minus 1 under CC-BY-NC-ND, which the settings leave out
    "Quercus alba": 3,  # 3 in Baltimore, minus 1 photo shared with Turdus, plus 1 variety
    "Turdus migratorius": 1,  # 3, minus that shared photo, minus 1 by an unlisted observer
    QUOTED_NAME: 1,
}
EXPECTED_CLASSES = {
    "Lycorma delicatula": 4,
    "Zenaida macroura": 5,
    "Acer rubrum": 5,
    "Erigeron canadensis": 4,
    "other": 13,
}
SELECTED = sum(EXPECTED_SPECIES.values()) + 1  # the missing photo is selected, then left out
DROPPED = (
    "left out while selecting: beyond photos_per_observation 1, licence not allowed 1, "
    "observations not identified to a species 1, observations on an inactive taxon 2, "
    "observer not in observers.csv.gz 1, on more than one observation 3, "
    "over the cap of Lycorma delicatula 1"
)

MARYLAND = (38.98, -77.05)  # inside the species box, outside the Baltimore box
BALTIMORE = (39.29, -76.61)  # inside both
NEW_YORK = (40.71, -74.0)  # outside both

TAXA = [
    # taxon_id, ancestry, rank_level, rank, name[, active]
    (101, "48460/1/2/3/101", 10, "species", "Lycorma delicatula"),
    (102, "48460/1/2/4/102", 10, "species", "Zenaida macroura"),
    (103, "48460/47126/5/110/103", 10, "species", "Acer rubrum"),
    (104, "48460/47126/5/6/104", 10, "species", "Erigeron canadensis"),
    (105, "48460/47126/5/110/105", 10, "species", "Acer saccharum"),
    (106, "48460/47126/5/110/106", 10, "species", "Acer saccharinum"),
    (107, "48460/47126/5/110/107", 10, "species", "Acer platanoides"),
    (108, "48460/47126/5/7/108", 10, "species", "Quercus alba"),
    (109, "48460/1/2/8/109", 10, "species", "Turdus migratorius"),
    (110, "48460/47126/5", 20, "genus", "Acer"),
    (111, "48460/1/2/4/102", 5, "subspecies", "Zenaida macroura carolinensis"),
    (112, "48460/47126/5/9/112", 10, "species", QUOTED_NAME),
    (113, "48460/47126/5/7/108", 5, "variety", "Quercus alba latiloba"),
    (114, "48460/47126/5/7/114", 10, "species", "Quercus montana", "false"),
    (115, "48460/47126/5/110/115", 10, "species", "Acer rubrum", "false"),  # an old concept
]


def open_data() -> OpenData:
    data = OpenData(TAXA)
    licenses = ["CC0", "CC-BY", "CC-BY-NC"]
    # A photo first met on an observation outside every box, later on an Erigeron one.
    shared_far = data.add(109, NEW_YORK)
    for taxon in (101, 102, 103, 104):
        for n in range(5):
            where = BALTIMORE if n == 0 else MARYLAND
            obs = data.observe(taxon, where)
            if taxon == 103 and n == 1:
                data.photo(obs, position=1)  # listed first, but position 0 comes first
                data.photo(obs, position=0)
            elif taxon == 104 and n == 1:
                data.photo(obs, photo_id=shared_far)
            elif taxon == 102 and n == 1:
                data.photo(obs, stored=False)  # named in photos.csv, gone from the bucket
            else:
                data.photo(obs, license=licenses[n % 3])
    data.add(111, MARYLAND)  # subspecies of Zenaida macroura
    data.add(101, MARYLAND, grade="needs_id")
    data.add(101, NEW_YORK)
    data.add(101, MARYLAND, grade="casual")
    for taxon in (105, 106, 107):
        for n in range(3):
            license = "CC-BY-NC-ND" if taxon == 107 and n == 0 else "CC-BY"
            data.add(taxon, MARYLAND, license=license, extension="png" if n == 2 else "jpg")
    data.add(105, NEW_YORK)
    quercus = [data.observe(108, BALTIMORE) for _ in range(3)]
    for obs in quercus[:2]:
        data.photo(obs)
    for _ in range(2):
        data.add(108, MARYLAND)  # another species, but outside the Baltimore box
    data.add(109, BALTIMORE)
    shared_near = data.add(109, BALTIMORE)
    data.photo(quercus[2], photo_id=shared_near)  # the same photo on two observations
    data.add(109, BALTIMORE, observer=9999, listed=False)  # an observer nobody can credit
    data.add(112, BALTIMORE)
    data.add(113, BALTIMORE)  # a variety of Quercus alba: an `other` photo of Quercus alba
    data.add(114, BALTIMORE)  # an inactive species
    data.add(115, BALTIMORE)  # an inactive taxon named like a target: not that target
    data.add(110, BALTIMORE)  # identified to genus only
    data.add("", BALTIMORE)  # not identified
    data.add(108, None)  # no coordinates
    return data


def later_snapshot() -> OpenData:
    """160 photos of the targets, so that one photo is under 1% and three are over it."""
    data = OpenData(TAXA)
    for n in range(160):
        data.add(101 + n % 4, MARYLAND)
    return data


@contextlib.contextmanager
def local_open_data(folder: Path) -> Iterator[dict]:
    """moto with the buckets filled, behind the front; the environment points at the front,
    the four metadata files are also in `folder`/metadata, for --metadata-dir, and an
    interrupted scan's progress goes to `folder`/cache."""
    metadata_dir = folder / "metadata"
    metadata_dir.mkdir()
    with moto_server() as local, pytest.MonkeyPatch.context() as patch:
        front = S3Front(urlsplit(local["AWS_ENDPOINT_URL"]).port)
        environment = {**local, "AWS_ENDPOINT_URL": front.endpoint}
        for key, value in {**environment, "XDG_CACHE_HOME": str(folder / "cache")}.items():
            patch.setenv(key, value)
        data, later = open_data(), later_snapshot()
        s3 = boto3.client("s3")
        data.fill(s3, SOURCE)
        later.fill(s3, GONE)
        s3.create_bucket(Bucket=TARGET)
        for key, body in data.metadata().items():
            (metadata_dir / key).write_bytes(body)
        try:
            yield {
                "data": data, "later": later, "metadata_dir": metadata_dir, "front": front,
                "progress": folder / "cache" / "collect-inaturalist",
            }  # fmt: skip
        finally:
            front.stop()


def write_config(path: Path, dest: str, **extra: object) -> Path:
    settings = {
        "dest": dest,
        "targets": TARGETS,
        "lookalikes": LOOKALIKES,
        "species_box": {"lat_min": 37.911717, "lat_max": 39.723043,
                        "lon_min": -79.487651, "lon_max": -75.048939},
        "other_box": {"lat_min": 39.19, "lat_max": 39.37, "lon_min": -76.71, "lon_max": -76.52},
        "licenses": ALLOWED_LICENSES,
        "caps": {"Lycorma delicatula": 4},
        "workers": 4,
        # One photo gone of the 32 selected is 3%: over the 1% default, which the tests of
        # the later snapshot (160 photos) check.
        "max_missing_percent": 5,
        **extra,
    }  # fmt: skip
    path.write_text("\n".join(f"{key} = {_toml(value)}" for key, value in settings.items()))
    return path


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


class CopyCounter:
    """Counts the copies a client starts; after `fail_after` of them, raises `failure`."""

    def __init__(self, fail_after: int | None = None, failure: BaseException | None = None):
        self.keys: list[str] = []
        self.fail_after, self.failure = fail_after, failure
        self.lock = threading.Lock()

    def __call__(self, params, **_):
        with self.lock:
            if self.fail_after is not None and len(self.keys) >= self.fail_after:
                raise self.failure
            self.keys.append(params["Key"])


def instrumented_run(config: Path, counter: CopyCounter, *flags: str) -> int:
    settings = load_settings(["--config", str(config), *flags])
    source, target = cli.make_clients(settings)
    target.meta.events.register("before-parameter-build.s3.CopyObject", counter)
    return cli.run(settings, source, target)


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def target_objects(prefix: str) -> dict[str, tuple]:
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=TARGET, Prefix=prefix)
    return {
        item["Key"][len(prefix) :]: (item["LastModified"], item["ETag"], item["Size"])
        for page in pages
        for item in page.get("Contents", [])
    }


def target_csv(prefix: str, name: str = "inaturalist.csv") -> list[dict[str, str]]:
    body = boto3.client("s3").get_object(Bucket=TARGET, Key=prefix + name)["Body"]
    return read_csv(body.read().decode())


def check_attribution(rows: list[dict[str, str]]) -> None:
    """Every row credits the photo's observer, as observers.csv.gz names them."""
    assert rows and list(rows[0]) == CSV_HEADER
    for row in rows:
        observer = int(row["observer_id"])
        assert row["observer_login"] == observer_login(observer)
        assert row["observer_name"] == observer_name(observer)
    assert any(row["observer_name"] == "" for row in rows)
    assert any('"' in row["observer_name"] and "," in row["observer_name"] for row in rows)


def edited_metadata(source: Path, folder: Path, name: str, old: bytes, new: bytes) -> Path:
    folder.mkdir()
    for entry in source.iterdir():
        body = entry.read_bytes()
        if entry.name == name:
            body = gzip.compress(gzip.decompress(body).replace(old, new, 1))
        (folder / entry.name).write_bytes(body)
    return folder


def missing_photo_id(data: OpenData) -> int:
    stored = {int(key.split("/")[1]) for key in data.images}
    missing = [row[1] for row in data.photos if row[1] not in stored]
    assert len(missing) == 1
    return missing[0]


def photo_requests(front: S3Front, bucket: str) -> list:
    return [r for r in front.requests if r.bucket == bucket and r.key.startswith("photos/")]
