"""The metadata streams (metadata.py): a changed layout named, a dropped connection resumed at
the byte where it stopped, a file replaced mid-read never spliced, and a scan held to the
versions its snapshot named.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from collector_helpers import (
    EXPECTED_SPECIES,
    SOURCE,
    edited_metadata,
    later_snapshot,
    open_data,
    run_cli,
    write_config,
)
from inaturalist_bucket import public_read
from species_tools.collector import CollectError
from species_tools.collector.metadata import FILES, MetadataSource


def test_a_changed_column_layout_is_named(collector_s3, tmp_path):
    folder = edited_metadata(
        collector_s3["metadata_dir"], tmp_path / "metadata", "taxa.csv.gz", b"\tname\t", b"\tx\t"
    )
    config = write_config(tmp_path / "c.toml", str(tmp_path / "out"), metadata_dir=str(folder))
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert "taxa.csv.gz lacks the column(s) name" in result.stderr
    assert "inaturalist-open-data/tree/main/Metadata" in result.stderr


def test_a_metadata_stream_cut_in_the_middle_resumes_at_that_byte(collector_s3, s3_front, tmp_path):
    sizes = {
        name: len(body) for name, body in collector_s3["data"].metadata().items()
    }  # fmt: skip
    cuts = {name: sizes[name] // 2 for name in ("observations.csv.gz", "photos.csv.gz")}
    for name, cut in cuts.items():
        s3_front.cuts[(SOURCE, name)] = cut
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel))
    result = run_cli("--config", str(config), "--select-only")
    assert result.returncode == 0, result.stdout + result.stderr
    for name, cut in cuts.items():
        assert f"{name}: the connection dropped at byte {cut:,}" in result.stderr
        gets = [(r.range, r.body_bytes) for r in s3_front.requests_for(name) if r.method == "GET"]
        # The first GET was cut after `cut` bytes; the second asked for the rest only.
        assert gets == [("", cut), (f"bytes={cut}-", sizes[name] - cut)]
    plan = json.loads((channel / "collect_inaturalist.plan.json").read_text())
    assert Counter(p["species_name"] for p in plan["photos"]) == Counter(
        EXPECTED_SPECIES
    ) + Counter(
        {"Zenaida macroura": 1}  # the photo gone from the bucket is still in the plan
    )


def test_a_metadata_file_replaced_while_it_is_read_is_not_spliced(collector_s3, s3_front):
    bucket, name = "inaturalist-open-data-replaced", "photos.csv.gz"
    first, second = open_data().metadata()[name], later_snapshot().metadata()[name]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(public_read(bucket)))
    s3.put_object(Bucket=bucket, Key=name, Body=first)
    s3_front.cuts[(bucket, name)] = len(first) // 2
    source = boto3.client("s3", config=Config(signature_version=UNSIGNED))

    def next_snapshot_lands(params, **_):
        if "Range" in params:  # the resumed request: the file was replaced just before it
            s3.put_object(Bucket=bucket, Key=name, Body=second)

    source.meta.events.register("provide-client-params.s3.GetObject", next_snapshot_lands)
    rows = MetadataSource(source, bucket, None).rows(name, ("photo_id",))
    with pytest.raises(CollectError, match=re.escape(f"s3://{bucket}/{name} was replaced")):
        list(rows)
    assert [r.status for r in s3_front.requests_for(name) if r.method == "GET"] == [200, 412]


def test_a_scan_reads_the_versions_its_snapshot_named(collector_s3, s3_front):
    bucket, name = "inaturalist-open-data-next", "photos.csv.gz"
    s3 = boto3.client("s3")
    later_snapshot().fill(s3, bucket)
    source = boto3.client("s3", config=Config(signature_version=UNSIGNED))
    metadata = MetadataSource(source, bucket, None)
    versions = metadata.snapshot()
    assert versions == {
        key: s3.head_object(Bucket=bucket, Key=key)["ETag"] for key in FILES
    }  # fmt: skip
    # Next month's file lands between the snapshot and the pass that reads it.
    s3.put_object(Bucket=bucket, Key=name, Body=open_data().metadata()[name])
    with pytest.raises(CollectError, match=re.escape(f"s3://{bucket}/{name} was replaced")):
        list(metadata.rows(name, ("photo_id",)))
    (get,) = [r for r in s3_front.requests_for(name) if r.method == "GET"]
    assert get.status == 412


def test_a_local_snapshot_changes_with_a_file_and_names_a_missing_one(collector_s3, tmp_path):
    folder = edited_metadata(collector_s3["metadata_dir"], tmp_path / "m", "taxa.csv.gz", b"", b"")
    metadata = MetadataSource(None, SOURCE, str(folder))
    before = metadata.snapshot()
    stamp = (folder / "observers.csv.gz").stat().st_mtime_ns
    os.utime(folder / "observers.csv.gz", ns=(stamp + 10**9, stamp + 10**9))
    after = metadata.snapshot()
    assert [n for n in FILES if before[n] != after[n]] == ["observers.csv.gz"]
    (folder / "photos.csv.gz").unlink()
    with pytest.raises(CollectError, match=re.escape(f"cannot read {folder / 'photos.csv.gz'}")):
        metadata.snapshot()
