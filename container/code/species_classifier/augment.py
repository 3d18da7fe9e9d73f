"""The seed's training augmentations, applied to whole batches on the device as one warp.

Random resized crop (scale 0.8-1.0, aspect 3/4-4/3), horizontal flip (p=0.5), vertical
flip (p=0.2) and rotation (up to 15 degrees) are all affine maps, so per photo they
compose into a single 2x3 matrix and the batch is resampled once with `grid_sample`:
no per-photo Python, no PIL, no second pass over the pixels. Randomness comes from the
generator the caller passes, so an epoch's augmentation is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
HFLIP_P = 0.5
VFLIP_P = 0.2
MAX_ROTATION_DEGREES = 15.0


def random_affine_matrices(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 2, 3) matrices mapping output to input coordinates in [-1, 1]."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    area = uniform(*CROP_SCALE)
    ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    # Crop width and height as fractions of the image; clamped to stay inside it.
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (1 - width) * uniform(-1.0, 1.0)
    centre_y = (1 - height) * uniform(-1.0, 1.0)
    flip_x = torch.where(torch.rand(count, generator=generator) < HFLIP_P, -1.0, 1.0)
    flip_y = torch.where(torch.rand(count, generator=generator) < VFLIP_P, -1.0, 1.0)
    angle = torch.deg2rad(uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input = centre + crop_scale * flip * rotation * output (the seed's order:
    # crop, then flips, then rotation of the cropped image).
    theta = torch.empty(count, 2, 3)
    theta[:, 0, 0] = width * flip_x * cos
    theta[:, 0, 1] = -width * flip_x * sin
    theta[:, 1, 0] = height * flip_y * sin
    theta[:, 1, 1] = height * flip_y * cos
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    return theta


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 NHWC batch -> augmented float NCHW batch (0-255), on the batch's device."""
    images = pixels.permute(0, 3, 1, 2).float()
    theta = random_affine_matrices(len(images), generator).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
