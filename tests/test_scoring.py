"""Numbers from predictions: bootstrap intervals, the abstain threshold, the look-alike table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from species_classifier.contract.hyperparameters import ConfigError, parse_hyperparameters
from species_classifier.scoring import (
    bootstrap_scores,
    choose_abstain_threshold,
    classification_metrics,
    coverage_curve,
    lookalike_table,
    with_intervals,
)

CLASSES = ["a", "b", "other"]


def noisy_predictions(photos: int, seed: int = 0, right: float = 0.8):
    """Labels, and predictions right `right` of the time, wrong to a random other class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, photos)
    wrong = (labels + rng.integers(1, 3, photos)) % 3
    predicted = np.where(rng.random(photos) < right, labels, wrong)
    return labels, predicted


def intervals(labels, predicted, groups, seed=1) -> dict:
    point = classification_metrics(labels, predicted, CLASSES)
    return with_intervals(point, labels, predicted, groups, CLASSES, seed)


def test_the_interval_contains_the_point_estimate_and_narrows_as_photos_grow():
    widths = []
    for photos in (30, 300, 3000):
        labels, predicted = noisy_predictions(photos)
        scores = intervals(labels, predicted, np.arange(photos))
        for value, (low, high) in [
            (scores["macro_f1"], scores["macro_f1_ci95"]),
            (scores["accuracy"], scores["accuracy_ci95"]),
            *((c["f1"], c["f1_ci95"]) for c in scores["per_class"].values()),
        ]:
            assert low <= value <= high
        widths.append(scores["macro_f1_ci95"][1] - scores["macro_f1_ci95"][0])
    assert widths[0] > widths[1] > widths[2]
    # The standard error falls as 1/sqrt(n): ten times the photos, about a third the width.
    assert widths[2] == pytest.approx(widths[1] / np.sqrt(10), rel=0.35)


def test_resampling_whole_groups_widens_the_interval_of_photos_that_come_in_groups():
    # 100 observations of 6 near-copies each: right or wrong together.
    labels, predicted = noisy_predictions(100)
    groups = np.repeat(np.arange(100), 6)
    labels, predicted = labels[groups], predicted[groups]
    by_photo = intervals(labels, predicted, np.arange(600))["accuracy_ci95"]
    by_observation = intervals(labels, predicted, groups)["accuracy_ci95"]
    # 600 photos are worth 100 observations: the honest interval is ~sqrt(6) times wider.
    assert by_observation[1] - by_observation[0] > 2 * (by_photo[1] - by_photo[0])


def test_each_resample_scores_as_scikit_learn_scores_those_photos():
    labels, predicted = noisy_predictions(40, seed=3)
    groups = np.arange(40) // 4
    boot = bootstrap_scores(labels, predicted, groups, 3, seed=5, resamples=3)
    rng = np.random.default_rng(5)
    for r in range(3):
        drawn = np.repeat(np.arange(10), rng.multinomial(10, np.full(10, 0.1)))
        rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
        # Over the classes the resample holds or predicts, as the docstring says.
        present = np.union1d(labels[rows], predicted[rows])
        expected = f1_score(labels[rows], predicted[rows], average="macro", labels=present)
        assert boot["macro_f1"][r] == pytest.approx(expected)
        assert boot["accuracy"][r] == pytest.approx((labels[rows] == predicted[rows]).mean())


def test_the_abstain_threshold_reaches_the_asked_precision_with_the_most_answers():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 2000)
    correct = rng.random(2000) < confidence  # more confident, more often right
    for min_precision in (0.8, 0.9, 0.95):
        chosen = choose_abstain_threshold(confidence, correct, min_precision)
        answered = confidence >= chosen["abstain_below"]
        assert chosen["reached"] and correct[answered].mean() >= min_precision
        assert chosen["coverage"] == pytest.approx(answered.mean())
        assert chosen["precision"] == pytest.approx(correct[answered].mean())
        # Any lower threshold would answer more photos but miss the precision.
        lower = confidence[confidence < chosen["abstain_below"]]
        for threshold in np.sort(lower)[-50:]:
            assert correct[confidence >= threshold].mean() < min_precision


def test_a_precision_no_threshold_reaches_abstains_on_everything():
    chosen = choose_abstain_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.99)
    assert chosen == {
        "min_precision": 0.99,
        "abstain_below": 1.0,
        "coverage": 0.0,
        "precision": None,
        "reached": False,
    }


def test_photos_of_equal_confidence_are_answered_together():
    curve = coverage_curve(np.array([0.9, 0.7, 0.7, 0.5]), np.array([True, True, False, True]))
    assert curve.to_dict("list") == {
        "threshold": [0.9, 0.7, 0.5],
        "coverage": [0.25, 0.75, 1.0],
        "precision": [1.0, 2 / 3, 0.75],
    }


def test_the_lookalike_table_counts_each_species_and_puts_look_alikes_called_a_target_first():
    predictions = pd.DataFrame(
        {
            "species_name": ["Acer rubrum"] * 3 + ["Acer saccharum"] * 4 + ["Quercus alba"] * 2,
            "true_label": ["Acer rubrum"] * 3 + ["other"] * 6,
            "predicted_label": ["Acer rubrum", "other", "Acer rubrum"]
            + ["Acer rubrum", "Acer rubrum", "other", "other"]
            + ["other", "other"],
        }
    )
    table = lookalike_table(predictions, ["Acer rubrum", "other"], "other")
    assert table.to_dict("records") == [
        {
            "species_name": "Acer saccharum",
            "class": "other",
            "photos": 4,
            "Acer rubrum": 2,
            "other": 2,
            "wrong": 2,
        },
        {
            "species_name": "Acer rubrum",
            "class": "Acer rubrum",
            "photos": 3,
            "Acer rubrum": 2,
            "other": 1,
            "wrong": 1,
        },
        {
            "species_name": "Quercus alba",
            "class": "other",
            "photos": 2,
            "Acer rubrum": 0,
            "other": 2,
            "wrong": 0,
        },
    ]


def test_a_class_a_resample_lacks_is_left_out_of_its_scores_not_scored_zero():
    # Class 1 is one photo, always right: resamples without it must not score it 0.
    labels = np.array([0] * 20 + [1] + [2] * 20)
    predicted = labels.copy()
    predicted[:2] = 2
    scores = intervals(labels, predicted, np.arange(len(labels)))
    assert scores["per_class"]["b"]["f1_ci95"] == [1.0, 1.0]
    assert scores["macro_f1_ci95"][0] > 0.85


def test_min_precision_is_a_hyperparameter_from_0_to_1():
    assert parse_hyperparameters({"target_species": "a"}).min_precision == 0.95
    assert (
        parse_hyperparameters({"target_species": "a", "min_precision": "0.8"}).min_precision == 0.8
    )
    with pytest.raises(ConfigError, match="min_precision=1.5 is out of range: allowed 0.0 to 1.0"):
        parse_hyperparameters({"target_species": "a", "min_precision": 1.5})
