"""The batched device augmentation: torchvision's crop rule on the true photo, the seed's
flips and rotation, portraits transposed in the cache undone, reproducible."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from species_classifier.augment import (
    _place,
    augment,
    crop_boxes,
    random_affine_matrices,
    resize_whole,
)
from torchvision.transforms import RandomResizedCrop

# (height, width): iNaturalist's medium landscape and portrait, a square, and two
# panoramas where no try of RandomResizedCrop fits and its central fallback decides.
SHAPES = [(375, 500), (500, 375), (500, 500), (300, 1000), (1000, 300)]


def sizes_of(shapes):
    """A sizes tensor for photos stored at their true size."""
    return torch.tensor([(h, w, min(h, w), max(h, w)) for h, w in shapes], dtype=torch.int32)


def torchvision_boxes(height, width, count):
    image = torch.empty(1, height, width)
    torch.manual_seed(0)
    crop = RandomResizedCrop(8, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
    return np.array([crop.get_params(image, crop.scale, crop.ratio) for _ in range(count)])


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_crop_boxes_follow_torchvisions_get_params(shape):
    count = 3000
    ours = crop_boxes(sizes_of([shape] * count), torch.Generator().manual_seed(1)).numpy()
    theirs = torchvision_boxes(*shape, count).astype(np.float64)
    height, width = shape

    def describe(boxes):
        top, left, crop_h, crop_w = boxes.T
        area = crop_h * crop_w / (height * width)
        aspect = crop_w / crop_h
        centre_x = (left + crop_w / 2) / width
        centre_y = (top + crop_h / 2) / height
        return {
            "area": np.quantile(area, [0.05, 0.5, 0.95]),
            "aspect": np.quantile(aspect, [0.05, 0.5, 0.95]),
            "centre": np.array([centre_x.mean(), centre_y.mean(), centre_x.std(), centre_y.std()]),
        }

    for name, ours_q in describe(ours).items():
        assert np.allclose(ours_q, describe(theirs)[name], atol=0.02), (name, shape)
    # Every box lies inside the true photo, whole pixels, as torchvision's do.
    top, left, crop_h, crop_w = ours.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    assert np.array_equal(ours, np.round(ours))


def test_the_fallback_is_torchvisions_central_crop():
    ours = crop_boxes(sizes_of([(300, 1000), (1000, 300)]), torch.Generator().manual_seed(0))
    for box, (height, width) in zip(ours.tolist(), [(300, 1000), (1000, 300)], strict=True):
        expected = torchvision_boxes(height, width, 1)[0]
        assert box == list(expected)
    assert ours.tolist() == [[0, 300, 300, 400], [300, 0, 400, 300]]


def coordinates_photo(height, width):
    """A photo whose pixels say where they are: red = x, green = y, blue = a ramp."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).to(torch.uint8)


def in_slot(photo, slot):
    """How the cache stores a photo: transposed when it is a portrait, top-left of its slot."""
    height, width = photo.shape[:2]
    stored = photo.transpose(0, 1) if height > width else photo
    canvas = torch.zeros(*slot, 3, dtype=torch.uint8)
    canvas[: stored.shape[0], : stored.shape[1]] = stored
    return canvas


@pytest.mark.parametrize(
    "shape", [(60, 80), (80, 60), (64, 64)], ids=["landscape", "portrait", "square"]
)
def test_a_crop_of_the_stored_photo_is_the_crop_of_the_original(shape):
    photo = coordinates_photo(*shape)
    slot = (64, 96)
    pixels = in_slot(photo, slot).unsqueeze(0)
    sizes = sizes_of([shape])
    box = torch.tensor([[7.0, 5.0, 44.0, 50.0]])  # top, left, height, width
    theta = _place(sizes, slot, box, torch.eye(2).unsqueeze(0))
    grid = torch.nn.functional.affine_grid(theta, [1, 3, 32, 32], align_corners=False)
    ours = torch.nn.functional.grid_sample(
        pixels.permute(0, 3, 1, 2).float(), grid, mode="bilinear", align_corners=False
    )
    expected = TF.resized_crop(
        photo.permute(2, 0, 1).float(), 7, 5, 44, 50, [32, 32], antialias=False
    )
    assert (ours[0] - expected).abs().max() < 1e-3


def test_validation_squeezes_the_whole_true_photo_like_resize():
    photos = [coordinates_photo(60, 80), coordinates_photo(80, 60)]
    slot = (60, 90)
    pixels = torch.stack([in_slot(p, slot) for p in photos])
    ours = resize_whole(pixels, sizes_of([(60, 80), (80, 60)]), 30)
    for photo, out in zip(photos, ours, strict=True):
        expected = TF.resize(photo.permute(2, 0, 1).float(), [30, 30], antialias=False)
        assert (out - expected).abs().max() < 1e-3


def test_a_photo_stored_smaller_maps_by_fractions_of_its_true_size():
    photo = coordinates_photo(40, 60)  # stored at half its true 80 x 120
    pixels = in_slot(photo, (40, 60)).unsqueeze(0)
    sizes = torch.tensor([[80, 120, 40, 60]], dtype=torch.int32)
    ours = resize_whole(pixels, sizes, 20)
    expected = TF.resize(photo.permute(2, 0, 1).float(), [20, 20], antialias=False)
    assert (ours[0] - expected).abs().max() < 1e-3


def test_flips_and_rotation_stay_within_the_seeds_ranges():
    count = 4000
    sizes = sizes_of([(500, 500)] * count)
    theta = random_affine_matrices(sizes, (500, 500), torch.Generator().manual_seed(0))
    linear = theta[:, :, :2]
    # One flip (not both) flips orientation: p = 0.5 * 0.8 + 0.5 * 0.2 = 0.5.
    flipped = linear.det() < 0
    assert 0.45 < flipped.float().mean() < 0.55
    # A square crop of a square photo: its columns have equal length, at the rotation angle.
    angle = torch.atan2(linear[:, 1, 0].abs(), linear[:, 0, 0].abs())
    square = (linear[:, 0].norm(dim=1) / linear[:, 1].norm(dim=1) - 1).abs() < 1e-3
    assert angle[square].max() <= math.radians(15) + 1e-4
    assert angle[square].max() >= math.radians(14)


def test_same_generator_seed_same_batch():
    pixels = torch.randint(0, 256, (6, 40, 52, 3), dtype=torch.uint8)
    sizes = sizes_of([(40, 52), (52, 40), (40, 40)] * 2)
    first = augment(pixels, sizes, 32, torch.Generator().manual_seed(3))
    again = augment(pixels, sizes, 32, torch.Generator().manual_seed(3))
    other = augment(pixels, sizes, 32, torch.Generator().manual_seed(4))
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 255
