"""The real `train` executable against a folder laid out like /opt/ml: outputs and failures."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from job_helpers import failure_text, run_train, write_hyperparameters
from photos import cmyk_jpeg, exif_rotated_jpeg, greyscale_jpeg, sixteen_bit_png, truncated_jpeg
from species_classifier.bundle import load_members, read_description
from species_classifier.contract import metric_lines
from species_classifier.demo_data import pretrain_stand_in_weights


def macro_f1_of(confusion: list[list[int]]) -> float:
    """Mean over classes of 2 TP / (photos of the class + photos called the class)."""
    matrix = np.array(confusion)
    both = matrix.sum(axis=1) + matrix.sum(axis=0)
    return float(
        np.mean(np.divide(2 * np.diag(matrix), both, out=np.zeros(len(matrix)), where=both > 0))
    )


@pytest.mark.slow
def test_three_fold_job_writes_every_output(job):
    base = job({"k_folds": "3", "num_epochs": "2"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (base / "output" / "failure").exists()

    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    classes = [
        "Acer rubrum",
        "Erigeron canadensis",
        "Lycorma delicatula",
        "Zenaida macroura",
        "other",
    ]
    assert metrics["classes"] == classes
    assert [f["fold"] for f in metrics["folds"]] == [1, 2, 3]
    for fold in metrics["folds"]:
        assert 1 <= fold["best_epoch"] <= 2
        assert fold["macro_f1"] == pytest.approx(macro_f1_of(fold["confusion_matrix"]))
        assert len(fold["confusion_matrix"]) == 5 and len(fold["history"]) == fold["epochs_run"]
        assert set(fold["per_class"]["other"]) == {"precision", "recall", "f1", "support"}
    pooled = metrics["out_of_fold"]
    assert sum(map(sum, pooled["confusion_matrix"])) == 42  # every photo validated once
    fold_f1 = [fold["macro_f1"] for fold in metrics["folds"]]
    assert metrics["mean_macro_f1"] == pytest.approx(np.mean(fold_f1))
    assert metrics["std_macro_f1"] == pytest.approx(np.std(fold_f1))
    assert pooled["macro_f1"] == pytest.approx(macro_f1_of(pooled["confusion_matrix"]))

    data = base / "output" / "data"
    for name in [
        "report.md",
        "oof_predictions.csv",
        "confusion_pooled.png",
        "confusion_pooled_normalized.png",
        "curves.png",
        "confusion_fold-2.png",
    ]:
        assert (data / name).stat().st_size > 0, name
    with (data / "oof_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 42 and {r["fold"] for r in rows} == {"1", "2", "3"}
    probabilities = [float(rows[0][f"prob_{c}"]) for c in classes]
    assert abs(sum(probabilities) - 1) < 1e-4
    # The demo CSV has observation_uuid: grouped by observation, each in one fold only.
    folds_of = {}
    for row in rows:
        folds_of.setdefault(row["observation_uuid"], set()).add(row["fold"])
    assert all(len(folds) == 1 for folds in folds_of.values())
    report = (data / "report.md").read_text()
    assert f"mean macro-F1 over 3 fold(s): {metrics['mean_macro_f1']:.3f}" in report
    assert "Splits drawn by observation (column `observation_uuid`)" in report

    description = read_description(base / "model")
    assert description.classes == classes and description.img_size == 48
    assert [m.weights_file for m in description.members] == ["fold-1.pt", "fold-2.pt", "fold-3.pt"]
    for member in description.members:
        torch.load(base / "model" / member.weights_file, weights_only=True)
    assert len(load_members(base / "model", description)) == 3
    assert sorted(p.name for p in (base / "model").iterdir()) == [
        "fold-1.pt",
        "fold-2.pt",
        "fold-3.pt",
        "model.json",
        "model.onnx",
    ]
    # Without a holdout the portable copy is checked on photos spread over the training set.
    assert description.onnx["check"]["photos"] == 32
    assert description.onnx["check"]["largest_probability_gap"] <= 1e-4

    scraped = metric_lines.scrape(result.stdout)
    assert len(scraped["validation:macro_f1"]) == sum(f["epochs_run"] for f in metrics["folds"])
    assert scraped["cv:mean_macro_f1"] == [round(metrics["mean_macro_f1"], 4)]
    assert "eta_job<=" in result.stdout


@pytest.fixture(scope="session")
def stand_in_torch_home(tmp_path_factory):
    """ImageNet-shaped weights pretrained on other generated photos: no download here."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    pretrain_stand_in_weights(torch_home)
    return torch_home


@pytest.mark.slow
def test_a_short_run_learns(job, stand_in_torch_home):
    """Well above chance (macro-F1 about 0.2 for five classes) after three epochs per fold.

    It fine-tunes from pretrained=true, as users do; the weights file is the stand-in, found
    through TORCH_HOME exactly where the image keeps the real one.
    """
    base = job({"k_folds": "2", "num_epochs": "3", "img_size": "32", "pretrained": "true"})
    result = run_train(base, TORCH_HOME=str(stand_in_torch_home))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["mean_macro_f1"] >= 0.6, result.stdout
    assert metrics["out_of_fold"]["accuracy"] >= 0.6


def csv_path(base):
    return base / "input" / "data" / "training" / "train.csv"


# Each stage's messages are unit-tested with the stage (test_config, test_dataset); these
# few prove the failure boundary end to end, once per kind of error it reports.
BAD_INPUTS = {
    "no hyperparameters (ConfigError)": (
        lambda base: (base / "input" / "config" / "hyperparameters.json").unlink(),
        "hyperparameters.json is missing",
    ),
    "target not in csv (DatasetError)": (
        lambda base: write_hyperparameters(base, {"target_species": "Acer rubra,Zenaida macroura"}),
        r"target species 'Acer rubra' does not occur in the CSV; closest species in the CSV: 'Acer rubrum'",
    ),
    "pretrained without weights (WeightsMissingError)": (
        lambda base: write_hyperparameters(
            base, {"target_species": "Acer rubrum", "pretrained": "true"}
        ),
        r"pretrained=true but the ImageNet weights file .*efficientnet_b1_rwightman-bac287d4.pth is missing",
    ),
    "too many unreadable photos (found by the cache)": (
        lambda base: [
            p.write_bytes(b"not a jpeg")
            for p in sorted((csv_path(base).parent / "images" / "Zenaida_macroura").iterdir())[:4]
        ],
        r"too few observations for k_folds=3 after leaving out 4 unreadable photo\(s\): 'Zenaida macroura' has 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_its_own_reason(job, tmp_path, case):
    base = job()
    break_it, expected = BAD_INPUTS[case]
    break_it(base)
    result = run_train(base, TORCH_HOME=str(tmp_path / "empty-torch-home"))
    assert result.returncode == 1, result.stdout
    first_line = failure_text(base).splitlines()[0]
    assert re.search(expected, first_line), first_line
    assert "Traceback" not in failure_text(base)
    assert not (base / "model" / "model.json").exists()


@pytest.mark.slow
def test_unreadable_photos_are_left_out_and_listed_and_odd_ones_work(job):
    base = job({"k_folds": "2", "num_epochs": "1"}, photos_per_species=5)
    images = csv_path(base).parent / "images"
    broken = {
        "Acer_rubrum/0000.jpg": b"",
        "Acer_rubrum/0001.jpg": truncated_jpeg(),
        "Zenaida_macroura/0000.jpg": b"GIF89a but not really",
        "Zenaida_macroura/0001.jpg": b"plain text",
    }
    for name, data in broken.items():
        (images / name).write_bytes(data)
    (images / "Quercus_alba" / "0000.jpg").unlink()
    odd = {
        "Turdus_migratorius/0000.jpg": cmyk_jpeg(),
        "Turdus_migratorius/0001.jpg": greyscale_jpeg(),
        "Turdus_migratorius/0002.jpg": exif_rotated_jpeg(),
        "Turdus_migratorius/0003.jpg": sixteen_bit_png(),
    }
    for name, data in odd.items():
        (images / name).write_bytes(data)

    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left out 5 unreadable photo(s), listed in skipped_images.csv" in result.stdout
    with (base / "output" / "data" / "skipped_images.csv").open() as handle:
        skipped = {row["image_name"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(skipped) == {f"images/{n}" for n in broken} | {"images/Quercus_alba/0000.jpg"}
    assert "cannot open" in skipped["images/Quercus_alba/0000.jpg"]
    assert "corrupt or truncated" in skipped["images/Acer_rubrum/0001.jpg"]
    assert "not an image format" in skipped["images/Zenaida_macroura/0001.jpg"]
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["photos"] == {
        "used": 30,
        "skipped": 5,
        "per_class": {
            "Acer rubrum": 3,
            "Erigeron canadensis": 5,
            "Lycorma delicatula": 5,
            "Zenaida macroura": 3,
            "other": 14,
        },
    }
