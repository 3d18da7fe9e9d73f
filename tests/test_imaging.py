"""decode_photo: every photo a user sends works the same in training and serving, or fails in words."""

import numpy as np
import photos
import pytest
import torch
from species_classifier.imaging import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotoError,
    decode_photo,
    normalize,
)


def test_jpeg_becomes_a_square_uint8_rgb_array():
    pixels = decode_photo(photos.encode(photos.halves((500, 375))), 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert pixels[:, :20, 0].mean() > 200 and pixels[:, -20:, 2].mean() > 200


def test_exif_orientation_is_applied():
    # Orientation 6: the stored left edge is displayed at the top.
    pixels = decode_photo(photos.exif_rotated_jpeg(6), 32).astype(int)
    top, bottom = pixels[:8].mean((0, 1)), pixels[-8:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (photos.sixteen_bit_png(65535), (255, 255, 255)),
        (photos.sixteen_bit_png(32896), (128, 128, 128)),
        (photos.cmyk_jpeg(), (255, 0, 0)),
        (photos.transparent_png(), (255, 255, 255)),
        (photos.greyscale_jpeg(), (128, 128, 128)),
    ],
    ids=["16-bit-white", "16-bit-grey", "cmyk-red", "transparent-on-white", "greyscale"],
)
def test_colour_modes_flatten_to_rgb(data, expected):
    pixels = decode_photo(data, 16).astype(int)
    assert np.abs(pixels.mean((0, 1)) - expected).max() < 6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an image format"),
        (b"hello, not a photo", "not an image format"),
        (photos.truncated_jpeg(), "corrupt or truncated"),
        (photos.png_header(10_000, 10_000), "100000000 pixels|10000x10000 pixels is over"),
    ],
    ids=["empty", "text", "truncated", "100-megapixel-header"],
)
def test_bad_photos_raise_a_reason(data, message):
    with pytest.raises(PhotoError, match=message):
        decode_photo(data, 32)


def test_missing_file_is_a_photo_error(tmp_path):
    with pytest.raises(PhotoError, match="cannot open"):
        decode_photo(tmp_path / "nope.jpg", 32)


def test_normalize_uses_imagenet_statistics():
    batch = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    out = normalize(batch)
    assert out.shape == (2, 3, 4, 4) and out.is_contiguous(memory_format=torch.channels_last)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))
