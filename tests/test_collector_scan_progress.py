"""The saved passes of an interrupted scan (scan_progress.py): kept under one key, whole or
not at all; anything unreadable or unwritable costs the resume, never the run. The real
interrupted scan is in test_collector_selection.py."""

from __future__ import annotations

import logging

from species_tools.collector.scan_progress import ScanProgress

VERSIONS = {"taxa.csv.gz": '"etag-1"', "observations.csv.gz": '"etag-2"'}
SCAN = {"passes": 2, "labels": {"obs-1": "Acer rubrum"}}


def test_what_was_saved_comes_back_under_the_same_key_only(tmp_path):
    ScanProgress(tmp_path, "s3://b/p", "settings-1", VERSIONS).save(SCAN)
    assert ScanProgress(tmp_path, "s3://b/p", "settings-1", dict(VERSIONS)).load() == SCAN
    assert ScanProgress(tmp_path, "s3://b/p", "settings-2", VERSIONS).load() is None
    newer = {**VERSIONS, "observations.csv.gz": '"etag-3"'}
    assert ScanProgress(tmp_path, "s3://b/p", "settings-1", newer).load() is None
    # Another destination has its own file.
    assert ScanProgress(tmp_path, "s3://b/other", "settings-1", VERSIONS).load() is None
    assert len(list(tmp_path.iterdir())) == 1


def test_a_damaged_file_is_scanned_again_with_a_warning(tmp_path, caplog):
    progress = ScanProgress(tmp_path, "out", "settings-1", VERSIONS)
    progress.save(SCAN)
    progress.path.write_bytes(progress.path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="collect_inaturalist"):
        assert progress.load() is None
    assert (
        f"cannot read {progress.path}" in caplog.text and "scanning from the start" in caplog.text
    )


def test_a_progress_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    progress = ScanProgress(blocked, "out", "settings-1", VERSIONS)
    with caplog.at_level(logging.WARNING, logger="collect_inaturalist"):
        progress.save(SCAN)
    assert "cannot save the scan's progress" in caplog.text
    assert "an interruption now restarts the scan" in caplog.text
    assert progress.load() is None
    progress.discard()
    assert f"cannot remove {progress.path}" in caplog.text
