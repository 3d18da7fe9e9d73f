"""Every photo decoded and resized once, at its true aspect, into the job's photo store.

The seed decoded each JPEG again in every epoch of every fold, which kept the GPU waiting
on the CPU. Here decoding happens once, on all cores (Pillow releases the GIL while it
decodes and resizes, so threads scale), into one of the two stores of stores.py: raw uint8
slots, or the same slots re-encoded as JPEG and decoded per batch. `survey_photos` first
reads the headers and encodes a sample, so the job can choose the store (memory.py) before
it decodes a photo in full; `build_store` then decodes into it, or reopens the one a
previous run of the same inputs left.

Each photo keeps its own shape, as the seed's RandomResizedCrop saw it: its short side is
stored at `SHORT_SIDE_SCALE` x img_size (never enlarged), its long side in proportion. All
photos share one landscape canvas of short x long slots; portrait photos are stored
transposed, so one slot shape fits landscape and portrait alike with little padding. Per
photo the store records the true (height, width) and the stored (rows, cols) of its slot;
augment.py turns those into one warp per batch that undoes the transpose.

Photos that cannot be read are never replaced by blank images: they are reported back
with the reason, for the caller to leave out and list.
"""

from __future__ import annotations

import hashlib
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

from species_classifier.atomic import atomic_path
from species_classifier.imaging import PhotoError, decode_photo_true_shape
from species_classifier.stores import (
    ROWS,
    JpegStore,
    SlotStore,
    encode_slot,
    open_store,
    remove_other_stores,
    save_layout,
    store_files,
)

_log = logging.getLogger(__name__)

# Bump when decode_photo_true_shape or the layout changes, so stale caches are not reused.
DECODE_VERSION = 3

# The smallest crop RandomResizedCrop takes (80% of the area at aspect 4/3, on a square
# photo) spans 0.77 of the short side: at 1.25 x img_size it still has 0.97 x img_size
# pixels, so training crops are (all but) never enlarged.
SHORT_SIDE_SCALE = 1.25
# The slot's long side fits this share of the photos at full size; the longer rest (and
# anything beyond MAX_SLOT_ASPECT) is shrunk to fit, rather than every slot padded for them.
SLOT_COVERS = 0.99
MAX_SLOT_ASPECT = 2.0

# The JPEG store's bytes per photo are estimated from this many photos, spread evenly, and
# rounded up by this margin (the sample's spread at a few hundred photos stays well within it).
SAMPLE_PHOTOS = 200
JPEG_SAMPLE_MARGIN = 1.1


def slot_rows(img_size: int) -> int:
    return round(SHORT_SIDE_SCALE * img_size)


def slot_shape(img_size: int, aspects: Iterable[float]) -> tuple[int, int]:
    """(rows, cols) of the slot every photo is stored in, from the photos' long/short ratios."""
    rows = slot_rows(img_size)
    aspects = list(aspects)
    longest = float(np.quantile(aspects, SLOT_COVERS, method="higher")) if aspects else 1.0
    cols = math.ceil(rows * min(max(longest, 1.0), MAX_SLOT_ASPECT) - 1e-6)
    return rows, cols


@dataclass(frozen=True)
class Survey:
    """What is known of the photos before any is decoded in full: their slot, and each
    store's bytes per photo (the JPEG store's from a sample encoded first)."""

    paths: list[Path]
    channel_dir: Path
    img_size: int
    slot: tuple[int, int]
    inside: list[bool]  # photo lies inside the channel (else it is refused unread)
    key: str  # names the inputs: a store built from them is reused
    bytes_per_photo: dict[str, float]
    photo_bytes: int  # the photo files themselves, together

    @property
    def count(self) -> int:
        return len(self.paths)


def survey_photos(paths: list[Path], channel_dir: Path, img_size: int, workers: int) -> Survey:
    """Read every photo's header and encode an even sample: the figures a store is chosen by."""
    workers = workers or os.cpu_count() or 1
    root = channel_dir.resolve()
    inside = [path.resolve().is_relative_to(root) for path in paths]
    # The slot's shape comes from the photos' headers, read before any pixel is decoded.
    aspects = _run(
        workers, lambda row: _header_aspect(paths[row]) if inside[row] else None, len(paths)
    )
    slot = slot_shape(img_size, [a for a in aspects if a is not None])
    sample = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), SAMPLE_PHOTOS)).astype(int))

    def encoded_size(row: int) -> int | None:
        decoded = _decode(paths[row], slot) if inside[row] else None
        return None if decoded is None else len(encode_slot(decoded[0]))

    sizes = [n for n in _run(workers, lambda i: encoded_size(int(sample[i])), len(sample)) if n]
    jpeg = float(np.mean(sizes)) * JPEG_SAMPLE_MARGIN if sizes else 0.0
    return Survey(
        paths=paths,
        channel_dir=channel_dir,
        img_size=img_size,
        slot=slot,
        inside=inside,
        key=_cache_key(paths, channel_dir, img_size),
        bytes_per_photo={"uint8": float(slot[0] * slot[1] * 3), "jpeg": jpeg},
        photo_bytes=sum(_file_size(path) for path in paths),
    )


def build_cache(
    paths: list[Path],
    channel_dir: Path,
    img_size: int,
    workers: int,
    store_dir: Path | None = None,
    kind: str = "uint8",
):
    """All photos decoded once into a store of `kind` (kept in `store_dir` when given, and
    reused from there when a previous run left it)."""
    return build_store(
        survey_photos(paths, channel_dir, img_size, workers), kind, workers, store_dir
    )


def build_store(survey: Survey, kind: str, workers: int, store_dir: Path | None = None):
    """The photos of `survey` as a store of `kind` ("uint8" or "jpeg"): found in `store_dir`
    when a previous run of the same inputs left it there, else decoded once (into files in
    `store_dir`, memory-mapped; in memory without one)."""
    workers = workers or os.cpu_count() or 1
    if store_dir is not None:
        stored = open_store(store_dir, survey.key, kind, workers)
        if stored is not None:
            _log.info(
                "photo store: reusing %d decoded photos from %s (%s, %.2f GB)",
                survey.count,
                store_dir,
                kind,
                stored.nbytes / 1e9,
            )
            return stored
    started = time.perf_counter()
    rows, cols = survey.slot
    sizes = np.zeros((survey.count, 4), dtype=np.int32)
    failures: dict[int, str] = {}

    def decode(row: int) -> np.ndarray | None:
        if not survey.inside[row]:
            failures[row] = "image_name points outside the training channel"
            return None
        try:
            photo, (height, width) = _decode(survey.paths[row], survey.slot, raising=True)
        except PhotoError as error:
            failures[row] = str(error)
            return None
        sizes[row] = (height, width, *photo.shape[:2])
        return photo

    if kind == "uint8":
        store = _build_slots(survey, decode, workers, store_dir, sizes, failures)
    else:
        store = _build_jpegs(survey, decode, workers, store_dir, sizes, failures)
    seconds = time.perf_counter() - started
    readable = store.readable
    shrunk = int(np.sum(readable & (sizes[:, ROWS] < np.minimum(rows, sizes[:, :2].min(1)))))
    _log.info(
        "photo store: %d photos decoded at their own aspect into %dx%d slots (short side "
        "%d px, portraits transposed) in %.1f s (%.0f photos/s, %d threads): %s, %.2f GB "
        "(%.0f bytes a photo)%s",
        survey.count,
        rows,
        cols,
        rows,
        seconds,
        survey.count / max(seconds, 1e-9),
        workers,
        kind,
        store.nbytes / 1e9,
        store.nbytes / max(survey.count, 1),
        f"; {shrunk} photo(s) longer than {cols / rows:.2f}:1 shrunk to fit" if shrunk else "",
    )
    return store


def _build_slots(survey, decode, workers, store_dir, sizes, failures) -> SlotStore:
    shape = (survey.count, *survey.slot, 3)
    if store_dir is None:
        pixels = np.zeros(shape, dtype=np.uint8)
        _fill_slots(pixels, survey, decode, workers)
        return SlotStore(pixels, sizes, failures)
    data_file, layout_file = store_files(store_dir, survey.key, "uint8")
    remove_other_stores(store_dir, (data_file, layout_file))
    with atomic_path(data_file) as temporary:
        # Written through a memory map straight into the page cache: never a whole copy in
        # the process, and the file is what every worker of the host then maps.
        if survey.count:
            # Reserve every block first: a memory map that runs out of disk while it is
            # filled kills the process with SIGBUS instead of raising.
            with open(temporary, "r+b") as reserved:
                os.posix_fallocate(reserved.fileno(), 0, int(np.prod(shape)))
            pixels = np.memmap(temporary, dtype=np.uint8, mode="r+", shape=shape)
            _fill_slots(pixels, survey, decode, workers)
            pixels.flush()
            del pixels
    save_layout(layout_file, SlotStore(np.zeros((0, *survey.slot, 3), np.uint8), sizes, failures))
    return open_store(store_dir, survey.key, "uint8", workers)


def _fill_slots(pixels: np.ndarray, survey, decode, workers: int) -> None:
    def into_slot(row: int) -> None:
        photo = decode(row)
        if photo is not None:
            pixels[row, : photo.shape[0], : photo.shape[1]] = photo

    _run(workers, into_slot, survey.count, progress="decoded")


def _build_jpegs(survey, decode, workers, store_dir, sizes, failures) -> JpegStore:
    def encode(row: int) -> bytes:
        photo = decode(row)
        return b"" if photo is None else encode_slot(photo)

    offsets = np.zeros(survey.count + 1, dtype=np.int64)
    if store_dir is None:
        chunks = _run(workers, encode, survey.count, progress="encoded")
        offsets[1:] = np.cumsum([len(c) for c in chunks])
        data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        return JpegStore(data, offsets, survey.slot, sizes, failures, threads=workers)
    data_file, layout_file = store_files(store_dir, survey.key, "jpeg")
    remove_other_stores(store_dir, (data_file, layout_file))
    with atomic_path(data_file) as temporary, open(temporary, "wb") as out:
        # Each photo is written as soon as it is encoded: only the threads' photos are held.
        for row, chunk in enumerate(_stream(workers, encode, survey.count, "encoded")):
            out.write(chunk)
            offsets[row + 1] = offsets[row] + len(chunk)
    store = JpegStore(np.zeros(0, np.uint8), offsets, survey.slot, sizes, failures)
    save_layout(layout_file, store, {"offsets": offsets.tolist()})
    return open_store(store_dir, survey.key, "jpeg", workers)


def _decode(path: Path, slot: tuple[int, int], raising: bool = False):
    """(the photo's pixels as stored: shrunk to the slot, portraits transposed; its true
    height and width); None for an unreadable photo unless `raising`."""
    try:
        photo, (height, width) = decode_photo_true_shape(path, *slot)
    except PhotoError:
        if raising:
            raise
        return None
    if height > width:
        photo = np.ascontiguousarray(photo.transpose(1, 0, 2))
    return photo, (height, width)


def _run(workers: int, work: Callable[[int], object], count: int, progress: str = "") -> list:
    """work(row) for rows 0..count-1 on a thread pool, results in row order."""
    return list(_stream(workers, work, count, progress))


def _stream(workers: int, work: Callable[[int], object], count: int, progress: str = ""):
    """work(row) for rows 0..count-1 on a thread pool, yielded in row order as they finish."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for done, result in enumerate(pool.map(work, range(count)), start=1):
            yield result
            if progress and done % 5000 == 0:
                _log.info("photo store: %s %d/%d", progress, done, count)
    finally:
        # On SIGTERM, drop the queued photos instead of decoding them all before exiting.
        pool.shutdown(cancel_futures=True)


def _header_aspect(path: Path) -> float | None:
    """Long side over short side, from the header alone; None when it cannot be read
    (decoding will say why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return max(width, height) / max(min(width, height), 1)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
