#!/usr/bin/env python3
"""Training throughput, ours against the seed's way, measured in one run on this machine.

Prints images/s for:
  1. the model alone on synthetic tensors already on the device (the ceiling),
  2. our training loop: uint8 photo cache on the device, batched augmentation, automatic
     precision, channels_last, fused Adam (species_classifier.trainer, as `train` runs it),
  3. the seed-style pipeline: JPEG decode + torchvision PIL transforms in a DataLoader with
     4 workers, fp32, batch 64, decoding every photo again every epoch,
and the wall time of a whole K-fold `train` job on generated ~500 px JPEG photos.
Defaults are sized for the machine: full size on a GPU, small on a CPU.

    .venv/bin/python scripts/bench_training.py [--output docs/benchmarks/training-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "container" / "code"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402
from PIL import Image  # noqa: E402
from species_classifier.cache import PhotoCache, build_cache  # noqa: E402
from species_classifier.config import TrainingConfig  # noqa: E402
from species_classifier.demo_data import DEMO_TARGETS, make_demo_dataset  # noqa: E402
from species_classifier.imaging import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from species_classifier.model import build_model, parameter_groups  # noqa: E402
from species_classifier.trainer import FoldData, FoldTrainer, choose_precision  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

NUM_CLASSES = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model_only(device, img_size, batch_size, steps, precision) -> float:
    """The ceiling: forward + backward + step on tensors that are already normalised on the device."""
    model = build_model(NUM_CLASSES, pretrained=False).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    inputs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def bench_our_loop(device, cache: PhotoCache, img_size, batch_size, epochs) -> float:
    photos = cache.pixels
    config = TrainingConfig(
        target_species=("x",),
        img_size=img_size,
        batch_size=batch_size,
        learning_rate=1e-4,
        pretrained=False,
    )
    trainer = FoldTrainer(build_model(NUM_CLASSES, False), config, device, NUM_CLASSES)
    pixels = torch.from_numpy(photos).to(device)
    labels = torch.randint(0, NUM_CLASSES, (len(photos),))
    sizes = torch.from_numpy(cache.sizes)
    data = FoldData(pixels, sizes, labels, np.arange(len(photos)), np.arange(0))
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(parameter_groups(trainer.model, 1e-4), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    trainer._train_epoch(data, criterion, optimizer, scaler, fold=1, epoch=0)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        trainer._train_epoch(data, criterion, optimizer, scaler, fold=1, epoch=epoch)
    synchronize(device)
    return epochs * len(photos) / (time.perf_counter() - started)


class SeedStyleDataset(Dataset):
    """What the seed did: open and decode the JPEG with PIL on every access."""

    def __init__(self, paths: list[Path], img_size: int) -> None:
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(img_size, scale=(0.8, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomVerticalFlip(p=0.2),
                transforms.RandomRotation(15),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), index % NUM_CLASSES


def bench_seed_style(device, paths, img_size, epochs, workers=4, batch_size=64) -> float:
    model = build_model(NUM_CLASSES, pretrained=False).to(device)
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4))
    loader = DataLoader(
        SeedStyleDataset(paths, img_size),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )
    model.train()

    def run_epoch():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    run_epoch()  # warm-up: workers start, caches fill
    synchronize(device)
    started = time.perf_counter()
    for _ in range(epochs):
        run_epoch()
    synchronize(device)
    return epochs * len(paths) / (time.perf_counter() - started)


def bench_job(
    root: Path, photos_per_species: int, img_size: int, batch_size: int, folds: int, epochs: int
) -> tuple[float, int, dict]:
    """Wall time of the real `train` on a generated channel, photo decode included."""
    base = root / "job"
    make_demo_dataset(base / "input" / "data" / "training", photos_per_species, photo_size=500)
    config = base / "input" / "config"
    config.mkdir(parents=True)
    hyperparameters = {
        "target_species": ",".join(DEMO_TARGETS),
        "k_folds": str(folds),
        "num_epochs": str(epochs),
        "epoch_patience": str(epochs),
        "img_size": str(img_size),
        "batch_size": str(batch_size),
        "pretrained": "false",
    }
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    started = time.perf_counter()
    result = subprocess.run(
        [str(REPO / "container" / "train")], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"train failed:\n{result.stdout[-3000:]}")
    photos = len((base / "input" / "data" / "training" / "train.csv").read_text().splitlines()) - 1
    return seconds, photos, hyperparameters


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=240 if gpu else 128)
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    parser.add_argument(
        "--photos", type=int, default=4096 if gpu else 192, help="photos per loop epoch"
    )
    parser.add_argument("--epochs", type=int, default=3 if gpu else 1, help="timed epochs per loop")
    parser.add_argument("--steps", type=int, default=30 if gpu else 6, help="model-only steps")
    parser.add_argument("--job-photos-per-species", type=int, default=2900 if gpu else 20)
    parser.add_argument("--job-folds", type=int, default=3)
    parser.add_argument("--job-epochs", type=int, default=20 if gpu else 2)
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    precision = choose_precision("auto", device)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_demo_dataset(root / "photos", max(1, args.photos // 7), photo_size=500)
        paths = sorted((root / "photos" / "images").rglob("*.jpg"))
        cache = build_cache(paths, root / "photos", args.img_size, workers=0)

        ceiling = bench_model_only(device, args.img_size, args.batch_size, args.steps, precision)
        ours = bench_our_loop(device, cache, args.img_size, args.batch_size, args.epochs)
        seed = bench_seed_style(device, paths, args.img_size, args.epochs)
        job = (
            None
            if args.skip_job
            else bench_job(
                root,
                args.job_photos_per_species,
                args.img_size,
                args.batch_size,
                args.job_folds,
                args.job_epochs,
            )
        )

    lines = [
        f"Machine: {describe()}",
        f"Settings: img_size {args.img_size}, efficientnet_b1, {len(paths)} photos of ~500 px, "
        f"our batch {args.batch_size} in {precision}, seed-style batch 64 fp32 with 4 DataLoader workers",
        "",
        "| what | images/s | vs ceiling | vs seed-style |",
        "|---|---|---|---|",
        f"| model alone, synthetic tensors on the device (ceiling) | {ceiling:,.0f} | 100% | {ceiling / seed:.1f}x |",
        f"| our training loop (cache + device augmentation) | {ours:,.0f} | {ours / ceiling:.0%} | {ours / seed:.1f}x |",
        f"| seed-style pipeline (PIL decode every epoch, DataLoader) | {seed:,.0f} | {seed / ceiling:.0%} | 1.0x |",
    ]
    if job is not None:
        seconds, photos, hyper = job
        images = photos * (args.job_folds - 1) / args.job_folds * args.job_epochs * args.job_folds
        lines += [
            "",
            f"Whole job: `train` with {args.job_folds} folds x {args.job_epochs} epochs on {photos} "
            f"generated 500 px JPEGs (img_size {hyper['img_size']}, batch {hyper['batch_size']}): "
            f"{seconds:.0f} s wall, photo decode and process start included; the seed-style "
            f"pipeline's rate would need about {images / seed:.0f} s for its training passes alone.",
        ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            f"# Training throughput\n\nMeasured {time.strftime('%Y-%m-%d')} "
            f"with `scripts/bench_training.py`.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
