#!/usr/bin/env python3
"""The photo stores side by side, in one run on the same textured photos on this machine.

For each way of keeping the decoded photos (the uint8 store and the JPEG store, both
memory-mapped files as `train` keeps them, and the uint8 array as jobs kept it before: in
the process, copied for the readable photos), at two photo counts:
  - bytes per photo in memory and on disk,
  - peak resident memory of a process that holds a training worker (torch, efficientnet_b1,
    Adam), builds the store and reads every photo of it once in batches,
then, per store, images/s of an epoch of real training on the CPU and of the batches alone
(read + augmentation, no model): the cost of decoding JPEG per batch, undiluted.
It also measures the figures memory.py plans with: a worker's resident memory apart from
its photos, and what CPU training adds per input pixel of a batch.

The photos: ~500x375 and 375x500 JPEGs of smooth colour under fine noise, about 63 KB
each at quality 90, as iNaturalist's are about 67 KB; a few hundred unique ones, linked
under distinct names up to the count.

    .venv/bin/python scripts/bench_stores.py [--output docs/benchmarks/photo-stores-cpu.md]
"""

from __future__ import annotations

import argparse
import io
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
from machine import describe, publish  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from species_classifier.augment import augment  # noqa: E402
from species_classifier.cache import build_store, survey_photos  # noqa: E402
from species_classifier.contract.hyperparameters import TrainingConfig  # noqa: E402
from species_classifier.model import build_model, parameter_groups  # noqa: E402
from species_classifier.stores import read_batches  # noqa: E402
from species_classifier.trainer import FoldData, FoldTrainer  # noqa: E402

NUM_CLASSES = 5
WAYS = {
    "uint8": "uint8 store (memory-mapped file)",
    "jpeg": "JPEG q90 store (memory-mapped file)",
    "before": "uint8 array as before (in the process, copied for the readable photos)",
}


def textured_photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 14, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(0.6)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_photos(folder: Path, count: int, unique: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    originals = []
    for index in range(min(unique, count)):
        path = folder / f"u{index}.jpg"
        size = (500, 375) if index % 3 else (375, 500)
        path.write_bytes(textured_photo(rng, *size))
        originals.append(path)
    paths = []
    for index in range(count):
        path = folder / f"p{index}.jpg"
        if not path.exists():
            os.link(originals[index % len(originals)], path)
        paths.append(path)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM, not getrusage's ru_maxrss, which Linux
    carries over from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: peak memory cannot be measured here")


def worker():
    """A training worker as `train` builds one: the model and its optimiser."""
    model = build_model(NUM_CLASSES, pretrained=False)
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4))
    return model, optimizer


def child_store(way: str, folder: Path, count: int, img_size: int, batch_size: int) -> dict:
    """In a fresh process: a worker, the store built from `count` photos, every batch read."""
    model, _ = worker()
    paths = sorted(folder.glob("p*.jpg"), key=lambda p: int(p.stem[1:]))[:count]
    survey = survey_photos(paths, folder, img_size, 0)
    store_dir = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    started = time.perf_counter()
    if way == "before":
        store = build_store(survey, "uint8", 0, None)
        store.pixels = store.pixels[store.readable]  # the copy jobs made before
        on_disk = 0
    else:
        store = build_store(survey, way, 0, store_dir)
        on_disk = sum(f.stat().st_size for f in store_dir.iterdir())
    built = time.perf_counter() - started
    order = torch.arange(len(store))
    row_batches = list(order.split(batch_size))
    started = time.perf_counter()
    for _ in read_batches(store, row_batches):
        pass
    read = time.perf_counter() - started
    result = {
        "memory_per_photo": store.nbytes / count,
        "disk_per_photo": on_disk / count,
        "peak_rss": peak_rss(),
        "build_s": built,
        "read_per_s": count / read,
    }
    del model
    for file in store_dir.iterdir():
        file.unlink()
    store_dir.rmdir()
    return result


def child_worker(img_size: int, batch_size: int) -> dict:
    """A `train` process's resident memory with its model and optimiser, and its peak after
    CPU training steps at this batch."""
    import species_classifier.train  # noqa: F401 - the libraries a training worker loads

    model, optimizer = worker()
    base = peak_rss()
    model.train()
    inputs = torch.randn(batch_size, 3, img_size, img_size)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return {"base": base, "peak": peak_rss()}


def run_child(options: argparse.Namespace, *args: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    sizes = ["--img-size", str(options.img_size), "--batch-size", str(options.batch_size)]
    result = subprocess.run(
        [sys.executable, __file__, *sizes, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def epoch_rates(folder: Path, count: int, img_size: int, batch_size: int) -> dict:
    """Per store: images/s of one training epoch, and of its batches alone (read + augment);
    the best of two rounds, the stores taking turns, so the first epoch's warm-up and the
    other helpers' load weigh on neither alone."""
    paths = sorted(folder.glob("p*.jpg"), key=lambda p: int(p.stem[1:]))[:count]
    survey = survey_photos(paths, folder, img_size, 0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = {"uint8": (0.0, 0.0), "jpeg": (0.0, 0.0)}
    for way in ("uint8", "jpeg", "uint8", "jpeg"):
        store = build_store(survey, way, 0, None)
        # On a GPU as `train` places them: uint8 in GPU memory, JPEG decoded by nvJPEG.
        pixels = store.to_device(device) if way == "uint8" and device.type == "cuda" else store
        if way == "jpeg":
            store.decode_on(device)
        config = TrainingConfig(
            target_species=("x",), img_size=img_size, batch_size=batch_size, pretrained=False
        )
        trainer = FoldTrainer(build_model(NUM_CLASSES, False), config, device, NUM_CLASSES)
        labels = torch.randint(0, NUM_CLASSES, (len(store),))
        data = FoldData(pixels, torch.from_numpy(store.sizes), labels, np.arange(len(store)), [])
        criterion = torch.nn.CrossEntropyLoss().to(device)
        optimizer = torch.optim.Adam(parameter_groups(trainer.model, 1e-4))
        scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
        started = time.perf_counter()
        trainer._train_epoch(data, criterion, optimizer, scaler, fold=1, epoch=1)
        synchronize(device)
        epoch = len(store) / (time.perf_counter() - started)
        generator = torch.Generator().manual_seed(0)
        sizes = torch.from_numpy(store.sizes)
        row_batches = list(torch.arange(len(store)).split(batch_size))
        started = time.perf_counter()
        for rows, batch in zip(row_batches, read_batches(pixels, row_batches), strict=True):
            augment(batch.to(device), sizes[rows], img_size, generator)
        synchronize(device)
        alone = len(store) / (time.perf_counter() - started)
        rates[way] = (max(epoch, rates[way][0]), max(alone, rates[way][1]))
        store.close()
    return rates


def epoch_table(rates: dict, photos: int) -> list[str]:
    where = "GPU" if torch.cuda.is_available() else "CPU"
    lines = [
        f"| store | epoch of {where} training, {photos} photos (best of 2) | batches alone "
        "(read + augmentation) | epoch vs uint8 |",
        "|---|---|---|---|",
    ]
    for way in ("uint8", "jpeg"):
        epoch, alone = rates[way]
        lines.append(
            f"| {way} | {epoch:.1f} images/s | {alone:.0f} images/s "
            f"| {100 * epoch / rates['uint8'][0]:.0f}% |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[1500, 6000])
    parser.add_argument("--img-size", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epoch-photos", type=int, default=192)
    parser.add_argument("--unique", type=int, default=300)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--epochs-only",
        action="store_true",
        help="only the epoch comparison (on the GPU where there is one: `make gpu-check`)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "worker":
            print(json.dumps(child_worker(int(args.child[1]), int(args.child[2]))))
        else:
            way, folder, count = args.child[0], Path(args.child[1]), int(args.child[2])
            print(json.dumps(child_store(way, folder, count, args.img_size, args.batch_size)))
        return

    size, batch = args.img_size, args.batch_size
    if args.epochs_only:
        with tempfile.TemporaryDirectory(prefix="bench-stores-") as root:
            paths = make_photos(Path(root) / "photos", args.epoch_photos, args.unique)
            rates = epoch_rates(paths[0].parent, args.epoch_photos, size, batch)
        lines = [f"Machine: {describe()}", "", *epoch_table(rates, args.epoch_photos)]
        publish(lines, args.output, "Photo stores: epochs", __file__)
        return
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as root:
        folder = Path(root) / "photos"
        paths = make_photos(folder, max(args.counts), args.unique)
        photo_kb = np.mean([p.stat().st_size for p in paths[: args.unique]]) / 1000
        measured = {
            (way, count): run_child(args, way, str(folder), str(count))
            for count in args.counts
            for way in WAYS
        }
        rates = epoch_rates(folder, args.epoch_photos, size, batch)
    small, large = args.counts
    lines = [
        f"Machine: {describe()}",
        f"Photos: {photo_kb:.0f} KB JPEGs of 500x375 and 375x500 (a third portrait), "
        f"img_size {size} (slots {round(size * 1.25)} px on the short side), batch {batch}",
        "",
        f"| store | bytes a photo in memory | on disk | peak resident, {small} photos "
        f"| peak resident, {large} photos | build, {large} photos | reading all batches |",
        "|---|---|---|---|---|---|---|",
    ]
    for way, name in WAYS.items():
        one, two = measured[(way, small)], measured[(way, large)]
        lines.append(
            f"| {name} | {two['memory_per_photo']:,.0f} | {two['disk_per_photo']:,.0f} "
            f"| {one['peak_rss'] / 1e9:.2f} GB | {two['peak_rss'] / 1e9:.2f} GB "
            f"| {two['build_s']:.0f} s | {two['read_per_s']:,.0f} photos/s |"
        )
    lines += ["", *epoch_table(rates, args.epoch_photos)]
    sizes = ((16, 96), (32, 240))
    workers = {(b, s): run_child(args, "worker", str(s), str(b)) for b, s in sizes}
    added = {key: w["peak"] - w["base"] for key, w in workers.items()}
    (b1, s1), (b2, s2) = sizes
    per_pixel = (added[(b2, s2)] - added[(b1, s1)]) / (b2 * s2**2 - b1 * s1**2)
    lines += [
        "",
        "A `train` worker apart from its photos (its libraries, efficientnet_b1, Adam): "
        f"{max(w['base'] for w in workers.values()) / 1e9:.2f} GB resident; CPU training adds "
        + ", ".join(f"{added[(b, s)] / 1e9:.2f} GB at batch {b} x {s} px" for b, s in sizes)
        + f": {per_pixel:,.0f} bytes per input pixel of a batch.",
    ]
    publish(lines, args.output, "Photo stores", __file__)


if __name__ == "__main__":
    main()
