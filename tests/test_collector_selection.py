"""Which photos are selected (selection.py), against the hand-counted open data of
collector_helpers, and how an interrupted scan resumes (scan_progress.py).
"""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from collections import Counter

import boto3
import pytest
from collector_helpers import (
    DROPPED,
    EXPECTED_SPECIES,
    SCRIPT,
    SOURCE,
    edited_metadata,
    run_cli,
    write_config,
)
from species_tools.collector import CollectError, cli
from species_tools.collector.cli import PLAN_NAME
from species_tools.collector.settings import load_settings


def test_a_target_known_only_as_an_inactive_taxon_is_named(collector_s3, tmp_path):
    folder = edited_metadata(
        collector_s3["metadata_dir"], tmp_path / "metadata", "taxa.csv.gz",
        b"Acer rubrum\ttrue", b"Acer rubrum\tfalse",
    )  # fmt: skip
    settings = load_settings(
        ["--config", str(write_config(tmp_path / "c.toml", str(tmp_path / "out"))),
         "--metadata-dir", str(folder)]
    )  # fmt: skip
    with pytest.raises(CollectError, match="no active taxon of rank species named 'Acer rubrum'"):
        cli.run(settings, *cli.make_clients(settings))


def _metadata_gets(front) -> set[str]:
    return {r.key for r in front.requests if r.method == "GET" and r.key.endswith(".csv.gz")}


def _plan_species(channel) -> Counter:
    plan = json.loads((channel / PLAN_NAME).read_text())
    return Counter(p["species_name"] for p in plan["photos"])


# The photo gone from the bucket is still in the plan: it is left out when copied.
PLANNED = Counter(EXPECTED_SPECIES) + Counter({"Zenaida macroura": 1})


def test_a_scan_interrupted_by_ctrl_c_resumes_after_its_last_finished_pass(
    collector_s3, s3_front, tmp_path
):
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel))
    # The fourth pass hangs on its first read, as a long scan would; then Ctrl-C.
    arrived = s3_front.stall(SOURCE, "photos.csv.gz")
    scan = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), "--select-only"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert arrived.wait(60), "the scan never reached photos.csv.gz"
    scan.send_signal(signal.SIGINT)
    _, stderr = scan.communicate(timeout=60)
    assert scan.returncode == 130, stderr
    assert "interrupted; run the same command again" in stderr
    assert not (channel / PLAN_NAME).exists()
    (saved,) = collector_s3["progress"].iterdir()

    s3_front.reset()
    resumed = run_cli("--config", str(config), "--select-only")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the interrupted scan after pass 3 of 5 (taxa again), saved in {saved}" in (
        resumed.stderr
    )
    # Taxa and observations were not read again: only the two passes left.
    assert _metadata_gets(s3_front) == {"photos.csv.gz", "observers.csv.gz"}
    assert _plan_species(channel) == PLANNED
    assert DROPPED in resumed.stdout  # what the first three passes left out is still counted
    assert not saved.exists()  # the plan holds the selection now


class _CtrlCAtPhotos:
    """A KeyboardInterrupt when the scan asks for photos.csv.gz, as a Ctrl-C there would."""

    def __call__(self, params, **_):
        if params["Key"] == "photos.csv.gz":
            raise KeyboardInterrupt


@pytest.mark.parametrize("change", ["setting", "snapshot"])
def test_an_interrupted_scan_starts_over_when_a_setting_or_the_snapshot_changed(
    collector_s3, s3_front, tmp_path, change
):
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel), seed=1)
    settings = load_settings(["--config", str(config), "--select-only"])
    source, target = cli.make_clients(settings)
    source.meta.events.register("provide-client-params.s3.GetObject", _CtrlCAtPhotos())
    with pytest.raises(KeyboardInterrupt):
        cli.run(settings, source, target)
    assert len(list(collector_s3["progress"].iterdir())) == 1

    s3_front.reset()
    s3 = boto3.client("s3")
    name, body = "observations.csv.gz", collector_s3["data"].metadata()["observations.csv.gz"]
    if change == "snapshot":  # the same rows, compressed anew: another version of the file
        s3.put_object(Bucket=SOURCE, Key=name, Body=gzip.compress(gzip.decompress(body), mtime=1))
    flags = ["--seed", "2"] if change == "setting" else []
    try:
        result = run_cli("--config", str(config), "--select-only", *flags)
    finally:
        s3.put_object(Bucket=SOURCE, Key=name, Body=body)
    assert result.returncode == 0, result.stderr
    assert "the settings or the metadata snapshot changed since the interrupted scan" in (
        result.stderr
    )
    assert _metadata_gets(s3_front) == {
        "taxa.csv.gz", "observations.csv.gz", "photos.csv.gz", "observers.csv.gz"
    }  # fmt: skip
    assert _plan_species(channel) == PLANNED
    assert not list(collector_s3["progress"].iterdir())
