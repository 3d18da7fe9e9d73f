"""The command (cli.py, scripts/collect_inaturalist.py): installed under its name, a whole
collection into a local folder that resumes, a summary that stays short however many species
are selected, and a channel that `train` accepts.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter

import pytest
from collector_helpers import (
    BALTIMORE,
    DROPPED,
    EXPECTED_CLASSES,
    EXPECTED_SPECIES,
    MARYLAND,
    REPO,
    TARGETS,
    TAXA,
    check_attribution,
    missing_photo_id,
    read_csv,
    run_cli,
    write_config,
)
from inaturalist_bucket import OpenData
from job_helpers import run_train, write_hyperparameters
from species_tools.collector import cli


def test_the_command_is_installed_as_collect_inaturalist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["collect-inaturalist"].partition(":")
    assert (module, function) == (cli.__name__, cli.main.__name__)


def test_a_local_folder_download_resumes_and_a_rescan_makes_the_same_choice(
    collector_s3, s3_front, tmp_path
):
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel))

    first = run_cli("--config", str(config), "--metadata-dir", str(collector_s3["metadata_dir"]))
    assert first.returncode == 0, first.stderr
    assert "copied now 31, already there 0, missing at source 1, failed 0" in first.stdout
    assert DROPPED in first.stdout
    for name, count in EXPECTED_CLASSES.items():
        assert f"{name:<32} {count:>7}" in first.stdout
    rows = read_csv((channel / "inaturalist.csv").read_text())
    check_attribution(rows)
    assert Counter(r["species_name"] for r in rows) == EXPECTED_SPECIES
    files = {f"images/{p.name}" for p in (channel / "images").iterdir()}
    assert files == {r["image_name"] for r in rows}
    data = collector_s3["data"]
    for row in rows:
        key = f"photos/{row['photo_id']}/medium.{row['image_name'].rsplit('.', 1)[1]}"
        assert (channel / row["image_name"]).read_bytes() == data.images[key]

    # Interrupted download: a photo lost and a partial write left behind.
    (channel / rows[0]["image_name"]).unlink()
    (channel / "images" / ".partial-abc").write_bytes(b"half")
    stamps = {p.name: p.stat().st_mtime_ns for p in (channel / "images").iterdir()}
    again = run_cli("--config", str(config), "--metadata-dir", str(collector_s3["metadata_dir"]))
    assert again.returncode == 0, again.stderr
    assert "reusing the selection" in again.stderr
    assert "copied now 1, already there 30, missing at source 1, failed 0" in again.stdout
    assert DROPPED in again.stdout
    for name, stamp in stamps.items():
        if not name.startswith("."):
            assert (channel / "images" / name).stat().st_mtime_ns == stamp, name
    assert read_csv((channel / "inaturalist.csv").read_text()) == rows

    # A fresh scan, streamed from the bucket this time, with the same seed makes the same choice.
    rescan = run_cli("--config", str(config), "--rescan", "--select-only")
    assert rescan.returncode == 0, rescan.stderr
    plan = json.loads((channel / "collect_inaturalist.plan.json").read_text())
    assert sorted(p["photo_id"] for p in plan["photos"]) == sorted(
        [int(r["photo_id"]) for r in rows] + [missing_photo_id(data)]
    )


@pytest.mark.slow
def test_train_accepts_a_collected_channel(collector_s3, s3_front, tmp_path):
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel))
    collected = run_cli(
        "--config", str(config), "--metadata-dir", str(collector_s3["metadata_dir"])
    )
    assert collected.returncode == 0, collected.stderr
    base = tmp_path / "opt_ml"
    (base / "input" / "data").mkdir(parents=True)
    (base / "input" / "data" / "training").symlink_to(channel)
    write_hyperparameters(
        base,
        {"target_species": ",".join(TARGETS), "k_folds": "2", "num_epochs": "1",
         "img_size": "32", "batch_size": "8", "pretrained": "false"},
    )  # fmt: skip
    result = run_train(base, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["classes"] == sorted(EXPECTED_CLASSES)
    assert (base / "model" / "model.json").is_file()


def test_a_selection_of_many_species_is_summarised_and_the_plan_counts_them_all(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # 40 `other` species in Baltimore, species n with n observations: a wide box in small.
    taxa = [row for row in TAXA if row[4] in TARGETS and len(row) == 5]
    taxa += [
        (200 + n, f"48460/1/2/9/{200 + n}", 10, "species", f"Species {n:02}") for n in range(1, 41)
    ]
    data = OpenData(taxa)
    for taxon in (101, 102, 103, 104):
        data.add(taxon, MARYLAND)
    for n in range(1, 41):
        for _ in range(n):
            data.add(200 + n, BALTIMORE)
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    for name, body in data.metadata().items():
        (metadata / name).write_bytes(body)
    channel = tmp_path / "channel"
    config = write_config(tmp_path / "c.toml", str(channel), lookalikes=[], caps={})

    result = run_cli("--config", str(config), "--metadata-dir", str(metadata), "--select-only")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[:3] for line in result.stdout.splitlines() if "(other)" in line]
    assert listed == [["Species", f"{n:02}", str(n)] for n in range(40, 20, -1)]
    rest = sum(range(1, 21))
    assert f"... and 20 more other species ({rest} photos)" in result.stdout
    assert len(result.stdout.splitlines()) < 40
    (logged,) = [line for line in result.stderr.splitlines() if "observations selected" in line]
    assert "observations selected: 824; Lycorma delicatula 1," in logged
    assert "40 other species, the largest Species 40 40, Species 39 39," in logged
    assert logged.endswith("Species 21 21 and 20 more")

    plan = json.loads((channel / "collect_inaturalist.plan.json").read_text())
    assert plan["per_species"] == {
        **{f"Species {n:02}": n for n in range(40, 0, -1)},
        **dict.fromkeys(TARGETS, 1),
    }
    assert list(plan["per_species"])[:3] == ["Species 40", "Species 39", "Species 38"]
