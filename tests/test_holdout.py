"""The holdout: a stratified split before the folds, scored once by the served bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from job_helpers import run_train
from serving_helpers import CLASSES, make_bundle, photo
from sklearn.metrics import f1_score
from species_classifier import holdout
from species_classifier.bundle import read_description
from species_classifier.calibration import expected_calibration_error
from species_classifier.contract.hyperparameters import ConfigError, parse_hyperparameters
from species_classifier.dataset import DatasetError, LabelledPhotos
from species_classifier.imaging import decode_photo
from species_classifier.predictor import Predictor


def _photos(counts: list[int], root: Path = Path("/channel")) -> LabelledPhotos:
    labels = np.repeat(np.arange(len(counts)), counts)
    return LabelledPhotos(
        paths=[root / f"images/{i}.jpg" for i in range(len(labels))],
        species=[f"species {label}" for label in labels],
        labels=labels,
        classes=[f"class {k}" for k in range(len(counts))],
    )


def test_no_fraction_means_no_holdout_and_every_photo_for_the_folds():
    photos = _photos([10, 20])
    kept, held = holdout.set_aside(photos, 0.0, seed=42)
    assert held is None and kept is photos


def test_the_holdout_is_stratified_disjoint_and_the_same_for_the_same_seed():
    photos = _photos([20, 40, 100])
    kept, held = holdout.set_aside(photos, 0.2, seed=42)
    assert held.class_counts() == {"class 0": 4, "class 1": 8, "class 2": 20}
    assert kept.class_counts() == {"class 0": 16, "class 1": 32, "class 2": 80}
    assert set(kept.paths).isdisjoint(held.paths)
    assert set(kept.paths) | set(held.paths) == set(photos.paths)
    again, held_again = holdout.set_aside(photos, 0.2, seed=42)
    assert held_again.paths == held.paths and again.paths == kept.paths
    assert holdout.set_aside(photos, 0.2, seed=7)[1].paths != held.paths


def test_a_class_of_one_photo_or_a_holdout_smaller_than_the_classes_is_a_clear_error():
    with pytest.raises(
        DatasetError, match=r"needs at least 2 photos per class, .*'class 1' has 1\."
    ):
        holdout.set_aside(_photos([10, 1, 10]), 0.2, seed=42)
    with pytest.raises(
        DatasetError,
        match=r"holdout_fraction=0.1 of 21 photos sets aside 3, fewer than the 4 classes: "
        r"raise it to at least 0.2 or add photos",
    ):
        holdout.set_aside(_photos([6, 5, 5, 5]), 0.1, seed=42)


def test_a_holdout_too_small_for_every_class_is_a_clear_error():
    with pytest.raises(DatasetError) as error:
        holdout.set_aside(_photos([2, 30, 30]), 0.05, seed=42)
    assert str(error.value).startswith("holdout_fraction=0.05 of 62 photos sets aside no photo of")
    assert "'class 0' (2 photos)" in str(error.value)
    assert "Raise holdout_fraction, add photos, or use holdout_fraction=0" in str(error.value)


@pytest.mark.parametrize(("value", "expected"), [("0.15", 0.15), (0.5, 0.5), ("0", 0.0)])
def test_holdout_fraction_is_a_hyperparameter_off_by_default(value, expected):
    raw = {"target_species": "a", "holdout_fraction": value}
    assert parse_hyperparameters(raw).holdout_fraction == expected
    assert parse_hyperparameters({"target_species": "a"}).holdout_fraction == 0.0


def test_a_holdout_fraction_above_one_half_is_refused():
    with pytest.raises(
        ConfigError, match="holdout_fraction=0.7 is out of range: allowed 0.0 to 0.5"
    ):
        parse_hyperparameters({"target_species": "a", "holdout_fraction": 0.7})


def test_the_score_is_what_the_served_bundle_answers(tmp_path):
    model_dir = make_bundle(tmp_path / "model", img_size=48, members=2)
    channel = tmp_path / "channel"
    (channel / "images").mkdir(parents=True)
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    paths = []
    for number in range(len(labels)):
        path = channel / "images" / f"{number}.jpg"
        path.write_bytes(photo(number))
        paths.append(path)
    paths[7].write_bytes(b"not a photo")  # unreadable: left out and counted
    held = LabelledPhotos(paths, [CLASSES[k] for k in labels], labels, CLASSES)

    result = holdout.score(model_dir, held, channel, seed=42)

    served = Predictor(model_dir).predict([decode_photo(p, 48) for p in paths[:7]])
    expected = np.array([[a["class_probabilities"][c] for c in CLASSES] for a in served])
    got = result.predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert list(result.predictions["image_name"]) == [f"images/{n}.jpg" for n in range(7)]
    predicted = expected.argmax(1)
    assert result.metrics["count"] == 7 and result.metrics["unreadable"] == 1
    assert result.metrics["macro_f1"] == pytest.approx(
        f1_score(labels[:7], predicted, average="macro", labels=range(5), zero_division=0)
    )
    assert result.metrics["accuracy"] == pytest.approx((predicted == labels[:7]).mean())
    assert result.metrics["ece"] == pytest.approx(expected_calibration_error(expected, labels[:7]))
    low, high = result.metrics["macro_f1_ci95"]
    assert low <= result.metrics["macro_f1"] <= high
    # The bundle says nothing of abstaining: every answer given, none unsure.
    assert result.metrics["answered"]["coverage"] == 1.0


@pytest.mark.slow
def test_a_job_with_a_holdout_scores_it_once_and_reports_it(job):
    base = job(
        {"holdout_fraction": "0.25", "k_folds": "2", "num_epochs": "1", "img_size": "32"},
        photos_per_species=6,
    )
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    data = base / "output" / "data"
    metrics = json.loads((data / "metrics.json").read_text())
    held = metrics["holdout"]
    # 42 photos in one-photo observations, a quarter of each class set aside, the share
    # rounded to whole photos (6 x 0.25 = 1.5 -> 2; 18 x 0.25 = 4.5 -> 5): 13.
    assert held["count"] + held["unreadable"] == 13
    assert [scores["support"] for scores in held["per_class"].values()] == [2, 2, 2, 2, 5]
    assert sum(map(sum, held["confusion_matrix"])) == held["count"]
    assert metrics["photos"]["used"] == 29
    oof = pd.read_csv(data / "oof_predictions.csv")
    scored = pd.read_csv(data / "holdout_predictions.csv")
    assert len(oof) == 29 and len(scored) == held["count"]
    assert set(oof["image_name"]).isdisjoint(scored["image_name"])
    assert set(oof["observation_uuid"]).isdisjoint(scored["observation_uuid"])
    assert "holdout: 13 photos (13 observations) set aside before the folds" in result.stdout

    report = (data / "report.md").read_text()
    assert "## Holdout: the served model on photos it never saw" in report
    assert report.startswith(
        "# Species classifier: cross-validation report\n\n"
        f"**Holdout macro-F1: {held['macro_f1']:.3f}** (95% interval "
        f"{held['macro_f1_ci95'][0]:.2f}-{held['macro_f1_ci95'][1]:.2f})"
    )
    assert (data / "confusion_holdout_normalized.png").stat().st_size > 0

    description = read_description(base / "model")
    assert description.temperature == metrics["calibration"]["temperature"]
    assert description.calibration["applied"] == metrics["calibration"]["applied"]
    assert description.abstain_below == metrics["abstain"]["abstain_below"]
    # The portable copy is checked on the photos the model never saw.
    assert (base / "model" / "model.onnx").is_file()
    assert description.onnx["check"]["photos"] == held["count"]
    assert description.onnx["check"]["largest_probability_gap"] <= 1e-4
    assert "model.onnx: " in result.stdout and "largest probability gap to PyTorch" in result.stdout
