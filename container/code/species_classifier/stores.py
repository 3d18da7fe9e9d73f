"""The two ways the job keeps its decoded photos, behind one interface: `read(rows)`.

- `SlotStore` ("uint8"): every photo's pixels in one (N, slot_rows, slot_cols, 3) uint8
  array. The fastest to read (a batch is an index), and 360,000 bytes per photo at
  img_size 240.
- `JpegStore` ("jpeg"): every photo's slot content re-encoded once as JPEG q90, one byte
  string after the other, and decoded per batch: in threads with Pillow on the CPU (the next
  batch is decoded while the current one trains), or on the GPU with nvJPEG. About a tenth
  of the bytes (docs/benchmarks/photo-stores-cpu.md).

On disk each store is a pair of files, its bytes and a JSON layout, opened memory-mapped:
every worker of a host reads the same pages of the page cache, so a host holds one copy
whatever its number of workers, and nothing is copied whole on the way in. FFCV keeps
ImageNet the same way (one memory-mapped file of resized JPEGs).

Both keep the photo cache's layout (cache.py): per photo the true (height, width) and the
(rows, cols) it fills at the top left of its slot, portraits transposed. `select` narrows a
store to the readable photos by an index map, without copying pixels.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from species_classifier.atomic import atomic_path

# Quality of the re-encoded slots: at img_size 240, 32 KB a photo against 360 KB raw, with
# no difference the model's 0-255 inputs show beyond the JPEG noise the photos already have.
JPEG_QUALITY = 90
FILE_PREFIX = "photo-store-"

# Columns of a store's sizes.
HEIGHT, WIDTH, ROWS, COLS = range(4)


class _Store:
    """What both stores share: the layout, the readable rows, the batches."""

    kind = ""

    def __init__(
        self,
        slot: tuple[int, int],
        sizes: np.ndarray,
        failures: dict[int, str],
        rows: np.ndarray | None = None,
    ) -> None:
        self.slot = slot
        self.all_sizes = sizes
        self.failures = failures
        self.rows = np.arange(len(sizes)) if rows is None else rows
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 4) int32 true height, width, stored rows, stored cols of the selected photos."""
        return self.all_sizes[self.rows]

    @property
    def readable(self) -> np.ndarray:
        keep = np.ones(len(self.all_sizes), dtype=bool)
        keep[list(self.failures)] = False
        return keep[self.rows]

    def select(self, keep: np.ndarray):
        """The same store narrowed to the photos where `keep` is True (no pixels copied)."""
        narrowed = object.__new__(type(self))
        narrowed.__dict__.update(self.__dict__)
        narrowed.rows = self.rows[np.asarray(keep)]
        return narrowed

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.read(np.asarray(rows.cpu()))

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 slots NHWC of the selected photos `rows`, on self.device."""
        raise NotImplementedError

    def batches(self, row_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for rows in row_batches:
            yield self[rows]

    def close(self) -> None:
        """Stop any background decoding (the store stays readable)."""

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class SlotStore(_Store):
    kind = "uint8"

    def __init__(self, pixels: np.ndarray, sizes, failures, rows=None) -> None:
        super().__init__(tuple(pixels.shape[1:3]), sizes, failures, rows)
        self.pixels = pixels  # (N, slot_rows, slot_cols, 3) uint8, in memory or memory-mapped

    def read(self, rows: np.ndarray) -> torch.Tensor:
        # Sorted reads walk a memory-mapped file forwards; the batch keeps its order.
        wanted = self.rows[rows]
        order = np.argsort(wanted, kind="stable")
        batch = np.empty((len(wanted), *self.pixels.shape[1:]), dtype=np.uint8)
        batch[order] = self.pixels[wanted[order]]
        return torch.from_numpy(batch)

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def to_device(self, device: torch.device, chunk: int = 1024) -> torch.Tensor:
        """The selected photos as one tensor on `device`, copied a chunk at a time: the
        host never holds a second whole copy."""
        placed = torch.empty((len(self), *self.pixels.shape[1:]), dtype=torch.uint8, device=device)
        for start in range(0, len(self), chunk):
            rows = np.arange(start, min(start + chunk, len(self)))
            placed[start : start + len(rows)] = self.read(rows).to(device)
        return placed


class JpegStore(_Store):
    kind = "jpeg"

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        slot: tuple[int, int],
        sizes,
        failures,
        rows=None,
        threads: int = 0,
    ) -> None:
        super().__init__(slot, sizes, failures, rows)
        self.data = data  # uint8 bytes of every photo's JPEG, one after the other
        self.offsets = offsets  # (N + 1) int64: photo i is data[offsets[i]:offsets[i + 1]]
        self.threads = threads or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes

    def decode_on(self, device: torch.device) -> None:
        """Decode batches on `device`: nvJPEG on a CUDA device, Pillow threads on the CPU."""
        self.device = device

    def read(self, rows: np.ndarray) -> torch.Tensor:
        return self._finish(self._start(rows))

    def batches(self, row_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The batches in order; on the CPU the next one decodes while the caller trains."""
        if self.device.type == "cuda":
            yield from super().batches(row_batches)
            return
        pending = self._start(np.asarray(row_batches[0])) if row_batches else None
        for following in [*row_batches[1:], None]:
            current = pending
            pending = None if following is None else self._start(np.asarray(following))
            yield self._finish(current)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def photo_bytes(self, row: int) -> memoryview:
        stored = self.rows[row]
        return memoryview(self.data[self.offsets[stored] : self.offsets[stored + 1]])

    def _start(self, rows: np.ndarray):
        """Begin decoding `rows`: (the batch being filled, its pending work)."""
        if self.device.type == "cuda":
            return self.decode_batched(rows), []
        batch = np.zeros((len(rows), *self.slot, 3), dtype=np.uint8)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg-store")
        # One task per thread, not per photo: a batch is a few hundred microseconds of work
        # per photo, and per-photo futures would cost a sizeable share of that.
        shares = np.array_split(np.arange(len(rows)), min(self.threads, len(rows)) or 1)
        work = [self._pool.submit(self._decode_into, batch, rows, share) for share in shares]
        return batch, work

    def _finish(self, started) -> torch.Tensor:
        batch, work = started
        for future in work:
            future.result()
        return batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)

    def _decode_into(self, batch: np.ndarray, rows: np.ndarray, share: np.ndarray) -> None:
        for position in share:
            # Pillow releases the GIL while it decodes: the threads run in parallel.
            with Image.open(io.BytesIO(self.photo_bytes(rows[position]))) as image:
                pixels = np.asarray(image)  # RGB: the store encoded it from RGB pixels
            batch[position, : pixels.shape[0], : pixels.shape[1]] = pixels

    def decode_batched(self, rows: np.ndarray) -> torch.Tensor:
        """The batch decoded by torchvision in one call on self.device: nvJPEG's batched
        decode on a CUDA device (libjpeg on the CPU, which is how it is tested here)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.from_numpy(np.array(self.photo_bytes(row))) for row in rows]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        batch = torch.zeros((len(rows), *self.slot, 3), dtype=torch.uint8, device=self.device)
        for position, image in enumerate(decoded):
            batch[position, : image.shape[1], : image.shape[2]] = image.permute(1, 2, 0)
        return batch


def encode_slot(pixels: np.ndarray) -> bytes:
    """A photo's slot content (rows, cols, 3 uint8) as the JPEG a JpegStore keeps."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`; to a GPU from pinned memory, so the host does not
    wait for the copy (from pageable memory it waits for the whole stream first)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def read_batches(pixels, row_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The uint8 slots of each batch of rows, from a store or a tensor already on a device."""
    if isinstance(pixels, torch.Tensor):
        if not row_batches:
            return
        # The epoch's rows go to the tensor's device in one copy: a copy per batch would make
        # the host wait for the GPU each time.
        rows_on_device = to_device(torch.cat(row_batches), pixels.device)
        for rows in rows_on_device.split([len(rows) for rows in row_batches]):
            yield pixels[rows]
    else:
        yield from pixels.batches(row_batches)


# -- files ------------------------------------------------------------------------------


def store_files(directory: Path, key: str, kind: str) -> tuple[Path, Path]:
    """(bytes, layout) of the store of inputs `key` and kind `kind` in `directory`."""
    stem = directory / f"{FILE_PREFIX}{key}-{kind}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def save_layout(layout_file: Path, store: _Store, extra: dict | None = None) -> None:
    layout = {
        "kind": store.kind,
        "slot": list(store.slot),
        "sizes": store.all_sizes.tolist(),
        "failures": {str(k): v for k, v in store.failures.items()},
        **(extra or {}),
    }
    with atomic_path(layout_file) as temporary:
        temporary.write_text(json.dumps(layout))


def open_store(directory: Path, key: str, kind: str, threads: int = 0) -> _Store | None:
    """The complete store of `kind` for `key` in `directory`, memory-mapped; None when there
    is none or it does not add up (a torn or foreign file: the caller builds it again)."""
    data_file, layout_file = store_files(directory, key, kind)
    if not (data_file.is_file() and layout_file.is_file()):
        return None
    try:
        layout = json.loads(layout_file.read_text())
        slot = tuple(int(n) for n in layout["slot"])
        sizes = np.asarray(layout["sizes"], dtype=np.int32).reshape(-1, 4)
        failures = {int(k): str(v) for k, v in layout["failures"].items()}
        count = len(sizes)
        if kind == "uint8":
            shape = (count, *slot, 3)
            if data_file.stat().st_size != int(np.prod(shape)):
                return None
            pixels = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
            return SlotStore(pixels, sizes, failures)
        offsets = np.asarray(layout["offsets"], dtype=np.int64)
        if len(offsets) != count + 1 or data_file.stat().st_size != offsets[-1]:
            return None
        data = (
            np.memmap(data_file, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
        )
        return JpegStore(data, offsets, slot, sizes, failures, threads=threads)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_other_stores(directory: Path, keep: tuple[Path, ...]) -> None:
    """Drop the stores of other inputs or kinds: only one store per job lives in a folder."""
    for stale in directory.glob(f"{FILE_PREFIX}*"):
        if stale not in keep:
            stale.unlink(missing_ok=True)
