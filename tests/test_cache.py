"""The photo cache: each photo at its true aspect (portraits transposed into landscape slots),
never enlarged, its sizes recorded, stored for a restart, and validated like serving sees it."""

import logging

import numpy as np
import pytest
import torch
from photos import encode, exif_rotated_jpeg, halves
from PIL import Image
from species_classifier.augment import resize_whole
from species_classifier.cache import build_cache, slot_shape
from species_classifier.demo_data import make_demo_dataset
from species_classifier.imaging import decode_photo


def write(folder, name, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.fixture
def mixed(tmp_path):
    """A 500 x 375 landscape, its portrait twin, a square and a small photo."""
    return [
        write(tmp_path, "landscape.jpg", encode(halves((500, 375)), quality=95)),
        write(tmp_path, "portrait.jpg", encode(halves((375, 500)), quality=95)),
        write(tmp_path, "square.jpg", encode(halves((400, 400)), quality=95)),
        write(tmp_path, "small.jpg", encode(halves((60, 45)), quality=95)),
    ]


def test_photos_keep_their_aspect_in_landscape_slots(tmp_path, mixed):
    cache = build_cache(mixed, tmp_path, img_size=64, workers=2)
    assert cache.pixels.shape == (4, 80, 107, 3)  # short side 1.25 x 64, long side 4:3
    assert cache.sizes.tolist() == [
        [375, 500, 80, 107],
        [500, 375, 80, 107],  # a portrait, stored transposed
        [400, 400, 80, 80],
        [45, 60, 45, 60],  # smaller than the slot: kept as it is, never enlarged
    ]
    landscape, portrait, square, small = cache.pixels.astype(int)
    # halves(): red left, blue right. In the landscape slot the portrait's left half runs
    # along the top rows.
    assert landscape[:, :50, 0].mean() > 200 and landscape[:, 57:, 2].mean() > 200
    assert portrait[:38, :, 0].mean() > 200 and portrait[42:, :, 2].mean() > 200
    assert square[:, 80:].max() == 0 and small[45:].max() == 0 and small[:, 60:].max() == 0


def test_validation_of_the_cache_matches_the_served_photo(tmp_path):
    """The whole photo squeezed to img_size from the cache, as decode_photo (serving) does it."""
    make_demo_dataset(tmp_path, photos_per_species=3, photo_size=500, species=("a",))
    files = sorted(tmp_path.glob("images/*/*.jpg"))
    cache = build_cache(files, tmp_path, img_size=96, workers=2)
    assert [tuple(s[:2]) for s in cache.sizes] == [(375, 500), (500, 375), (500, 500)]
    ours = resize_whole(torch.from_numpy(cache.pixels), torch.from_numpy(cache.sizes), 96)
    served = np.stack([decode_photo(f, 96) for f in files]).astype(np.float32)
    difference = np.abs(ours.permute(0, 2, 3, 1).numpy() - served)
    # Bilinear both, Pillow's with antialiasing: they differ in the photos' pixel noise only.
    assert difference.mean() < 3


def test_exif_rotation_counts_for_the_true_size(tmp_path):
    path = write(tmp_path, "turned.jpg", exif_rotated_jpeg(6))  # stored 80 x 60, upright 60 x 80
    cache = build_cache([path], tmp_path, img_size=32, workers=1)
    assert cache.sizes.tolist() == [[80, 60, 40, 53]]


def test_the_slot_covers_most_photos_and_shrinks_the_odd_panorama(tmp_path, caplog):
    photos = [
        write(tmp_path, f"{n}.png", encode(halves((400, 300)), "PNG")) for n in range(200)
    ] + [write(tmp_path, "panorama.png", encode(halves((900, 300)), "PNG"))]
    with caplog.at_level(logging.INFO, logger="species_classifier.cache"):
        cache = build_cache(photos, tmp_path, img_size=64, workers=2)
    assert cache.pixels.shape[1:3] == (80, 107)
    assert cache.sizes[-1].tolist() == [300, 900, 36, 107]  # true size kept for the crop
    assert "1 photo(s) longer than 1.34:1 shrunk to fit" in caplog.text
    assert "uint8, 0.01 GB (25680 bytes a photo)" in caplog.text


def test_slot_shape_is_bounded():
    assert slot_shape(240, [4 / 3] * 10) == (300, 400)
    assert slot_shape(240, [1.0]) == (300, 300)
    assert slot_shape(240, [5.0]) == (300, 600)  # never more than 2:1
    assert slot_shape(240, []) == (300, 300)


def test_a_stored_cache_is_reused_with_its_sizes(tmp_path, mixed):
    store = tmp_path / "checkpoints"
    mixed.append(write(tmp_path, "broken.jpg", b"not a photo"))
    first = build_cache(mixed, tmp_path, img_size=64, workers=2, store_dir=store)
    (tmp_path / "landscape.jpg").touch()  # same name and size: still the same input
    Image.new("RGB", (10, 10)).save(tmp_path / "unused.png")
    again = build_cache(mixed, tmp_path, img_size=64, workers=2, store_dir=store)
    assert np.array_equal(first.pixels, again.pixels)
    assert np.array_equal(first.sizes, again.sizes)
    assert again.failures == first.failures and list(again.failures) == [4]
    assert again.readable.tolist() == [True, True, True, True, False]
    other_size = build_cache(mixed, tmp_path, img_size=32, workers=2, store_dir=store)
    assert other_size.pixels.shape[1] == 40
    assert len(list(store.glob("photo-store-*"))) == 2  # the 64 px cache was replaced
