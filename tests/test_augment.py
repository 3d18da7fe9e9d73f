"""The batched affine augmentation: the seed's ranges, reproducible, and on the batch's device."""

import math

import torch
from species_classifier.augment import augment, random_affine_matrices


def test_matrices_stay_within_the_seeds_ranges():
    theta = random_affine_matrices(4000, torch.Generator().manual_seed(0))
    linear = theta[:, :, :2]
    # |det| = crop area fraction: scale 0.8-1.0 (less where the aspect clamp bites).
    area = linear.det().abs()
    assert area.max() <= 1.0 + 1e-5 and area.min() >= 0.6
    flips_x = (linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]) < 0
    assert 0.35 < flips_x.float().mean() < 0.65  # one flip (not both) flips orientation
    angle = torch.atan2(linear[:, 1, 0].abs(), linear[:, 1, 1].abs())
    assert angle.max() <= math.radians(15) + 1e-4
    # the crop never leaves the photo
    corners = theta[:, :, 2].abs() + linear.abs().sum(-1)
    assert corners.max() <= 1.0 + 2 * math.sin(math.radians(15))


def test_same_generator_seed_same_batch():
    pixels = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    first = augment(pixels, torch.Generator().manual_seed(3))
    again = augment(pixels, torch.Generator().manual_seed(3))
    other = augment(pixels, torch.Generator().manual_seed(4))
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 255
