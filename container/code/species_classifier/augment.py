"""The seed's training augmentations, applied to whole batches on the device as one warp.

The photo cache keeps each photo at its true aspect (portraits transposed into landscape
slots, see cache.py). Random resized crop is drawn exactly as torchvision's
`RandomResizedCrop.get_params` draws it on the original photo (scale 0.8-1.0, aspect
3/4-4/3, up to 10 tries, then its central fallback crop); horizontal flip (p=0.5),
vertical flip (p=0.2) and rotation (up to 15 degrees) follow. All of these, and the step
from the true photo to where it lies in its slot, are affine maps, so per photo they
compose into a single 2x3 matrix and the batch is resampled once with `grid_sample`: no
per-photo Python, no PIL, no second pass over the pixels. Validation is the same warp of
the whole photo to img_size x img_size: the seed's `Resize((img_size, img_size))`.
Randomness comes from the generator the caller passes, so an epoch's augmentation is
reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from species_classifier.stores import COLS, HEIGHT, ROWS, WIDTH, to_device

CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
HFLIP_P = 0.5
VFLIP_P = 0.2
MAX_ROTATION_DEGREES = 15.0


def crop_boxes(sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(count, 4) float (top, left, height, width) in pixels of each true photo, drawn as
    torchvision's RandomResizedCrop.get_params draws them, for a whole batch at once."""
    height = sizes[:, HEIGHT].double().unsqueeze(1)
    width = sizes[:, WIDTH].double().unsqueeze(1)
    shape = (len(sizes), CROP_TRIES)
    target_area = height * width * _uniform(shape, *CROP_SCALE, generator)
    log_ratio = _uniform(shape, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator)
    ratio = torch.exp(log_ratio)
    try_w = torch.round(torch.sqrt(target_area * ratio))
    try_h = torch.round(torch.sqrt(target_area / ratio))
    fits = (try_w > 0) & (try_w <= width) & (try_h > 0) & (try_h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits, as its loop stops
    crop_w = try_w.gather(1, first).squeeze(1)
    crop_h = try_h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    top = torch.floor(_uniform(len(sizes), 0, 1, generator) * (height - crop_h + 1))
    left = torch.floor(_uniform(len(sizes), 0, 1, generator) * (width - crop_w + 1))

    # No try fits: the central crop, as wide as the aspect range allows.
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > CROP_RATIO[1], torch.round(height * CROP_RATIO[1]), width)
    fallback_h = torch.where(in_ratio < CROP_RATIO[0], torch.round(width / CROP_RATIO[0]), height)
    found = fits.any(1)
    crop_h = torch.where(found, crop_h, fallback_h)
    crop_w = torch.where(found, crop_w, fallback_w)
    top = torch.where(found, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], 1).float()


def random_affine_matrices(
    sizes: torch.Tensor, slot: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """(count, 2, 3) matrices mapping output to slot coordinates in [-1, 1]: a random
    resized crop of each true photo, then the seed's flips and rotation."""
    count = len(sizes)
    boxes = crop_boxes(sizes, generator)
    flip_x = torch.where(torch.rand(count, generator=generator) < HFLIP_P, -1.0, 1.0)
    flip_y = torch.where(torch.rand(count, generator=generator) < VFLIP_P, -1.0, 1.0)
    angle = torch.deg2rad(_uniform(count, -MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, generator))
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    # Output -> crop, in the seed's order read backwards (it crops, then flips, then
    # rotates the cropped square): crop = flip * rotation * output.
    in_crop = torch.stack(
        [
            torch.stack([flip_x * cos, -flip_x * sin], 1),
            torch.stack([flip_y * sin, flip_y * cos], 1),
        ],
        1,
    )
    return _place(sizes, slot, boxes, in_crop)


def whole_photo_matrices(sizes: torch.Tensor, slot: tuple[int, int]) -> torch.Tensor:
    """(count, 2, 3) matrices that map each whole true photo onto the output square."""
    heights, widths = sizes[:, HEIGHT].float(), sizes[:, WIDTH].float()
    zeros = torch.zeros_like(heights)
    boxes = torch.stack([zeros, zeros, heights, widths], 1)
    return _place(sizes, slot, boxes, torch.eye(2).expand(len(sizes), 2, 2))


def augment(
    pixels: torch.Tensor, sizes: torch.Tensor, img_size: int, generator: torch.Generator
) -> torch.Tensor:
    """uint8 slots NHWC (sizes on the CPU) -> augmented float NCHW img_size batch (0-255),
    on the pixels' device."""
    return _warp(pixels, random_affine_matrices(sizes, pixels.shape[1:3], generator), img_size)


def resize_whole(pixels: torch.Tensor, sizes: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 slots NHWC -> each whole photo squeezed to img_size x img_size, float NCHW (0-255)."""
    return _warp(pixels, whole_photo_matrices(sizes, pixels.shape[1:3]), img_size)


def _place(
    sizes: torch.Tensor, slot: tuple[int, int], boxes: torch.Tensor, in_crop: torch.Tensor
) -> torch.Tensor:
    """Compose output -> crop (in_crop, 2x2), crop -> true photo (boxes), and true photo ->
    its place in the slot (transposed for portraits) into (count, 2, 3) matrices."""
    heights, widths = sizes[:, HEIGHT].float(), sizes[:, WIDTH].float()
    top, left, crop_h, crop_w = boxes.unbind(1)
    # Crop coordinates in [-1, 1] -> fractions of the true photo (x right, y down).
    to_photo = torch.diag_embed(torch.stack([crop_w / widths, crop_h / heights], 1) / 2)
    centre = torch.stack([(left + crop_w / 2) / widths, (top + crop_h / 2) / heights], 1)
    # Fractions of the photo -> [-1, 1] over the slot; a portrait's x runs down the slot.
    slot_rows, slot_cols = slot
    across = 2 * sizes[:, COLS].float() / slot_cols
    down = 2 * sizes[:, ROWS].float() / slot_rows
    zeros = torch.zeros_like(across)
    transposed = (sizes[:, HEIGHT] > sizes[:, WIDTH]).unsqueeze(1)
    upright = torch.stack([across, zeros, zeros, down], 1)
    turned = torch.stack([zeros, across, down, zeros], 1)
    to_slot = torch.where(transposed, turned, upright).view(-1, 2, 2)
    linear = to_slot @ to_photo @ in_crop
    shift = (to_slot @ centre.unsqueeze(2)).squeeze(2) - 1
    return torch.cat([linear, shift.unsqueeze(2)], 2)


def _warp(pixels: torch.Tensor, theta: torch.Tensor, img_size: int) -> torch.Tensor:
    images = pixels.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(
        to_device(theta, images.device), [len(images), 3, img_size, img_size], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
