"""The honest number: photos set aside before the folds, scored once by the served model.

Fold scores are optimistic: each fold's validation photos also choose its best epoch, so
the score reported is the best of many looks at the same photos. With
`holdout_fraction` > 0 a share of the photos is set aside before the folds are made, whole
groups at a time (observations or observers: dataset.py) and stratified as closely as the
groups allow, never seen in training nor in choosing an epoch, and scored once at the end
with the model bundle exactly as `serve` loads it (the `Predictor`: the fold ensemble or the
refit model, with the stored temperature and abstain threshold). Its scores carry 95%
bootstrap intervals over its groups: a holdout of a dozen photos is a rough number.

Not the 70/30 validation split of `k_folds=1` (dataset.py), which chooses the epoch.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from species_classifier.calibration import expected_calibration_error
from species_classifier.dataset import GROUP_NOUNS, DatasetError, LabelledPhotos, split_groups
from species_classifier.imaging import PhotoError, decode_photo
from species_classifier.predictor import Predictor, usable_cpus
from species_classifier.scoring import (
    answered_at,
    classification_metrics,
    predictions_frame,
    with_intervals,
)

_log = logging.getLogger(__name__)

# Photos decoded and predicted at a time: bounds the memory of a large holdout.
CHUNK = 256


@dataclass(frozen=True)
class HoldoutResult:
    metrics: dict  # metrics.json's "holdout"
    predictions: pd.DataFrame  # one row per scored photo, as in oof_predictions.csv


def set_aside(
    photos: LabelledPhotos, fraction: float, seed: int
) -> tuple[LabelledPhotos, LabelledPhotos | None]:
    """(photos for the folds, the holdout: whole groups, stratified as closely as they allow);
    no holdout when fraction is 0."""
    if fraction == 0:
        return photos, None
    counts = photos.class_counts()
    total, classes = len(photos.labels), len(photos.classes)
    noun = GROUP_NOUNS[photos.group_by]
    lonely = [
        f"{name!r} has {count}" for name, count in photos.groups_per_class().items() if count < 2
    ]
    if lonely:
        raise DatasetError(
            f"holdout_fraction={fraction} needs at least 2 {noun} per class, one to hold out "
            f"and one for the folds: {', '.join(lonely)}. Add {noun} or use holdout_fraction=0"
        )
    held_count = math.ceil(fraction * total)
    if held_count < classes:
        raise DatasetError(
            f"holdout_fraction={fraction} of {total} photos sets aside {held_count}, fewer than "
            f"the {classes} classes: raise it to at least {math.ceil(100 * classes / total) / 100} or add photos"
        )
    _, held = split_groups(photos.labels, photos.group_ids(), fraction, seed)
    held_counts = np.bincount(photos.labels[held], minlength=len(photos.classes))
    missing = [name for name, count in zip(photos.classes, held_counts, strict=True) if not count]
    if missing:
        listed = ", ".join(f"{name!r} ({counts[name]} photos)" for name in missing)
        raise DatasetError(
            f"holdout_fraction={fraction} of {total} photos sets aside no photo "
            f"of {listed}: every class needs at least one in the holdout and enough left for "
            "the folds. Raise holdout_fraction, add photos, or use holdout_fraction=0"
        )
    keep = np.ones(len(photos.labels), dtype=bool)
    keep[held] = False
    _log.info(
        "holdout: %d photos (%d %s) set aside before the folds (%s), scored once at the end",
        len(held),
        len(np.unique(photos.group_ids()[held])),
        noun,
        ", ".join(
            f"{name} {count}" for name, count in zip(photos.classes, held_counts, strict=True)
        ),
    )
    return photos.subset(keep), photos.subset(~keep)


def score(model_dir: Path, holdout: LabelledPhotos, channel_dir: Path, seed: int) -> HoldoutResult:
    """Predict every holdout photo with the bundle in model_dir, as `serve` would; `seed`
    draws the bootstrap resamples."""
    predictor = Predictor(model_dir)
    scored, probabilities, unreadable = [], [], 0
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        for start in range(0, len(holdout.labels), CHUNK):
            rows = range(start, min(start + CHUNK, len(holdout.labels)))
            decoded = pool.map(lambda row: _decode(holdout, row, predictor.img_size), rows)
            images = {
                row: pixels for row, pixels in zip(rows, decoded, strict=True) if pixels is not None
            }
            unreadable += len(rows) - len(images)
            for row, answer in zip(images, predictor.predict(list(images.values())), strict=True):
                scored.append(row)
                probabilities.append([answer["class_probabilities"][c] for c in holdout.classes])
    if not scored:
        raise DatasetError(f"none of the {len(holdout.labels)} holdout photos could be read")
    rows = np.array(scored, dtype=np.int64)
    probs = np.array(probabilities, dtype=np.float64).reshape(len(rows), len(holdout.classes))
    labels, predicted = holdout.labels[rows], probs.argmax(axis=1)
    point = classification_metrics(labels, predicted, holdout.classes)
    groups = holdout.group_ids()[rows]
    metrics = {
        "count": len(rows),
        "unreadable": unreadable,
        **with_intervals(point, labels, predicted, groups, holdout.classes, seed),
        "ece": expected_calibration_error(probs, labels),
        "answered": answered_at(probs.max(axis=1), predicted == labels, predictor.abstain_below),
    }
    _log.info(
        "holdout: %d photos, macro_f1=%.4f (95%% CI %.4f-%.4f) accuracy=%.4f ece=%.4f "
        "(the served model, once)",
        metrics["count"],
        metrics["macro_f1"],
        *metrics["macro_f1_ci95"],
        metrics["accuracy"],
        metrics["ece"],
    )
    return HoldoutResult(metrics, predictions_frame(holdout, rows, probs, channel_dir))


def _decode(holdout: LabelledPhotos, row: int, img_size: int) -> np.ndarray | None:
    try:
        return decode_photo(holdout.paths[row], img_size)
    except PhotoError as error:
        _log.warning("holdout photo %s left out: %s", holdout.paths[row], error)
        return None
