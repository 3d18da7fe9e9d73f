"""The photo stores: the JPEG store gives the uint8 store's photos back (within JPEG's
noise), both reopen from their files and rebuild torn ones, reads keep their order, and the
plan picks the store each of the seed's instances can hold, or stops in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from photos import encode
from PIL import Image
from species_classifier.cache import build_store, survey_photos
from species_classifier.memory import (
    GB,
    StoreDoesNotFit,
    available_host_memory,
    plan_store,
    worker_bytes,
)
from species_classifier.stores import open_store, read_batches, store_files

GIB = 2**30


def textured(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.BICUBIC)


@pytest.fixture
def photos(tmp_path):
    """Landscapes, portraits, one photo smaller than any slot and a broken file."""
    channel = tmp_path / "channel"
    channel.mkdir()
    paths = []
    for index in range(12):
        size = (200, 150) if index % 3 else (150, 200)
        path = channel / f"{index}.jpg"
        path.write_bytes(encode(textured(size, index), quality=95))
        paths.append(path)
    small = channel / "small.jpg"
    small.write_bytes(encode(textured((40, 30), 99), quality=95))
    paths.append(small)
    broken = channel / "broken.jpg"
    broken.write_bytes(b"not a photo")
    return [*paths, broken], channel


def test_the_jpeg_store_gives_the_uint8_photos_back_at_a_fraction_of_the_bytes(photos):
    paths, channel = photos
    survey = survey_photos(paths, channel, img_size=64, workers=2)
    slots = build_store(survey, "uint8", 2)
    jpegs = build_store(survey, "jpeg", 2)
    assert np.array_equal(slots.sizes, jpegs.sizes) and slots.failures == jpegs.failures
    assert list(jpegs.failures) == [13] and slots.slot == jpegs.slot == (80, 107)
    rows = np.arange(13)
    raw, decoded = slots.read(rows).int(), jpegs.read(rows).int()
    assert raw.shape == decoded.shape == (13, 80, 107, 3)
    assert (raw - decoded).abs().float().mean() < 3  # JPEG q90 noise, nothing more
    assert slots.sizes[12].tolist() == [30, 40, 30, 40]
    assert decoded[12, 30:].max() == 0 and decoded[12, :, 40:].max() == 0  # blank padding
    assert decoded[12, :30, :40].float().mean() > 10
    assert jpegs.nbytes < slots.nbytes / 4
    # The sample's estimate is what the store turned out to weigh, give or take its margin.
    estimate = survey.bytes_per_photo["jpeg"]
    assert jpegs.nbytes / 14 < estimate < 1.5 * jpegs.nbytes / 14
    assert survey.bytes_per_photo["uint8"] == 80 * 107 * 3


@pytest.mark.parametrize("kind", ["uint8", "jpeg"])
def test_a_store_reopens_from_its_files_and_a_torn_one_is_rebuilt(photos, tmp_path, kind):
    paths, channel = photos
    folder = tmp_path / "stores"
    survey = survey_photos(paths, channel, img_size=48, workers=2)
    first = build_store(survey, kind, 2, folder)
    again = open_store(folder, survey.key, kind)
    expected = first.read(np.arange(13))
    assert again is not None and again.failures == first.failures
    assert torch.equal(again.read(np.arange(13)), expected)
    data_file, _ = store_files(folder, survey.key, kind)
    with open(data_file, "r+b") as handle:
        handle.truncate(data_file.stat().st_size - 1)
    assert open_store(folder, survey.key, kind) is None
    rebuilt = build_store(survey, kind, 2, folder)
    assert torch.equal(rebuilt.read(np.arange(13)), expected)
    other = build_store(survey_photos(paths, channel, img_size=32, workers=2), kind, 2, folder)
    assert len(list(folder.glob("photo-store-*"))) == 2  # the 48 px store was replaced
    assert other.slot == (40, 54)


@pytest.mark.parametrize("kind", ["uint8", "jpeg"])
def test_readable_photos_are_selected_without_copies_and_batches_keep_their_order(photos, kind):
    paths, channel = photos
    store = build_store(survey_photos(paths, channel, img_size=48, workers=2), kind, 2)
    readable = store.select(store.readable)
    assert len(readable) == 13 and readable.readable.all()
    every = readable.read(np.arange(13))
    row_batches = [torch.tensor([5, 0, 12]), torch.tensor([3]), torch.tensor([7, 7, 1])]
    batches = list(read_batches(readable, row_batches))
    for rows, batch in zip(row_batches, batches, strict=True):
        assert torch.equal(batch, every[rows])
    on_device = torch.from_numpy(np.asarray(every))
    assert torch.equal(next(read_batches(on_device, row_batches)), every[row_batches[0]])
    readable.close()


def test_the_batched_torchvision_decode_fills_slots_as_pillow_does(photos):
    """The path nvJPEG takes on a GPU, run on the CPU: same slots, same padding."""
    paths, channel = photos
    store = build_store(survey_photos(paths, channel, img_size=48, workers=2), "jpeg", 2)
    rows = np.array([12, 0, 4])
    batched, threaded = store.decode_batched(rows), store.read(rows)
    assert batched.shape == threaded.shape and batched.dtype == torch.uint8
    assert (batched.int() - threaded.int()).abs().max() <= 2  # libjpeg builds may round apart
    assert batched[0, 30:].max() == 0 and batched[0, :, 40:].max() == 0


# Measured bytes per photo at img_size 240 (docs/benchmarks/photo-stores-cpu.md), rounded up.
AT_240 = {"uint8": 360_000, "jpeg": 40_000}


def plan_for(photos, memory_gib, gpu_gb, workers=1, **options):
    """The plan on an instance with `memory_gib` of RAM (MemAvailable at start is about
    0.94 of it) and a GPU with `gpu_gb` free (None: no GPU)."""
    device = "cpu" if gpu_gb is None else "cuda"
    return plan_store(
        photos,
        AT_240,
        int(0.94 * memory_gib * GIB),
        None if gpu_gb is None else int(gpu_gb * GB),
        workers,
        worker_bytes(device, 64, 240),
        **options,
    )


@pytest.mark.parametrize(
    ("instance", "photos", "memory_gib", "gpu_gb", "kind", "place", "decode"),
    [
        ("ml.g4dn.xlarge", 15_000, 16, 15, "uint8", "gpu", "cpu"),
        ("ml.g4dn.xlarge", 35_000, 16, 15, "jpeg", "host", "cuda"),
        ("ml.g4dn.xlarge", 150_000, 16, 15, "jpeg", "host", "cuda"),
        ("ml.g5.xlarge", 30_000, 16, 22, "uint8", "gpu", "cpu"),
        ("ml.g5.xlarge", 150_000, 16, 22, "jpeg", "host", "cuda"),
        ("ml.g5.2xlarge", 50_000, 32, 22, "uint8", "host", "cpu"),
        ("ml.g5.2xlarge", 150_000, 32, 22, "jpeg", "host", "cuda"),
        ("ml.g5.4xlarge", 120_000, 64, 22, "uint8", "host", "cpu"),
        ("ml.m5.xlarge (CPU)", 25_000, 16, None, "jpeg", "host", "cpu"),
    ],
)
def test_the_seeds_instances_get_the_store_they_can_hold(
    instance, photos, memory_gib, gpu_gb, kind, place, decode
):
    plan = plan_for(photos, memory_gib, gpu_gb)
    assert (plan.kind, plan.place, plan.decode) == (kind, place, decode), instance
    assert plan.host_bytes <= 0.85 * plan.available


def test_150000_photos_fit_a_g4dn_xlarge_under_12_gb():
    plan = plan_for(150_000, 16, 15)
    assert plan.host_bytes < 12 * GB
    assert plan.store_bytes == 150_000 * AT_240["jpeg"]


def test_workers_of_a_host_share_one_store_but_each_brings_its_process():
    one = plan_for(40_000, 64, 15, workers=1)
    four = plan_for(40_000, 64, 15, workers=4)
    assert (one.kind, one.place) == (four.kind, four.place) == ("uint8", "host")
    assert one.store_bytes == four.store_bytes
    assert four.host_bytes - one.host_bytes == 3 * worker_bytes("cuda", 64, 240)


def test_hyperparameters_force_a_store_or_a_place():
    assert plan_for(1_000, 16, 15, photo_store="jpeg").kind == "jpeg"
    assert plan_for(1_000, 16, 15, cache_device="cpu").place == "host"
    assert plan_for(40_000, 16, 15, cache_device="gpu").place == "gpu"  # asked for: obeyed


def test_nothing_that_fits_stops_the_job_in_one_line_with_the_fix():
    with pytest.raises(StoreDoesNotFit) as caught:
        plan_for(400_000, 16, 15)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("400000 photos need 19.0 GB of host memory as the jpeg photo store")
    assert "GB is available: use an instance with more memory, a smaller img_size" in message
    with pytest.raises(StoreDoesNotFit, match=r"as the uint8 photo store.*\(or photo_store=auto\)"):
        plan_for(40_000, 16, None, photo_store="uint8")


def cgroup_tree(root, version: int, limit: str, usage: int, inactive: int):
    """A fake /sys/fs/cgroup and /proc/self/cgroup that put this process in group 'job'."""
    if version == 2:
        group = root / "job"
        names = ("memory.max", "memory.current", "inactive_file")
        own = "0::/job\n"
    else:
        group = root / "memory" / "job"
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        own = "4:memory:/job\n1:cpu:/\n"
    group.mkdir(parents=True)
    (group / names[0]).write_text(limit + "\n")
    (group / names[1]).write_text(f"{usage}\n")
    (group / "memory.stat").write_text(f"anon 5\n{names[2]} {inactive}\n")
    (root / "self-cgroup").write_text(own)
    return available_host_memory(root, root / "self-cgroup")


@pytest.mark.parametrize("version", [1, 2])
def test_the_memory_a_job_may_use_is_its_cgroups_limit_less_what_it_holds(tmp_path, version):
    available, source = cgroup_tree(tmp_path, version, str(2 * 10**9), 5 * 10**8, 10**8)
    # What the job may use: what the cgroup has left, and what this process already holds.
    status = Path("/proc/self/status").read_text()
    resident = int(status.split("RssAnon:")[1].split()[0]) * 1024
    left = 2 * 10**9 - 5 * 10**8 + 10**8
    assert left + 0.9 * resident < available < left + 1.1 * resident
    assert source == "cgroup limit 2.00 GB"


@pytest.mark.parametrize(("version", "limit"), [(1, str(2**63 - 4096)), (2, "max")])
def test_without_a_cgroup_limit_memavailable_counts(tmp_path, version, limit):
    available, source = cgroup_tree(tmp_path, version, limit, 10**9, 0)
    meminfo = Path("/proc/meminfo").read_text()
    total = int(meminfo.split("MemTotal:")[1].split()[0]) * 1024
    assert source == "MemAvailable" and 0 < available <= total
