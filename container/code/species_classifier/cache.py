"""Every photo decoded and resized once, into one uint8 array for the whole job.

The seed decoded each JPEG again in every epoch of every fold, which kept the GPU
waiting on the CPU. Here decoding happens once, on all cores (Pillow releases the GIL
while it decodes and resizes, so threads scale), and the result is kept in the
checkpoint folder under a key of its inputs so a spot restart does not decode again.

Photos that cannot be read are never replaced by blank images: they are reported back
with the reason, for the caller to leave out and list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from species_classifier.atomic import atomic_write
from species_classifier.imaging import PhotoError, decode_photo

_log = logging.getLogger(__name__)

# Bump when decode_photo changes what it produces, so stale caches are not reused.
DECODE_VERSION = 1


@dataclass(frozen=True)
class PhotoCache:
    pixels: np.ndarray  # (N, img_size, img_size, 3) uint8; unreadable photos' rows are zero
    failures: dict[int, str]  # row -> reason, for every photo that could not be used

    @property
    def readable(self) -> np.ndarray:
        keep = np.ones(len(self.pixels), dtype=bool)
        keep[list(self.failures)] = False
        return keep


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
            _log.info("photo cache: reusing %d decoded photos from %s", len(paths), store_dir)
            return stored
    pixels = np.zeros((len(paths), img_size, img_size, 3), dtype=np.uint8)
    failures: dict[int, str] = {}
    root = channel_dir.resolve()

    def decode_into(row: int) -> None:
        path = paths[row]
        if not path.resolve().is_relative_to(root):
            failures[row] = "image_name points outside the training channel"
            return
        try:
            pixels[row] = decode_photo(path, img_size)
        except PhotoError as error:
            failures[row] = str(error)

    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for done, _ in enumerate(pool.map(decode_into, range(len(paths))), start=1):
            if done % 5000 == 0:
                _log.info("photo cache: decoded %d/%d", done, len(paths))
    finally:
        # On SIGTERM, drop the queued photos instead of decoding them all before exiting.
        pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - started
    _log.info(
        "photo cache: %d photos decoded to %dx%d in %.1f s (%.0f photos/s, %d threads, %.2f GB)",
        len(paths),
        img_size,
        img_size,
        seconds,
        len(paths) / max(seconds, 1e-9),
        workers,
        pixels.nbytes / 1e9,
    )
    cache = PhotoCache(pixels, failures)
    if store_dir is not None:
        _store(store_dir, key, cache)
    return cache


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
    pixels_file, failures_file = _files(store_dir, key)
    if not (pixels_file.is_file() and failures_file.is_file()):
        return None
    try:
        pixels = np.load(pixels_file)
        failures = {int(k): v for k, v in json.loads(failures_file.read_text()).items()}
    except (OSError, ValueError) as error:
        _log.warning("photo cache in %s is unreadable (%s): decoding again", store_dir, error)
        return None
    if pixels.shape != (count, img_size, img_size, 3):
        return None
    return PhotoCache(pixels, failures)


def _store(store_dir: Path, key: str, cache: PhotoCache) -> None:
    store_dir.mkdir(parents=True, exist_ok=True)
    for stale in store_dir.glob("photo-cache-*"):
        if key not in stale.name:
            stale.unlink()
    pixels_file, failures_file = _files(store_dir, key)
    # Failures first, pixels last and atomically: _load needs both, so a kill at any
    # point leaves either a complete pair or a cache that is simply rebuilt.
    failures_file.write_text(json.dumps(cache.failures))
    with atomic_write(pixels_file) as handle:
        np.save(handle, cache.pixels)
