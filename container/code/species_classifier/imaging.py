"""Photo decoding and the model's input preprocessing, shared by training and serving.

One definition of "a photo as the model sees it": decode (JPEG, PNG, ... with EXIF
orientation applied, any colour mode flattened to RGB), resize to a square of `img_size`,
then normalise with the ImageNet statistics. The predictor calls `decode_photo` on request
bodies; the training cache keeps each photo at its true aspect
(`decode_photo_true_shape`, same decoder) so crops come from the photo as it was, and
validation warps the whole cached photo to the same square, so training and serving
cannot disagree about orientation or colour handling. Decoding needs Pillow and numpy only,
so the offline `species-classify` uses the same decoder without torch installed.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A 500 px iNaturalist photo has 0.25 MP. Anything above this is refused from its header,
# before a single pixel is decoded: a decompression bomb must not take a worker's memory.
MAX_PIXELS = 64_000_000

_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 turn the photo a quarter: its width and height swap when upright.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class PhotoError(ValueError):
    """A photo that cannot be used, with the reason in words a person can act on."""


def decode_photo(source: bytes | str | os.PathLike, img_size: int) -> np.ndarray:
    """Decode a photo (bytes or a path) into an `img_size` x `img_size` x 3 uint8 RGB array."""
    image, _ = _open_rgb(source, (img_size, img_size))
    return np.asarray(image.resize((img_size, img_size), Image.BILINEAR))


def decode_photo_true_shape(
    source: bytes | str | os.PathLike, short_side: int, long_side: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a photo at its own aspect, shrunk (never enlarged) to fit `short_side` on its
    short side and `long_side` on its long side.

    Returns the (height, width, 3) uint8 RGB pixels and the photo's true (height, width)
    after EXIF orientation: the size a crop of the original photo is drawn from.
    """
    image, (height, width) = _open_rgb(source, (short_side, short_side))
    scale = min(1.0, short_side / min(height, width), long_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image), (height, width)


def _open_rgb(
    source: bytes | str | os.PathLike, draft_size: tuple[int, int]
) -> tuple[Image.Image, tuple[int, int]]:
    """The photo as 8-bit RGB, upright, decoded at no less than `draft_size` where the
    format allows a cheaper reduced decode; and its full (height, width) when upright."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as error:
        raise PhotoError(f"cannot open: {error.strerror or error}") from None
    with stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise PhotoError(
                        f"{width}x{height} pixels is over the {MAX_PIXELS // 1_000_000} MP "
                        "limit; resize the photo before sending it"
                    )
                if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
                if image.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers
                    # draft_size: most of the decode time of a large JPEG, saved for free.
                    image.draft("RGB", draft_size)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image), (height, width)
        except PhotoError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise PhotoError(f"refused as a decompression bomb: {error}") from None
        except Image.UnidentifiedImageError:
            raise PhotoError("not an image format Pillow can read (JPEG, PNG, ...)") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise PhotoError(f"corrupt or truncated image data: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any colour mode to 8-bit RGB: 16-bit scaled down, transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own conversion clips 16-bit values at 255; scale them instead.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def normalize(
    batch: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 NHWC (or float 0-255 NCHW) pixels -> normalised float32 NCHW, channels_last."""
    import torch  # imported here: decoding alone must work without torch (species-classify)

    if batch.dtype == torch.uint8:
        batch = batch.permute(0, 3, 1, 2).float()
    mean_t, std_t = normalization_constants(tuple(mean), tuple(std), batch.device)
    return ((batch - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


@functools.cache
def normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's (1, C, 1, 1) constants in 0-255 units, made once per device: built on
    every batch, each would be a copy to the GPU that waits for everything queued before it."""
    import torch

    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    return mean_t, std_t
