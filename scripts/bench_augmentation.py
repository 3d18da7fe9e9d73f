#!/usr/bin/env python3
"""The photo cache squashed to a square (before) against photos at their true aspect (now),
side by side in one run on generated photos of mixed shapes (landscape 4:3, portrait 3:4,
square): the crops training sees, the cache's memory, macro-F1 and epoch time.

Both arms train the same network from the same (stand-in) weights with the same seed,
folds and trainer, and both draw crops with torchvision's RandomResizedCrop rule; the only
difference is what the crop is drawn from: the squashed img_size square (the old cache;
the old code also clamped a crop that did not fit instead of drawing again) or the photo
at its true shape. Folds alternate between the arms, so a change in the machine's load
falls on both.

    .venv/bin/python scripts/bench_augmentation.py [--output docs/benchmarks/augmentation-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "container" / "code"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe, publish  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from species_classifier.augment import crop_boxes  # noqa: E402
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
from species_classifier.state import FoldState  # noqa: E402
from species_classifier.stores import HEIGHT, ROWS, WIDTH  # noqa: E402
from species_classifier.trainer import FoldData, FoldTrainer  # noqa: E402

CROP_DRAWS = 20  # crops drawn per photo for the geometry columns


@dataclass
class Arm:
    name: str
    pixels: np.ndarray
    sizes: np.ndarray  # what the crop is drawn from: the square, or the true photo
    true_sizes: np.ndarray  # (N, 2) true height, width
    states: list[FoldState]
    train_seconds: list[float]
    epoch_seconds: list[float]


def square_arm(paths: list[Path], img_size: int, true_sizes: np.ndarray) -> Arm:
    """The old cache: every photo squashed to img_size x img_size, crops drawn from that."""
    pixels = np.stack([decode_photo(path, img_size) for path in paths])
    sizes = np.full((len(paths), 4), img_size, dtype=np.int32)
    return Arm("squashed square (before)", pixels, sizes, true_sizes, [], [], [])


def crop_geometry(arm: Arm, img_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per drawn crop: its stretch on the way to the square input, max(w/h, h/w) measured in
    the true photo's pixels; whether it is enlarged (a side with fewer cached pixels than
    img_size); and the cached pixels behind each input pixel."""
    sizes = torch.from_numpy(np.repeat(arm.sizes, CROP_DRAWS, axis=0))
    boxes = crop_boxes(sizes, torch.Generator().manual_seed(0)).double().numpy()
    crop_h, crop_w = boxes[:, 2], boxes[:, 3]
    true = np.repeat(arm.true_sizes, CROP_DRAWS, axis=0).astype(np.float64)
    drawn = sizes.numpy().astype(np.float64)
    # Fractions of the photo the crop covers, then its shape in the true photo's pixels.
    frac_h, frac_w = crop_h / drawn[:, HEIGHT], crop_w / drawn[:, WIDTH]
    aspect = (frac_w * true[:, 1]) / (frac_h * true[:, 0])
    stretch = np.maximum(aspect, 1 / aspect)
    stored_short = drawn[:, ROWS]
    stored_scale = stored_short / np.minimum(drawn[:, HEIGHT], drawn[:, WIDTH])
    enlarged = np.minimum(crop_h, crop_w) * stored_scale < img_size
    behind = (crop_h * stored_scale) * (crop_w * stored_scale) / img_size**2
    return stretch, enlarged, behind


def train_fold(arm: Arm, fold: int, split, labels, config, classes) -> None:
    train_index, val_index = split
    torch.manual_seed(config.seed)
    trainer = FoldTrainer(
        build_model(classes, pretrained=True), config, torch.device("cpu"), classes
    )
    data = FoldData(
        torch.from_numpy(arm.pixels),
        torch.from_numpy(arm.sizes),
        torch.from_numpy(labels),
        train_index,
        val_index,
    )
    state = trainer.run(data, FoldState(fold=fold), on_epoch_end=lambda _state: None)
    arm.states.append(state)
    arm.train_seconds += [len(train_index) / r.img_per_s for r in state.history]
    arm.epoch_seconds += [r.seconds for r in state.history]


def out_of_fold_f1(arm: Arm, folds, labels) -> float:
    predicted = np.empty(len(labels), dtype=np.int64)
    for state, (_, val_index) in zip(arm.states, folds, strict=True):
        predicted[val_index] = state.best_val_probs.argmax(1).numpy()
    return float(f1_score(labels, predicted, average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--photos-per-species", type=int, default=12)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--stand-in-steps", type=int, default=120, help="pretraining steps of the stand-in weights"
    )
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["TORCH_HOME"] = str(root / "torch_home")
        pretrain_stand_in_weights(root / "torch_home", steps=args.stand_in_steps)
        channel = root / "photos"
        csv_path = make_demo_dataset(channel, args.photos_per_species, photo_size=500)
        photos = label_photos(read_rows(csv_path), channel, DEMO_TARGETS, False, 0.5, 42)
        cache = build_cache(photos.paths, channel, args.img_size, workers=0)
        true_sizes = cache.sizes[:, [HEIGHT, WIDTH]]
        arms = [
            square_arm(photos.paths, args.img_size, true_sizes),
            Arm("true shape (now)", cache.pixels, cache.sizes, true_sizes, [], [], []),
        ]
        config = TrainingConfig(
            target_species=DEMO_TARGETS,
            img_size=args.img_size,
            batch_size=args.batch_size,
            num_epochs=args.epochs,
            epoch_patience=args.epochs,
            pretrained=True,
        )
        folds = make_folds(photos.labels, args.folds, config.seed)
        classes = len(photos.classes)
        for fold, split in enumerate(folds, start=1):
            for arm in arms:
                train_fold(arm, fold, split, photos.labels, config, classes)

    shapes = [tuple(s) for s in true_sizes.tolist()]
    lines = [
        f"Machine: {describe()} (at the start: " + ", ".join(f"{v:.1f}" for v in load_before) + ")",
        f"Photos: {len(shapes)} generated JPEGs, {len(photos.classes)} classes, "
        f"{shapes.count((375, 500))} landscape 500x375, {shapes.count((500, 375))} portrait "
        f"375x500, {shapes.count((500, 500))} square 500x500",
        f"Settings: img_size {args.img_size}, efficientnet_b1 from stand-in weights "
        f"({args.stand_in_steps} steps), "
        f"{args.folds} folds x {args.epochs} epochs, batch {args.batch_size}, fp32 on the CPU, "
        f"seed 42; whole run {time.perf_counter() - started:.0f} s",
        "",
        "| cache | memory | crop stretch: mean (5-95%) | crops enlarged | cached px per input px "
        "| macro-F1 per fold | mean | out-of-fold | last-epoch train macro-F1 "
        "| train s/epoch | epoch s with validation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        stretch, enlarged, behind = crop_geometry(arm, args.img_size)
        fold_f1 = [s.best_macro_f1 for s in arm.states]
        train_f1 = np.mean([s.history[-1].train_macro_f1 for s in arm.states])
        lines.append(
            f"| {arm.name} | {arm.pixels.nbytes / 1e6:.1f} MB ({arm.pixels.shape[1]}x"
            f"{arm.pixels.shape[2]} per photo) | {stretch.mean():.2f} "
            f"({np.quantile(stretch, 0.05):.2f}-{np.quantile(stretch, 0.95):.2f}) "
            f"| {enlarged.mean():.0%} | {behind.mean():.2f} "
            f"| {', '.join(f'{f:.3f}' for f in fold_f1)} | {np.mean(fold_f1):.3f} "
            f"| {out_of_fold_f1(arm, folds, photos.labels):.3f} | {train_f1:.3f} "
            f"| {np.mean(arm.train_seconds):.1f} | {np.mean(arm.epoch_seconds):.1f} |"
        )
    publish(lines, args.output, "Augmentation: squashed square against true shape", __file__)


if __name__ == "__main__":
    main()
