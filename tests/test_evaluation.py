"""The report's parts from made-up folds: tables, the curves, calibration and contact sheets."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from species_classifier.calibration import apply_temperature
from species_classifier.dataset import LabelledPhotos
from species_classifier.evaluation import (
    _curves_figure,
    _sheet_choices,
    out_of_fold_frame,
    summarize,
    write_outputs,
)
from species_classifier.state import EpochRecord, FoldState

CLASSES = ["Acer rubrum", "other"]
SUMMARY = {
    "skipped": 0,
    "final_model": {"strategy": "ensemble", "members": 2},
    "seed": 42,
    "min_precision": 0.9,
}


@pytest.fixture
def channel(tmp_path):
    """Eight photos of two classes on disk, one of them portrait."""
    root = tmp_path / "channel"
    (root / "images").mkdir(parents=True)
    paths = []
    for number in range(8):
        path = root / "images" / f"{number}.jpg"
        size = (60, 90) if number == 0 else (90, 60)
        Image.new("RGB", size, (30 * number, 100, 200)).save(path)
        paths.append(path)
    photos = LabelledPhotos(
        paths=paths,
        species=["Acer rubrum"] * 4 + ["Quercus alba"] * 4,
        labels=np.array([0, 0, 0, 0, 1, 1, 1, 1]),
        classes=CLASSES,
    )
    return root, photos


def _record(epoch: int, f1: float) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 1.2 / epoch, f1, f1, 1e-4, 1.0, 100.0, math.nan)


def _folds():
    """Fold 1 validates photos 0,1,4,5; fold 2 photos 2,3,6,7. Confidences chosen so that the
    wrong answers and the unsure right ones have a known order."""
    first = FoldState(fold=1, epoch=2, best_epoch=2, best_macro_f1=0.5)
    first.history = [_record(1, 0.3), _record(2, 0.5)]
    first.best_val_probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    second = FoldState(fold=2, epoch=1, best_epoch=1, best_macro_f1=0.7)
    second.history = [_record(1, 0.7)]
    second.best_val_probs = torch.tensor([[0.55, 0.45], [0.99, 0.01], [0.1, 0.9], [0.35, 0.65]])
    return [first, second], [np.array([0, 1, 4, 5]), np.array([2, 3, 6, 7])]


def test_outputs_have_every_table_plot_and_report_section(channel, tmp_path):
    root, photos = channel
    folds, indices = _folds()
    metrics = summarize(folds, indices, photos, **SUMMARY)
    out = tmp_path / "out"
    write_outputs(out, metrics, folds, indices, photos, root, {"seed": 42})

    oof = pd.read_csv(out / "oof_predictions.csv")
    assert list(oof.columns) == [
        "image_name",
        "species_name",
        "fold",
        "true_label",
        "predicted_label",
        "confidence",
        "prob_Acer rubrum",
        "prob_other",
    ]
    assert sorted(oof["image_name"]) == [f"images/{n}.jpg" for n in range(8)]
    row = oof.set_index("image_name").loc["images/5.jpg"]
    assert (row.fold, row.true_label, row.predicted_label, row.confidence) == (
        1,
        "other",
        "Acer rubrum",
        0.6,
    )

    per_class = pd.read_csv(out / "per_class_metrics.csv")
    assert list(per_class["scope"].unique()) == ["out_of_fold", "fold-1", "fold-2"]
    pooled = per_class[per_class["scope"] == "out_of_fold"].set_index("class")
    assert pooled.loc["other", "support"] == 4
    assert pooled.loc["other", "recall"] == pytest.approx(0.75)  # photos 4, 6, 7 right; 5 wrong

    stored = json.loads((out / "metrics.json").read_text())
    assert set(stored["calibration"]) == {
        "fitted_temperature",
        "ece_before",
        "ece_after",
        "bins",
        "applied",
        "temperature",
    }
    assert stored["out_of_fold"]["macro_f1_ci95"][0] <= stored["out_of_fold"]["macro_f1"]
    assert stored["grouping"] == {"group_by": "none", "column": None, "groups": 8, "photos": 8}
    # Out-of-fold confidences, highest first, (w)rong: 0.99 0.9 0.9 0.8 0.7w 0.65 0.6w 0.55.
    # Down to 0.8 all 4 answers are right; lower, at most 5 of 6: precision 0.9 stops at 0.8,
    # as serving sees it (after the temperature).
    served = apply_temperature(np.array([[0.8, 0.2]]), stored["calibration"]["temperature"])
    assert stored["abstain"]["abstain_below"] == pytest.approx(served.max())
    assert (stored["abstain"]["coverage"], stored["abstain"]["precision"]) == (0.5, 1.0)

    lookalikes = pd.read_csv(out / "lookalikes.csv")
    assert lookalikes.to_dict("records")[0] == {
        "scope": "out_of_fold",
        "species_name": "Quercus alba",
        "class": "other",
        "photos": 4,
        "Acer rubrum": 1,
        "other": 3,
        "wrong": 1,
    }
    for name in [
        "curves.png",
        "reliability.png",
        "coverage.png",
        "mistakes_confident.png",
        "right_unsure.png",
    ]:
        with Image.open(out / name) as image:
            assert image.width > 300, name
    report = (out / "report.md").read_text()
    for part in [
        "![every fold's curves](curves.png)",
        "## Calibration: can the confidence be trusted?",
        "![reliability diagram](reliability.png)",
        "![the most confident wrong answers](mistakes_confident.png)",
        "![the least confident right answers](right_unsure.png)",
        "Fold scores are optimistic",
        "Set `holdout_fraction`",
        "| Quercus alba | other | 4 | 1 | 3 | 1 |",
        "![coverage against accuracy](coverage.png)",
        "Splits drawn photo by photo",
    ]:
        assert part in report, part
    assert report.splitlines()[2].startswith(
        f"**Pooled out-of-fold macro-F1: {stored['out_of_fold']['macro_f1']:.3f}** (95% interval "
    )


@pytest.mark.parametrize(
    ("right", "verdict"),
    [(False, "so `serve` applies it"), (True, "so `serve` does not apply it")],
    ids=["overconfident", "certain-and-right"],
)
def test_the_report_says_whether_serving_applies_the_temperature(channel, tmp_path, right, verdict):
    """Answers at 99% of which half are wrong: softening them lowers the calibration error.
    Answers at 100%, all right: nothing can lower an error of 0."""
    root, photos = channel
    folds, indices = _folds()
    for state, index in zip(folds, indices, strict=True):
        truth = photos.labels[index]
        given = truth if right else np.where(np.arange(len(truth)) % 2 == 0, truth, 1 - truth)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(given), 2).float()
        state.best_val_probs = one_hot if right else one_hot * 0.98 + 0.01
    metrics = summarize(folds, indices, photos, **SUMMARY)
    write_outputs(tmp_path / "out", metrics, folds, indices, photos, root, {})
    assert verdict in (tmp_path / "out" / "report.md").read_text()


def test_contact_sheets_pick_the_most_confident_mistakes_and_the_least_confident_hits(channel):
    root, photos = channel
    folds, indices = _folds()
    oof = out_of_fold_frame(folds, indices, photos, root)
    sheets = {name: chosen for name, chosen, _ in _sheet_choices(oof)}
    # Wrong: photo 1 (other at 0.7), photo 5 (Acer at 0.6).
    assert list(sheets["mistakes_confident"]["image_name"]) == ["images/1.jpg", "images/5.jpg"]
    # Right, least confident first: 2 (0.55), 7 (0.65), 4 (0.8), 0 and 6 (0.9), 3 (0.99).
    assert list(sheets["right_unsure"]["image_name"]) == [
        f"images/{n}.jpg" for n in (2, 7, 4, 0, 6, 3)
    ]


def test_a_job_without_mistakes_says_so_instead_of_an_empty_sheet(channel, tmp_path):
    root, photos = channel
    folds, indices = _folds()
    for state, index in zip(folds, indices, strict=True):
        state.best_val_probs = torch.nn.functional.one_hot(
            torch.from_numpy(photos.labels[index]), 2
        ).float()
    metrics = summarize(folds, indices, photos, **SUMMARY)
    out = tmp_path / "out"
    write_outputs(out, metrics, folds, indices, photos, root, {})
    assert not (out / "mistakes_confident.png").exists()
    assert "No wrong answers." in (out / "report.md").read_text()


def test_curves_show_training_macro_f1_only_where_the_records_have_it():
    folds, _ = _folds()
    without = _curves_figure(folds)
    # Per fold: validation F1 and the best-epoch star on the F1 panel; two losses on the other.
    assert [len(axis.lines) for axis in without.axes] == [4, 4]
    for state in folds:
        state.history = [dataclasses.replace(r, train_macro_f1=0.9) for r in state.history]
    with_train = _curves_figure(folds)
    assert [len(axis.lines) for axis in with_train.axes] == [4, 6]
    train_line = with_train.axes[1].lines[1]
    assert list(train_line.get_ydata()) == [0.9, 0.9] and train_line.get_linestyle() == "--"


def test_importing_evaluation_leaves_matplotlib_global_state_alone():
    code = (
        "import sys, matplotlib; backend = matplotlib.rcParams._get_backend_or_none(); "
        "import species_classifier.evaluation; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
        "assert matplotlib.rcParams._get_backend_or_none() == backend, 'backend changed'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
