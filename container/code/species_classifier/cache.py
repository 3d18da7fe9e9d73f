"""Every photo decoded and resized once, at its true aspect, into one uint8 array for the job.

The seed decoded each JPEG again in every epoch of every fold, which kept the GPU
waiting on the CPU. Here decoding happens once, on all cores (Pillow releases the GIL
while it decodes and resizes, so threads scale), and the result is kept in the
checkpoint folder under a key of its inputs so a spot restart does not decode again.

Each photo keeps its own shape, as the seed's RandomResizedCrop saw it: its short side is
stored at `SHORT_SIDE_SCALE` x img_size (never enlarged), its long side in proportion. All
photos share one landscape canvas of short x long slots; portrait photos are stored
transposed, so one slot shape fits landscape and portrait alike with little padding. Per
photo the cache records the true (height, width) and the stored (rows, cols) of its slot;
augment.py turns those into one warp per batch that undoes the transpose.

Photos that cannot be read are never replaced by blank images: they are reported back
with the reason, for the caller to leave out and list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from species_classifier.atomic import atomic_write
from species_classifier.imaging import PhotoError, decode_photo_true_shape

_log = logging.getLogger(__name__)

# Bump when decode_photo_true_shape or the layout changes, so stale caches are not reused.
DECODE_VERSION = 2

# The smallest crop RandomResizedCrop takes (80% of the area at aspect 4/3, on a square
# photo) spans 0.77 of the short side: at 1.25 x img_size it still has 0.97 x img_size
# pixels, so training crops are (all but) never enlarged.
SHORT_SIDE_SCALE = 1.25
# The slot's long side fits this share of the photos at full size; the longer rest (and
# anything beyond MAX_SLOT_ASPECT) is shrunk to fit, rather than every slot padded for them.
SLOT_COVERS = 0.99
MAX_SLOT_ASPECT = 2.0

# Columns of PhotoCache.sizes.
HEIGHT, WIDTH, ROWS, COLS = range(4)


@dataclass(frozen=True)
class PhotoCache:
    # (N, slot_rows, slot_cols, 3) uint8; photo i fills pixels[i, :rows_i, :cols_i], transposed
    # when it is a portrait (height > width); the rest of its slot, and unreadable rows, are zero.
    pixels: np.ndarray
    sizes: np.ndarray  # (N, 4) int32: true height, true width, stored rows, stored cols
    failures: dict[int, str]  # row -> reason, for every photo that could not be used

    @property
    def readable(self) -> np.ndarray:
        keep = np.ones(len(self.pixels), dtype=bool)
        keep[list(self.failures)] = False
        return keep


def slot_rows(img_size: int) -> int:
    return round(SHORT_SIDE_SCALE * img_size)


def slot_shape(img_size: int, aspects: Iterable[float]) -> tuple[int, int]:
    """(rows, cols) of the slot every photo is stored in, from the photos' long/short ratios."""
    rows = slot_rows(img_size)
    aspects = list(aspects)
    longest = float(np.quantile(aspects, SLOT_COVERS, method="higher")) if aspects else 1.0
    cols = math.ceil(rows * min(max(longest, 1.0), MAX_SLOT_ASPECT) - 1e-6)
    return rows, cols


def build_cache(
    paths: list[Path],
    channel_dir: Path,
    img_size: int,
    workers: int,
    store_dir: Path | None = None,
) -> PhotoCache:
    """Decode all photos (or load them from a previous run's store) into one array."""
    key = _cache_key(paths, channel_dir, img_size)
    if store_dir is not None:
        stored = _load(store_dir, key, len(paths), img_size)
        if stored is not None:
            _log.info(
                "photo cache: reusing %d decoded photos from %s (%.2f GB)",
                len(paths),
                store_dir,
                stored.pixels.nbytes / 1e9,
            )
            return stored
    workers = workers or os.cpu_count() or 1
    root = channel_dir.resolve()
    inside = [path.resolve().is_relative_to(root) for path in paths]
    started = time.perf_counter()
    # The slot's shape comes from the photos' headers, read before any pixel is decoded.
    aspects = _run(
        workers, lambda row: _header_aspect(paths[row]) if inside[row] else None, len(paths)
    )
    rows, cols = slot_shape(img_size, [a for a in aspects if a is not None])
    pixels = np.zeros((len(paths), rows, cols, 3), dtype=np.uint8)
    sizes = np.zeros((len(paths), 4), dtype=np.int32)
    failures: dict[int, str] = {}

    def decode_into(row: int) -> None:
        if not inside[row]:
            failures[row] = "image_name points outside the training channel"
            return
        try:
            photo, (height, width) = decode_photo_true_shape(paths[row], rows, cols)
        except PhotoError as error:
            failures[row] = str(error)
            return
        if height > width:
            photo = photo.transpose(1, 0, 2)
        stored_rows, stored_cols = photo.shape[:2]
        pixels[row, :stored_rows, :stored_cols] = photo
        sizes[row] = (height, width, stored_rows, stored_cols)

    _run(workers, decode_into, len(paths), progress="decoded")
    seconds = time.perf_counter() - started
    readable = np.ones(len(paths), dtype=bool)
    readable[list(failures)] = False
    shrunk = int(np.sum(readable & (sizes[:, ROWS] < np.minimum(rows, sizes[:, :2].min(1)))))
    _log.info(
        "photo cache: %d photos decoded at their own aspect into %dx%d slots (short side "
        "%d px, portraits transposed) in %.1f s (%.0f photos/s, %d threads): %.2f GB, "
        "%.1fx a cache squashed to %dx%d%s",
        len(paths),
        rows,
        cols,
        rows,
        seconds,
        len(paths) / max(seconds, 1e-9),
        workers,
        pixels.nbytes / 1e9,
        rows * cols / img_size**2,
        img_size,
        img_size,
        f"; {shrunk} photo(s) longer than {cols / rows:.2f}:1 shrunk to fit" if shrunk else "",
    )
    cache = PhotoCache(pixels, sizes, failures)
    if store_dir is not None:
        _store(store_dir, key, cache)
    return cache


def _run(workers: int, work: Callable[[int], object], count: int, progress: str = "") -> list:
    """work(row) for rows 0..count-1 on a thread pool, results in row order."""
    pool = ThreadPoolExecutor(max_workers=workers)
    results = []
    try:
        for done, result in enumerate(pool.map(work, range(count)), start=1):
            results.append(result)
            if progress and done % 5000 == 0:
                _log.info("photo cache: %s %d/%d", progress, done, count)
    finally:
        # On SIGTERM, drop the queued photos instead of decoding them all before exiting.
        pool.shutdown(cancel_futures=True)
    return results


def _header_aspect(path: Path) -> float | None:
    """Long side over short side, from the header alone; None when it cannot be read
    (decoding will say why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return max(width, height) / max(min(width, height), 1)


def _cache_key(paths: list[Path], channel_dir: Path, img_size: int) -> str:
    """Names and sizes of the inputs: stable across a restart that re-downloads the data."""
    digest = hashlib.sha256(f"{DECODE_VERSION}:{img_size}".encode())
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"\n{os.path.relpath(path, channel_dir)}:{size}".encode())
    return digest.hexdigest()[:16]


def _files(store_dir: Path, key: str) -> tuple[Path, Path]:
    return store_dir / f"photo-cache-{key}.npy", store_dir / f"photo-cache-{key}.json"


def _load(store_dir: Path, key: str, count: int, img_size: int) -> PhotoCache | None:
    pixels_file, layout_file = _files(store_dir, key)
    if not (pixels_file.is_file() and layout_file.is_file()):
        return None
    try:
        pixels = np.load(pixels_file)
        layout = json.loads(layout_file.read_text())
        failures = {int(k): v for k, v in layout["failures"].items()}
        sizes = np.asarray(layout["sizes"], dtype=np.int32).reshape(-1, 4)
    except (OSError, ValueError, KeyError, TypeError) as error:
        _log.warning("photo cache in %s is unreadable (%s): decoding again", store_dir, error)
        return None
    if (
        pixels.ndim != 4
        or pixels.shape[:2] != (count, slot_rows(img_size))
        or pixels.shape[3] != 3
        or len(sizes) != count
    ):
        return None
    return PhotoCache(pixels, sizes, failures)


def _store(store_dir: Path, key: str, cache: PhotoCache) -> None:
    store_dir.mkdir(parents=True, exist_ok=True)
    for stale in store_dir.glob("photo-cache-*"):
        if key not in stale.name:
            stale.unlink()
    pixels_file, layout_file = _files(store_dir, key)
    # Layout first, pixels last and atomically: _load needs both, so a kill at any
    # point leaves either a complete pair or a cache that is simply rebuilt.
    layout = {"failures": cache.failures, "sizes": cache.sizes.tolist()}
    layout_file.write_text(json.dumps(layout))
    with atomic_write(pixels_file) as handle:
        np.save(handle, cache.pixels)
