#!/usr/bin/env python3
"""How much grouping matters: the same models scored with folds drawn photo by photo
(group_by=none) and by observation (group_by=observation), side by side in one run.

The photos are generated with near-copies per observation (the same individual, a little
moved, under other light) and a class colour mixed with a tint of the observation's own,
so that an individual is easier to recognise than its species, as on iNaturalist. Two
models are scored on both kinds of folds, with the same seed:

- efficientnet_b1 fine-tuned from the stand-in weights by the project's own trainer;
- 1-nearest-neighbour on 16 px pixels, a pure memoriser: it answers with the label of the
  most similar photo it has seen, which is a near-copy wherever the split left one.

Each row's interval is the one that row's report would print: resampling photos for the
photo-by-photo folds, observations for the grouped ones.

    .venv/bin/python scripts/bench_grouping.py [--output docs/benchmarks/grouping-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "container" / "code"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe, publish  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from species_classifier.cache import build_cache  # noqa: E402
from species_classifier.contract.hyperparameters import TrainingConfig  # noqa: E402
from species_classifier.dataset import label_photos, make_folds, read_rows  # noqa: E402
from species_classifier.demo_data import (  # noqa: E402
    DEMO_TARGETS,
    make_demo_dataset,
    pretrain_stand_in_weights,
)
from species_classifier.imaging import decode_photo  # noqa: E402
from species_classifier.model import build_model  # noqa: E402
from species_classifier.scoring import classification_metrics, with_intervals  # noqa: E402
from species_classifier.state import FoldState  # noqa: E402
from species_classifier.trainer import FoldData, FoldTrainer  # noqa: E402

MEMORISER_PX = 16


def cnn_predictions(cache, labels, folds, config, classes) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold predictions of the fine-tuned network (best epoch), and each fold's F1."""
    predicted = np.empty(len(labels), dtype=np.int64)
    fold_f1 = []
    for fold, (train_index, val_index) in enumerate(folds, start=1):
        torch.manual_seed(config.seed)
        trainer = FoldTrainer(
            build_model(classes, pretrained=True), config, torch.device("cpu"), classes
        )
        data = FoldData(
            torch.from_numpy(cache.pixels),
            torch.from_numpy(cache.sizes),
            torch.from_numpy(labels),
            train_index,
            val_index,
        )
        state = trainer.run(data, FoldState(fold=fold), on_epoch_end=lambda _state: None)
        predicted[val_index] = state.best_val_probs.argmax(1).numpy()
        fold_f1.append(state.best_macro_f1)
    return predicted, fold_f1


def memoriser_predictions(features, labels, folds, classes) -> tuple[np.ndarray, list[float]]:
    predicted = np.empty(len(labels), dtype=np.int64)
    fold_f1 = []
    for train_index, val_index in folds:
        model = KNeighborsClassifier(n_neighbors=1).fit(features[train_index], labels[train_index])
        predicted[val_index] = model.predict(features[val_index])
        names = [str(k) for k in range(classes)]
        fold_f1.append(
            classification_metrics(labels[val_index], predicted[val_index], names)["macro_f1"]
        )
    return predicted, fold_f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos-per-species", type=int, default=24)
    parser.add_argument("--max-photos-per-observation", type=int, default=4)
    parser.add_argument("--class-colour-share", type=float, default=0.3)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stand-in-steps", type=int, default=120)
    parser.add_argument("--skip-cnn", action="store_true", help="only the memoriser (seconds)")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        channel = root / "photos"
        csv_path = make_demo_dataset(
            channel,
            args.photos_per_species,
            photo_size=500,
            max_photos_per_observation=args.max_photos_per_observation,
            class_colour_share=args.class_colour_share,
        )
        photos = label_photos(
            read_rows(csv_path, "observation"), channel, DEMO_TARGETS, False, 0.5, 42
        )
        labels, classes = photos.labels, len(photos.classes)
        config = TrainingConfig(
            target_species=DEMO_TARGETS,
            img_size=args.img_size,
            batch_size=args.batch_size,
            num_epochs=args.epochs,
            epoch_patience=args.epochs,
            pretrained=True,
        )
        splits = {
            "photo by photo (group_by=none)": (
                make_folds(labels, args.folds, config.seed),
                np.arange(len(labels)),
            ),
            "by observation (group_by=observation)": (
                make_folds(labels, args.folds, config.seed, photos.groups),
                photos.groups,
            ),
        }
        features = np.stack(
            [decode_photo(path, MEMORISER_PX).reshape(-1) for path in photos.paths]
        ).astype(np.float32)
        models = {"1-nearest-neighbour, 16 px (memoriser)": memoriser_predictions}
        if not args.skip_cnn:
            os.environ["TORCH_HOME"] = str(root / "torch_home")
            pretrain_stand_in_weights(root / "torch_home", steps=args.stand_in_steps)
            cache = build_cache(photos.paths, channel, args.img_size, workers=0)
            models[f"efficientnet_b1, {args.img_size} px, {args.epochs} epochs"] = (
                lambda _features, labels, folds, classes: cnn_predictions(
                    cache, labels, folds, config, classes
                )
            )
        rows = []
        for model_name, predict in models.items():
            for split_name, (folds, groups) in splits.items():
                predicted, fold_f1 = predict(features, labels, folds, classes)
                scores = with_intervals(
                    classification_metrics(labels, predicted, photos.classes),
                    labels,
                    predicted,
                    groups,
                    photos.classes,
                    config.seed,
                )
                low, high = scores["macro_f1_ci95"]
                rows.append(
                    f"| {model_name} | {split_name} | {np.mean(fold_f1):.3f} "
                    f"| {scores['macro_f1']:.3f} ({low:.2f}-{high:.2f}) "
                    f"| {scores['accuracy']:.3f} |"
                )

    observations = len(set(photos.groups))
    lines = [
        f"Machine: {describe()} (at the start: " + ", ".join(f"{v:.1f}" for v in load_before) + ")",
        f"Photos: {len(labels)} generated JPEGs in {observations} observations (1 to "
        f"{args.max_photos_per_observation} near-copies each), {classes} classes, class colour "
        f"share {args.class_colour_share}; {args.folds} folds, seed 42; whole run "
        f"{time.perf_counter() - started:.0f} s",
        "",
        "| model | folds drawn | mean macro-F1 over folds | pooled out-of-fold macro-F1 "
        "(95% interval) | accuracy |",
        "|---|---|---|---|---|",
        *rows,
    ]
    publish(lines, args.output, "Grouping: folds photo by photo against by observation", __file__)


if __name__ == "__main__":
    main()
