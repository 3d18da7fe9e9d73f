#!/usr/bin/env python3
"""Training throughput, ours against the seed's way, measured in one run on this machine.

Prints images/s for:
  1. the model alone on synthetic tensors already on the device (the ceiling), eager and
     with torch.compile,
  2. our training loop: uint8 photo cache on the device, batched augmentation, automatic
     precision, channels_last, fused Adam (species_classifier.trainer, as `train` runs it),
     eager, compiled (`compile=true`) and eager with deterministic algorithms (what exact
     resumes on a GPU cost),
  3. the seed-style pipeline: JPEG decode + torchvision PIL transforms in a DataLoader with
     4 workers, fp32, batch 64, decoding every photo again every epoch,
and the wall time of a whole K-fold `train` job on generated ~500 px JPEG photos.
Defaults are sized for the machine: full size on a GPU, small on a CPU. A compiled row's
"first steps" column is the time its warm-up took: compilation, mostly.

    .venv/bin/python scripts/bench_training.py [--output docs/benchmarks/training-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "container" / "code"))
# cuBLAS reads this when it creates its handle, before the deterministic row is reached; it
# only bounds cuBLAS's workspace, which is what deterministic algorithms require.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe, publish  # noqa: E402
from PIL import Image  # noqa: E402
from species_classifier.cache import build_cache  # noqa: E402
from species_classifier.contract.hyperparameters import TrainingConfig  # noqa: E402
from species_classifier.demo_data import DEMO_TARGETS, make_demo_dataset  # noqa: E402
from species_classifier.imaging import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from species_classifier.model import build_model, parameter_groups  # noqa: E402
from species_classifier.stores import SlotStore  # noqa: E402
from species_classifier.trainer import FoldData, FoldTrainer, choose_precision  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

NUM_CLASSES = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, step, warmup_steps: int, steps: int, images_per_step: int):
    """(images/s over `steps` steps, seconds the warm-up steps took)."""
    started = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * images_per_step / (time.perf_counter() - started), warmup


def bench_model_only(device, img_size, batch_size, steps, precision, compile_backend=None):
    """The ceiling: forward + backward + step on tensors that are already normalised on the
    device; compiled with `compile_backend` when given."""
    model = build_model(NUM_CLASSES, pretrained=False).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    inputs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return timed(device, step, 2, steps, batch_size)


def bench_our_loop(
    device,
    cache: SlotStore,
    img_size,
    batch_size,
    epochs,
    compile_backend=None,
    deterministic=False,
):
    """Our loop over the photos (whole batches only, so a compiled model sees one shape);
    compiled as `compile=true` compiles it, with `compile_backend` when that is not inductor."""
    config = TrainingConfig(
        target_species=("x",),
        img_size=img_size,
        batch_size=batch_size,
        learning_rate=1e-4,
        pretrained=False,
        compile=compile_backend is not None,
    )
    trainer = FoldTrainer(build_model(NUM_CLASSES, False), config, device, NUM_CLASSES)
    if compile_backend not in (None, "inductor"):
        trainer.forward = torch.compile(trainer.model, backend=compile_backend)
    photos = cache.pixels
    count = max(batch_size, len(photos) - len(photos) % batch_size)
    pixels = torch.from_numpy(np.resize(photos, (count, *photos.shape[1:]))).to(device)
    sizes = torch.from_numpy(np.resize(cache.sizes, (count, 4)))
    labels = torch.randint(0, NUM_CLASSES, (count,))
    data = FoldData(pixels, sizes, labels, np.arange(count), np.arange(0))
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(parameter_groups(trainer.model, 1e-4), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    epoch = iter(range(epochs + 1))

    def run_epoch():
        trainer._train_epoch(data, criterion, optimizer, scaler, fold=1, epoch=next(epoch))

    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        return timed(device, run_epoch, 1, epochs, count)
    finally:
        torch.use_deterministic_algorithms(False)


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

    # Warm-up: workers start, caches fill.
    return timed(device, run_epoch, 1, epochs, len(paths))


def make_job_channel(channel: Path, photos: int, unique_per_species: int) -> int:
    """A training channel of about `photos` JPEGs: a few generated per species, then hard
    links to them under new names (every file is still decoded on its own, and generating
    thousands of photos would take longer than the job)."""
    csv_path = make_demo_dataset(channel, unique_per_species, photo_size=500)
    rows = csv_path.read_text().splitlines()
    header, originals = rows[0], rows[1:]
    copies = max(1, round(photos / len(originals)))
    lines = [header]
    for row in originals:
        species, image = row.split(",", 1)
        for copy in range(copies):
            name = image if copy == 0 else image.replace(".jpg", f"-{copy}.jpg")
            if copy:
                os.link(channel / image, channel / name)
            lines.append(f"{species},{name}")
    csv_path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


EPOCH_LINE = re.compile(r"fold=(\d+) epoch=(\d+) .*epoch_s=([\d.]+)")
DECODE_LINE = re.compile(r"photo store: (\d+) photos decoded .* in ([\d.]+) s")


def bench_job(
    root: Path, photos: int, img_size: int, batch_size: int, folds: int, epochs: int
) -> dict:
    """Wall time of the real `train` on a generated channel, photo decode included, and
    where it went: decoding, epochs (train + validation), and the rest (start, report)."""
    base = root / "job"
    unique = max(1, min(8, photos // 7))
    photos = make_job_channel(base / "input" / "data" / "training", photos, unique)
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
        raise SystemExit(f"train failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    epoch_seconds = [float(m[3]) for m in EPOCH_LINE.finditer(result.stdout)]
    decode = DECODE_LINE.search(result.stdout)
    if len(epoch_seconds) != folds * epochs or decode is None:
        raise SystemExit(f"train's log lacks the epoch or photo store lines:\n{result.stdout}")
    return {
        "seconds": seconds,
        "photos": photos,
        "hyperparameters": hyperparameters,
        "decode_s": float(decode[2]),
        "epoch_s": epoch_seconds,
    }


def project_job(job: dict, photos: int, epochs: int, folds: int) -> tuple[float, str]:
    """The job's time at `photos` x `epochs` x `folds`, scaled from the measured one: decode
    and steady epochs grow with the photo count; the first epoch's extra (warm-up) and the
    rest (process start, evaluation, report) are taken as they were."""
    steady = float(np.median(job["epoch_s"][1:] or job["epoch_s"]))
    first_extra = max(job["epoch_s"][0] - steady, 0.0)
    rest = job["seconds"] - job["decode_s"] - sum(job["epoch_s"])
    scale = photos / job["photos"]
    decode = job["decode_s"] * scale
    training = steady * scale * epochs * folds
    total = rest + decode + first_extra + training
    formula = (
        f"{rest:.0f} s start and report + {decode:.0f} s decode ({job['decode_s']:.1f} s x "
        f"{scale:.1f}) + {first_extra:.0f} s first-epoch warm-up + {folds} x {epochs} epochs x "
        f"{steady * scale:.1f} s ({steady:.2f} s per measured epoch x {scale:.1f})"
    )
    return total, formula


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=240 if gpu else 128)
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    parser.add_argument(
        "--photos", type=int, default=4096 if gpu else 192, help="photos per loop epoch"
    )
    parser.add_argument("--epochs", type=int, default=3 if gpu else 1, help="timed epochs per loop")
    parser.add_argument(
        "--seed-photos", type=int, default=1024 if gpu else 64, help="photos per seed-style epoch"
    )
    parser.add_argument("--seed-epochs", type=int, default=1, help="timed seed-style epochs")
    parser.add_argument("--steps", type=int, default=30 if gpu else 6, help="model-only steps")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled rows (inductor, as `train` uses; 'eager' "
        "traces without generating code, for a quick CPU run of the script)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--job-photos", type=int, default=6000 if gpu else 140)
    parser.add_argument("--job-folds", type=int, default=3)
    parser.add_argument("--job-epochs", type=int, default=4 if gpu else 2)
    parser.add_argument("--project-photos", type=int, default=20000)
    parser.add_argument("--project-epochs", type=int, default=20)
    parser.add_argument("--skip-job", action="store_true", help="leave out the whole job")
    parser.add_argument("--skip-loops", action="store_true", help="only the whole job")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    precision = choose_precision("auto", device)
    backend = None if args.no_compile else args.compile_backend

    lines = [f"Machine: {describe()}"]

    def measured(rows: list[str]) -> None:
        """Every row on disk as soon as it is measured: a run killed at its time limit
        keeps what it finished."""
        publish([*lines, *rows], args.output, "Training throughput", __file__, echo=False)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if not args.skip_loops:
            lines += loop_table(device, precision, root, backend, args, measured)
        if not args.skip_job:
            lines += job_table(root, args)
    publish(lines, args.output, "Training throughput", __file__)


def loop_table(device, precision, root: Path, backend, args, measured) -> list[str]:
    # A few generated photos, each used many times: generating thousands of 500 px JPEGs
    # would take minutes, and every use still decodes (seed-style) or augments (ours) anew.
    make_demo_dataset(root / "photos", max(1, min(16, args.photos // 7)), photo_size=500)
    unique = sorted((root / "photos" / "images").rglob("*.jpg"))
    decoded = build_cache(unique, root / "photos", args.img_size, workers=0)
    cache = SlotStore(
        np.resize(decoded.pixels, (args.photos, *decoded.pixels.shape[1:])),
        np.resize(decoded.sizes, (args.photos, 4)),
        {},
    )
    paths = (unique * (args.seed_photos // len(unique) + 1))[: args.seed_photos]
    size, batch = args.img_size, args.batch_size
    runs = [
        (
            "model alone, synthetic tensors on the device (ceiling)",
            "eager",
            lambda: bench_model_only(device, size, batch, args.steps, precision),
        )
    ]
    if backend:
        runs.append(
            (
                "model alone, synthetic tensors on the device",
                f"compiled ({backend})",
                lambda: bench_model_only(device, size, batch, args.steps, precision, backend),
            )
        )
    runs.append(
        (
            "our training loop (cache + device augmentation)",
            "eager",
            lambda: bench_our_loop(device, cache, size, batch, args.epochs),
        )
    )
    if backend:
        runs.append(
            (
                "our training loop, `compile=true`",
                f"compiled ({backend})",
                lambda: bench_our_loop(device, cache, size, batch, args.epochs, backend),
            )
        )
    runs.append(
        (
            "our training loop, deterministic algorithms",
            "eager",
            lambda: bench_our_loop(device, cache, size, batch, args.epochs, deterministic=True),
        )
    )
    runs.append(
        (
            "seed-style pipeline (PIL decode every epoch, DataLoader)",
            "eager, fp32",
            lambda: bench_seed_style(device, paths, size, args.seed_epochs),
        )
    )
    settings = (
        f"Settings: img_size {size}, efficientnet_b1, {len(unique)} generated ~500 px photos "
        f"used over and over: our loop {len(cache.pixels)} per epoch, batch {batch}, {precision}; "
        f"seed-style {len(paths)} per epoch, batch 64, fp32, 4 DataLoader workers; "
        "the ceiling is the faster model-alone row; CUBLAS_WORKSPACE_CONFIG=:4096:8 for all rows"
    )
    ceilings = 2 if backend else 1
    rows, results = [], []
    for what, mode, run in runs:
        rows.append((what, mode))
        results.append(run())
        measured(loop_rows(settings, rows, results, ceilings, len(runs)))
    return loop_rows(settings, rows, results, ceilings, len(runs))


def loop_rows(settings: str, rows, results, ceilings: int, planned: int) -> list[str]:
    """The loop table so far: "vs ceiling" needs the first rows, "vs seed-style" the last."""
    ceiling = max(rate for rate, _ in results[:ceilings])
    seed = results[-1][0] if len(results) == planned else None
    table = [
        settings,
        "",
        "| what | mode | images/s | vs ceiling | vs seed-style | first steps s |",
        "|---|---|---|---|---|---|",
    ]
    for (what, mode), (rate, warmup) in zip(rows, results, strict=True):
        versus_seed = f"{rate / seed:.1f}x" if seed else "?"
        table.append(
            f"| {what} | {mode} | {rate:,.1f} | {rate / ceiling:.0%} | {versus_seed} "
            f"| {warmup:.1f} |"
        )
    return ["", *table]


def job_table(root: Path, args) -> list[str]:
    job = bench_job(
        root, args.job_photos, args.img_size, args.batch_size, args.job_folds, args.job_epochs
    )
    hyper = job["hyperparameters"]
    projected, formula = project_job(job, args.project_photos, args.project_epochs, args.job_folds)
    trained = job["photos"] * (args.job_folds - 1) / args.job_folds
    return [
        "",
        f"Whole job: `train` with {args.job_folds} folds x {args.job_epochs} epochs on "
        f"{job['photos']} ~500 px JPEGs (generated, then hard-linked copies; img_size "
        f"{hyper['img_size']}, batch {hyper['batch_size']}, automatic precision and cache place)",
        "",
        "| job | photos | folds x epochs | wall s | decode s | median epoch s | train images/s |",
        "|---|---|---|---|---|---|---|",
        f"| measured | {job['photos']} | {args.job_folds} x {args.job_epochs} | "
        f"{job['seconds']:.0f} | {job['decode_s']:.1f} | {np.median(job['epoch_s']):.2f} | "
        f"{trained / np.median(job['epoch_s']):,.1f} |",
        f"| projected | {args.project_photos} | {args.job_folds} x {args.project_epochs} | "
        f"{projected:.0f} ({projected / 60:.1f} min) | | | |",
        "",
        f"Projection: {formula}; every epoch run (no early stopping), times linear in the "
        "photo count, the cache placed as in the measured job. 'train images/s' counts the "
        "fold's training photos over a whole epoch, validation included.",
    ]


if __name__ == "__main__":
    main()
