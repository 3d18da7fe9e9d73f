"""Photos made on the fly for tests: every colour mode, EXIF orientation, and broken ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(size=(80, 60), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: shows which way a photo was turned."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = left
    pixels[:, size[0] // 2 :] = right
    return Image.fromarray(pixels)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(), "JPEG", exif=exif.tobytes(), quality=95)


def sixteen_bit_png(level: int = 65535) -> bytes:
    return encode(Image.fromarray(np.full((40, 40), level, dtype=np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95)


def transparent_png() -> bytes:
    return encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG")


def greyscale_jpeg() -> bytes:
    return encode(Image.new("L", (40, 40), 128), "JPEG")


def truncated_jpeg() -> bytes:
    data = encode(halves((400, 300)), "JPEG")
    return data[: len(data) // 2]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries no pixel data: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
