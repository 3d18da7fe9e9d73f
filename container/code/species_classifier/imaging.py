"""Photo decoding and the model's input preprocessing, shared by training and serving.

One definition of "a photo as the model sees it": decode (JPEG, PNG, ... with EXIF
orientation applied, any colour mode flattened to RGB), resize to a square of `img_size`,
then normalise with the ImageNet statistics. The training cache stores the uint8 result of
`decode_photo`; the predictor calls the same function on request bodies, so training and
serving cannot disagree about size, interpolation or colour handling.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A 500 px iNaturalist photo has 0.25 MP. Anything above this is refused from its header,
# before a single pixel is decoded: a decompression bomb must not take a worker's memory.
MAX_PIXELS = 64_000_000


class PhotoError(ValueError):
    """A photo that cannot be used, with the reason in words a person can act on."""


def decode_photo(source: bytes | str | os.PathLike, img_size: int) -> np.ndarray:
    """Decode a photo (bytes or a path) into an `img_size` x `img_size` x 3 uint8 RGB array."""
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
                if image.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers
                    # img_size: most of the decode time of a large JPEG, saved for free.
                    image.draft("RGB", (img_size, img_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb(image)
                return np.asarray(rgb.resize((img_size, img_size), Image.BILINEAR))
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
    if batch.dtype == torch.uint8:
        batch = batch.permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=batch.device).view(1, -1, 1, 1) * 255.0
    return ((batch - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
