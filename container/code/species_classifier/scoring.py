"""Numbers from predictions: the predictions table, per-class scores, confusion matrices,
95% bootstrap intervals, the look-alike table and the confidence below which the model
should say "unsure".

Pure functions of labels, predictions and groups (no plots, no files), shared by the
cross-validation summary (evaluation.py) and the holdout (holdout.py).

Intervals: a percentile bootstrap that resamples whole groups (observations or observers)
with replacement, not photos: photos of one group are not independent, and resampling them
one by one would make the interval too narrow (the cluster bootstrap; Field and Welsh 2007,
"Bootstrapping clustered data", J. R. Stat. Soc. B 69(3)). Without groups each photo is its
own group, the ordinary bootstrap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from species_classifier.dataset import LabelledPhotos

RESAMPLES = 1000
CONFIDENCE_LEVEL = 0.95
# Resamples drawn at once: bounds the (resamples x groups) weight matrix to ~80 MB.
_WEIGHTS_PER_CHUNK = 10_000_000


def per_class_frame(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(classes, name="class"),
    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    per_class = per_class_frame(y_true, y_pred, classes)
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    return {
        "macro_f1": float(per_class["f1"].mean()),
        "accuracy": float((y_true == y_pred).mean()),
        "per_class": {
            name: {
                "precision": float(row.precision),
                "recall": float(row.recall),
                "f1": float(row.f1),
                "support": int(row.support),
            }
            for name, row in per_class.iterrows()
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_normalized": np.round(normalised, 4).tolist(),
    }


def predictions_frame(
    photos: LabelledPhotos, rows: np.ndarray, probs: np.ndarray, channel_dir: Path
) -> pd.DataFrame:
    """One row per photo (photos' rows `rows`): names, its group where there are groups,
    true and predicted class, confidence and every class probability."""
    classes = np.array(photos.classes)
    described = pd.DataFrame(
        {
            "image_name": [str(photos.paths[r].relative_to(channel_dir)) for r in rows],
            "species_name": [photos.species[r] for r in rows],
            "true_label": classes[photos.labels[rows]],
            "predicted_label": classes[probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    if photos.group_column:
        described.insert(1, photos.group_column, photos.groups[rows])
    probabilities = pd.DataFrame(probs, columns=[f"prob_{name}" for name in photos.classes])
    return pd.concat([described, probabilities], axis=1)


def with_intervals(
    metrics: dict,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    seed: int,
) -> dict:
    """classification_metrics plus 95% bootstrap intervals: `macro_f1_ci95`, `accuracy_ci95`
    and each class's `f1_ci95`, as [low, high]."""
    boot = bootstrap_scores(y_true, y_pred, groups, len(classes), seed)
    tail = 100 * (1 - CONFIDENCE_LEVEL) / 2

    def interval(values: np.ndarray) -> list[float] | None:
        scored = values[~np.isnan(values)]
        if not len(scored):  # a class no resample holds or predicts
            return None
        low, high = np.percentile(scored, [tail, 100 - tail])
        return [round(float(low), 4), round(float(high), 4)]

    per_class = {
        name: {**scores, "f1_ci95": interval(boot["f1"][:, k])}
        for k, (name, scores) in enumerate(metrics["per_class"].items())
    }
    return {
        **metrics,
        "macro_f1_ci95": interval(boot["macro_f1"]),
        "accuracy_ci95": interval(boot["accuracy"]),
        "per_class": per_class,
        "resampled": f"{RESAMPLES} resamples of {len(np.unique(groups))} groups",
    }


def bootstrap_scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    seed: int,
    resamples: int = RESAMPLES,
) -> dict[str, np.ndarray]:
    """Macro-F1, accuracy (resamples) and per-class F1 (resamples x classes) of resamples
    that draw as many groups as there are, with replacement. A class that a resample neither
    holds nor predicts has no F1 there (NaN), and macro-F1 averages the classes that do:
    scoring it 0 would drag a small sample's interval down to 0 for no mistake made.

    Each group's confusion matrix is counted once; a resample's matrix is then the sum of
    its groups' matrices weighted by how often each was drawn, one matrix product per chunk.
    """
    _, group_of = np.unique(groups, return_inverse=True)
    n_groups = int(group_of.max()) + 1
    cells = n_classes * n_classes
    per_group = np.zeros((n_groups, cells))
    np.add.at(per_group, (group_of, y_true * n_classes + y_pred), 1)
    rng = np.random.default_rng(seed)
    chunk = max(1, _WEIGHTS_PER_CHUNK // n_groups)
    matrices = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        weights = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        matrices.append(weights @ per_group)
    matrix = np.concatenate(matrices).reshape(resamples, n_classes, n_classes)
    true_positive = np.diagonal(matrix, axis1=1, axis2=2)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (photos of the class + photos called the class).
    denominator = matrix.sum(axis=2) + matrix.sum(axis=1)
    f1 = np.divide(
        2 * true_positive,
        denominator,
        out=np.full(true_positive.shape, np.nan),
        where=denominator > 0,
    )
    return {
        "macro_f1": np.nanmean(f1, axis=1),
        "accuracy": true_positive.sum(axis=1) / matrix.sum(axis=(1, 2)),
        "f1": f1,
    }


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """For each distinct confidence t, highest first: the share of photos answered when the
    model abstains below t (`coverage`), and the accuracy of those answers (`precision`)."""
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    hits = np.cumsum(correct[order])
    # Photos with equal confidence are answered or not together: keep the last of each run.
    last = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    answered = np.flatnonzero(last) + 1
    return pd.DataFrame(
        {
            "threshold": sorted_confidence[last],
            "coverage": answered / len(confidence),
            "precision": hits[last] / answered,
        }
    )


def choose_abstain_threshold(
    confidence: np.ndarray, correct: np.ndarray, min_precision: float
) -> dict:
    """The lowest confidence threshold at which the answers given reach `min_precision`,
    which is the one that answers the most photos. Where no threshold reaches it, the model
    abstains on everything (`abstain_below` 1.0, `reached` false)."""
    curve = coverage_curve(confidence, correct)
    good = curve[curve["precision"] >= min_precision]
    if good.empty:
        return {
            "min_precision": min_precision,
            "abstain_below": 1.0,
            "coverage": 0.0,
            "precision": None,
            "reached": False,
        }
    chosen = good.iloc[-1]
    return {
        "min_precision": min_precision,
        "abstain_below": float(chosen["threshold"]),
        "coverage": float(chosen["coverage"]),
        "precision": float(chosen["precision"]),
        "reached": True,
    }


def answered_at(confidence: np.ndarray, correct: np.ndarray, abstain_below: float) -> dict:
    """Coverage and precision of the answers given when abstaining below `abstain_below`."""
    answered = confidence >= abstain_below
    return {
        "abstain_below": abstain_below,
        "coverage": float(answered.mean()),
        "precision": float(correct[answered].mean()) if answered.any() else None,
    }


def lookalike_table(predictions: pd.DataFrame, classes: list[str], other: str) -> pd.DataFrame:
    """Per species of the CSV (every target, and every species behind `other`): its class,
    how many photos went to each predicted class, and how many were wrong. The costly errors
    first: look-alikes called a target, most first; then targets missed, most first."""
    counts = pd.crosstab(
        [predictions["species_name"], predictions["true_label"]], predictions["predicted_label"]
    ).reindex(columns=classes, fill_value=0)
    table = counts.reset_index().rename(columns={"true_label": "class"})
    table.columns.name = None
    table.insert(2, "photos", counts.sum(axis=1).to_numpy())
    right = np.array([counts.loc[key, key[1]] for key in counts.index])
    table["wrong"] = table["photos"].to_numpy() - right
    table["_lookalike_error"] = (table["class"] == other) & (table["wrong"] > 0)
    return (
        table.sort_values(
            ["_lookalike_error", "wrong", "species_name"],
            ascending=[False, False, True],
            kind="stable",
        )
        .drop(columns="_lookalike_error")
        .reset_index(drop=True)
    )
