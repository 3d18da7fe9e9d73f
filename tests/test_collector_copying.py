"""Copying the selected photos (copying.py): interrupted copies resume without copying twice,
and photos gone from the bucket are left out up to max_missing_percent.
"""

from __future__ import annotations

from collections import Counter

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from collector_helpers import (
    ALLOWED_LICENSES,
    EXPECTED_SPECIES,
    GONE,
    SELECTED,
    TARGET,
    CopyCounter,
    check_attribution,
    instrumented_run,
    photo_requests,
    read_csv,
    run_cli,
    target_csv,
    target_objects,
    write_config,
)
from inaturalist_bucket import OpenData


@pytest.mark.parametrize(
    "failure",
    [EndpointConnectionError(endpoint_url="http://simulated-outage"), KeyboardInterrupt()],
    ids=["network-drops", "ctrl-c"],
)
def test_s3_copy_selects_by_box_and_species_and_resumes_without_copying_twice(
    collector_s3, s3_front, tmp_path, failure
):
    prefix = f"{type(failure).__name__}/training/"
    config = write_config(tmp_path / "c.toml", f"s3://{TARGET}/{prefix}")

    # First run: interrupted after 10 copies. No CSV, only whole photos.
    first = CopyCounter(fail_after=10, failure=failure)
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            instrumented_run(config, first)
    else:
        assert instrumented_run(config, first) == 1
    after_first = target_objects(prefix)
    images_first = {k: v for k, v in after_first.items() if k.startswith("images/")}
    assert "inaturalist.csv" not in after_first
    assert "collect_inaturalist.plan.json" in after_first
    assert 9 <= len(images_first) <= 10  # the missing photo may be among the ten

    # Second run: picks the saved plan up and copies only what is not there yet.
    second = CopyCounter()
    assert instrumented_run(config, second) == 0
    assert len(second.keys) == SELECTED - len(images_first)
    assert not {prefix + k for k in images_first} & set(second.keys)
    after_second = target_objects(prefix)
    for key, stamp in images_first.items():
        assert after_second[key] == stamp, f"{key} was copied again"

    # Third run: nothing left to copy but the photo the bucket no longer holds.
    third = CopyCounter()
    assert instrumented_run(config, third) == 0
    assert len(third.keys) == 1

    rows = target_csv(prefix)
    check_attribution(rows)
    assert Counter(r["species_name"] for r in rows) == EXPECTED_SPECIES
    images = {k for k in target_objects(prefix) if k.startswith("images/")}
    assert {r["image_name"] for r in rows} == images
    for row in rows:
        assert row["image_name"] == f"images/{row['photo_id']}.{row['image_name'][-3:]}"
        assert row["license"] in ALLOWED_LICENSES
    _check_selection_details(collector_s3["data"], rows)


def _check_selection_details(data: OpenData, rows: list[dict[str, str]]) -> None:
    by_photo = {int(r["photo_id"]): r for r in rows}
    photos_of: dict[str, list] = {}
    for row in data.photos:
        photos_of.setdefault(row[2], []).append(row)
    two_photos = [v for v in photos_of.values() if len(v) == 2]
    assert len(two_photos) == 1
    (second, first) = two_photos[0]  # listed in that order, positions 1 and 0
    assert first[1] in by_photo and second[1] not in by_photo
    assert sum(1 for r in rows if r["image_name"].endswith(".png")) == 3
    assert len({r["observation_uuid"] for r in rows}) == len(rows)
    taxon_of = {row[0]: row[5] for row in data.observations}
    rolled_up = [r for r in rows if taxon_of[r["observation_uuid"]] == 113]
    assert [r["species_name"] for r in rolled_up] == ["Quercus alba"]
    assert not any(taxon_of[r["observation_uuid"]] in (110, 114, 115) for r in rows)


def test_photos_refused_since_the_snapshot_are_left_out_up_to_one_percent(
    collector_s3, s3_front, tmp_path
):
    later = collector_s3["later"]
    keys = sorted(later.images)
    s3_front.withdrawn.add((GONE, keys[0]))
    prefix = "later/training/"
    config = write_config(
        tmp_path / "c.toml", f"s3://{TARGET}/{prefix}", source_bucket=GONE, caps={},
        lookalikes=[], max_missing_percent=1,
    )  # fmt: skip

    # One photo of 160 refused (0.6%): listed, left out, and the CSV is written.
    first = run_cli("--config", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "copied now 159, already there 0, missing at source 1, failed 0" in first.stdout
    assert f"missing at source: s3://{GONE}/{keys[0]} (left out of the CSV)" in first.stdout
    assert len(target_csv(prefix)) == 159
    # The refused copy was classified with one anonymous HEAD, which the bucket refused too.
    heads = [r for r in photo_requests(s3_front, GONE) if r.method == "HEAD"]
    assert [(r.key, r.status, r.signed) for r in heads] == [(keys[0], 403, False)]

    # A rerun tries the gone photo again and writes the CSV again: it never blocks.
    boto3.client("s3").delete_object(Bucket=TARGET, Key=prefix + "inaturalist.csv")
    again = run_cli("--config", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "copied now 0, already there 159, missing at source 1, failed 0" in again.stdout
    assert len(target_csv(prefix)) == 159

    # Three of 160 refused (1.9%) is more than gone photos: the run stops without a CSV.
    s3_front.withdrawn.update((GONE, key) for key in keys[1:3])
    channel = tmp_path / "channel"
    local = run_cli("--config", str(config), "--dest", str(channel))
    assert local.returncode == 1, local.stdout + local.stderr
    assert "3 photos (1.9%) are missing at source, more than max_missing_percent = 1" in (
        local.stdout
    )
    assert not (channel / "inaturalist.csv").exists()
    # ... unless the user allows more.
    allowed = run_cli("--config", str(config), "--dest", str(channel), "--max-missing-percent", "2")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "copied now 0, already there 157, missing at source 3, failed 0" in allowed.stdout
    assert len(read_csv((channel / "inaturalist.csv").read_text())) == 157
