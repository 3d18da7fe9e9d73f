"""Expected calibration error, the fitted temperature, and its place in model.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from species_classifier.bundle import BundleError, read_description
from species_classifier.calibration import (
    Calibration,
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from species_classifier.model import ARCHITECTURE


def test_ece_is_the_gap_between_confidence_and_accuracy_weighted_by_bin():
    probs = np.array(
        [
            [0.95, 0.05],  # right, bin 0.9-1.0
            [0.95, 0.05],  # wrong, bin 0.9-1.0: accuracy 0.5 at confidence 0.95
            [0.55, 0.45],  # right, bin 0.5-0.6
            [0.45, 0.55],  # right, bin 0.5-0.6: accuracy 1.0 at confidence 0.55
        ]
    )
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    bins = [row for row in reliability(probs, labels) if row["count"]]
    assert [(b["low"], b["count"], b["accuracy"]) for b in bins] == [(0.5, 2, 1.0), (0.9, 2, 0.5)]


def test_a_perfectly_confident_perfect_classifier_has_no_calibration_error():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 1])) == 0


def test_the_fit_finds_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 2.5), probabilities softmax(z): an overconfident model."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20_000, 5))
    truth = softmax(logits / 2.5, axis=1)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    probs = softmax(logits, axis=1).astype(np.float32)  # as the folds keep them
    assert fit_temperature(probs, labels) == pytest.approx(2.5, rel=0.05)
    calibration = calibrate(probs, labels)
    assert calibration.applied and calibration.ece_after < calibration.ece_before / 3
    assert calibration.temperature == calibration.fitted_temperature


def test_the_temperature_never_changes_the_winner_and_matches_scaled_logits():
    logits = np.random.default_rng(1).normal(0, 3, (50, 4))
    probs = softmax(logits, axis=1)
    scaled = apply_temperature(probs, 1.7)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(scaled, softmax(logits / 1.7, axis=1), atol=1e-12)


def test_a_temperature_that_does_not_lower_the_error_is_not_served():
    worse = Calibration(fitted_temperature=0.4, ece_before=0.05, ece_after=0.08)
    assert not worse.applied and worse.temperature == 1.0
    assert worse.to_dict() == {
        "fitted_temperature": 0.4,
        "ece_before": 0.05,
        "ece_after": 0.08,
        "bins": 10,
        "applied": False,
        "temperature": 1.0,
    }
    better = Calibration(fitted_temperature=1.8, ece_before=0.08, ece_after=0.02)
    assert better.applied and better.temperature == 1.8


def _description(model_dir, **extra):
    fields = {
        "classes": ["a", "other"],
        "img_size": 64,
        "members": [{"name": "fold-1", "weights_file": "fold-1.pt", "val_macro_f1": None}],
        "architecture": ARCHITECTURE,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.2, 0.2, 0.2],
        "format_version": 1,
        **extra,
    }
    model_dir.mkdir(exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(fields))
    return model_dir


def test_model_json_carries_the_temperature_and_older_bundles_read_as_one(tmp_path):
    calibration = {"ece_before": 0.1, "ece_after": 0.04, "applied": True}
    described = read_description(
        _description(tmp_path / "new", temperature=1.6, calibration=calibration)
    )
    assert described.temperature == 1.6 and described.calibration == calibration
    assert read_description(_description(tmp_path / "old")).temperature == 1.0


@pytest.mark.parametrize("temperature", [0, -1.5, "hot", None, True, float("inf")])
def test_a_temperature_that_is_not_a_positive_number_is_refused(tmp_path, temperature):
    with pytest.raises(
        BundleError, match=f"has temperature {temperature!r}: it must be a number above 0"
    ):
        read_description(_description(tmp_path, temperature=temperature))
