"""Which photo store a job uses, decided before a photo is decoded, from what it can know.

The facts: the photo count, the bytes per photo of each store (the uint8 slot exactly, the
JPEG slot from a sample encoded first), the host memory the job may still use (its cgroup's
limit less what the cgroup holds, else the kernel's MemAvailable), the free GPU memory, and
the workers per host. `plan_store` is a pure function of them, so the choice for any
instance can be tested without that instance; the job logs the plan with its numbers.

Order of preference: the uint8 store in GPU memory (no host copy, nothing to decode), the
uint8 store in host memory, the JPEG store (decoded per batch: on the GPU with nvJPEG where
there is one, else in CPU threads). One store per host, shared by its workers through the
page cache; each worker adds its own process (torch, model, optimiser, and on the CPU the
training's activations). When not even the JPEG store fits, the job stops before decoding
with one line: what it needs, what there is, and what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from species_classifier.contract.hyperparameters import ConfigError

GB = 1e9
# Resident memory of one training worker apart from its photos, measured on the CPU with
# scripts/bench_stores.py (docs/benchmarks/photo-stores-cpu.md): the `train` process with its
# libraries, efficientnet_b1 and Adam (0.88 GB), rounded up...
WORKER_BASE_BYTES = 1_000_000_000
# ... and, training on the CPU, what a batch adds per input pixel of it (2,700-2,750 bytes
# measured: 5.1 GB at batch 32 x 240 px, 0.53 GB at batch 16 x 96 px).
CPU_ACTIVATION_BYTES_PER_PIXEL = 2_750
# A CUDA process maps its libraries and keeps a context in host memory. Not measured here
# (no GPU was at hand): the allowance is generous, to be replaced by `make gpu-check`'s figure.
CUDA_HOST_BYTES = 2_000_000_000
# The plan fills at most this share of the available memory: the kernel, the page cache the
# photos are read through and allocator slack need the rest.
HOST_SHARE = 0.85
# A store on the GPU leaves at least half its free memory to training.
GPU_STORE_SHARE = 0.5


class StoreDoesNotFit(ConfigError):
    """Not even the compact store fits this host: the job stops before decoding."""


@dataclass(frozen=True)
class StorePlan:
    kind: str  # "uint8" or "jpeg"
    place: str  # "gpu": one uint8 tensor in GPU memory; "host": memory-mapped, shared
    decode: str  # where JPEG batches are decoded: "cuda" (nvJPEG) or "cpu" (threads)
    store_bytes: int
    host_bytes: int  # what the job needs on the host: the store there, and its workers
    available: int
    reason: str

    def describe(self, photos: int) -> str:
        where = "GPU memory" if self.place == "gpu" else "host memory, shared by its workers"
        decode = f", decoded per batch on the {self.decode.upper()}" if self.kind == "jpeg" else ""
        return (
            f"photo store: {self.kind} in {where}{decode}: {photos} photos, "
            f"{self.store_bytes / GB:.2f} GB; host needs {self.host_bytes / GB:.2f} GB of "
            f"{self.available / GB:.2f} GB available ({self.reason})"
        )


def worker_bytes(device_type: str, batch_size: int, img_size: int) -> int:
    """Host memory one training worker needs besides the photo store."""
    if device_type == "cuda":
        return WORKER_BASE_BYTES + CUDA_HOST_BYTES
    return WORKER_BASE_BYTES + CPU_ACTIVATION_BYTES_PER_PIXEL * batch_size * img_size**2


def plan_store(
    photos: int,
    bytes_per_photo: dict[str, float],
    available: int,
    free_gpu: int | None,
    workers: int,
    per_worker: int,
    photo_store: str = "auto",
    cache_device: str = "auto",
) -> StorePlan:
    """The store for `photos` photos on a host with `available` bytes and `workers` workers
    of `per_worker` bytes each; `free_gpu` is each GPU's free memory, None without a GPU.

    `photo_store` forces a kind, `cache_device` ("auto", "gpu", "cpu") where a uint8 store
    lives. Raises StoreDoesNotFit with the figures and the fix when nothing fits."""
    budget = available * HOST_SHARE
    processes = workers * per_worker
    uint8 = math.ceil(photos * bytes_per_photo["uint8"])
    jpeg = math.ceil(photos * bytes_per_photo["jpeg"])
    has_gpu = free_gpu is not None
    wants = ("uint8", "jpeg") if photo_store == "auto" else (photo_store,)

    if "uint8" in wants and has_gpu and cache_device != "cpu" and processes <= budget:
        gpu_budget = free_gpu * GPU_STORE_SHARE
        if cache_device == "gpu" or uint8 <= gpu_budget:
            reason = (
                "cache_device=gpu"
                if uint8 > gpu_budget
                else f"fits half the GPU's free {free_gpu / GB:.1f} GB"
            )
            return StorePlan("uint8", "gpu", "cpu", uint8, processes, available, reason)
    if "uint8" in wants and uint8 + processes <= budget:
        reason = "fits" if photo_store == "auto" else "photo_store=uint8"
        return StorePlan("uint8", "host", "cpu", uint8, uint8 + processes, available, reason)
    if "jpeg" in wants and jpeg + processes <= budget:
        reason = (
            f"the uint8 store's {uint8 / GB:.2f} GB does not fit"
            if photo_store == "auto"
            else "photo_store=jpeg"
        )
        decode = "cuda" if has_gpu else "cpu"
        return StorePlan("jpeg", "host", decode, jpeg, jpeg + processes, available, reason)

    kind = wants[-1]
    needed = (uint8 if kind == "uint8" else jpeg) + processes
    raise StoreDoesNotFit(
        f"{photos} photos need {needed / GB:.1f} GB of host memory as the {kind} photo store "
        f"with {workers} worker(s), but {available / GB:.1f} GB is available: use an instance "
        "with more memory, a smaller img_size or fewer photos"
        + (" (or photo_store=auto)" if photo_store == "uint8" else "")
    )


def available_host_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroups: Path = Path("/proc/self/cgroup")
) -> tuple[int, str]:
    """(bytes the job may use on this host, where the figure came from): what this process
    holds already (its anonymous memory), and what it may still take: the memory cgroup's limit less what the
    cgroup holds (its reclaimable file cache excepted), or the kernel's MemAvailable when
    that is lower. cgroup v2 or v1, whichever is mounted."""
    available, source = _mem_available(), "MemAvailable"
    for group, limit_name, usage_name, inactive_key in _memory_cgroups(cgroup_root, own_cgroups):
        limit = _read_int(group / limit_name)
        if limit is None or limit >= 2**60:  # "max", or v1's "no limit"
            continue
        usage = _read_int(group / usage_name) or 0
        inactive = _stat_value(group / "memory.stat", inactive_key)
        headroom = max(limit - usage + inactive, 0)
        if headroom < available:
            available, source = headroom, f"cgroup limit {limit / GB:.2f} GB"
    return available + _own_resident_bytes(), source


def _own_resident_bytes() -> int:
    """This process's own resident memory (RssAnon): already the job's, and counted in its
    workers' share. Not its mapped libraries: their pages are shared page cache."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _memory_cgroups(root: Path, own_cgroups: Path) -> list[tuple[Path, str, str, str]]:
    """(folder, limit file, usage file, inactive-cache key) of this process's memory cgroup."""
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            found.append((root / relative, "memory.max", "memory.current", "inactive_file"))
        elif "memory" in controllers.split(","):
            found.append(
                (
                    root / "memory" / relative,
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                    "total_inactive_file",
                )
            )
    return found


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0
