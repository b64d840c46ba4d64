"""Decoding policy of `cosa.images`: encoded image -> uint8 RGB, or a reason it cannot be.

The policy (EXIF orientation, alpha, palette, grey, CMYK, 16-bit, bombs) is described once, in the
docstring of `cosa.images`, whose `load_image` is the door every path of the library uses. This
module holds the part of it that needs no file system and nothing from cosa, only numpy and
Pillow, so that the Triton ensemble's pre-processing model runs the very same code: the repository
writer (`cosa.serving.triton_repo`) copies this file beside that model. It must therefore import
nothing from the project (tests/test_layers.py checks it).

Errors are `DecodeError(reason)`; callers add the file's name (`cosa.images.ImageReadError`, or
the ensemble's "cannot decode image i of the request: reason").
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "EMPTY_REASON",
    "PIL_FORMATS",
    "DecodeError",
    "check_pixels",
    "decode_image",
    "pil_to_rgb",
]

# Pillow format ids of the supported suffixes ("JPEG" also opens MPO, the multi-picture JPEG of
# cameras); a renamed file cannot reach a rarely used decoder.
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "TIFF")

EMPTY_REASON = "empty file (0 bytes)"

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class DecodeError(ValueError):
    """The data is not a decodable image; `reason` says why, without naming the file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(source: bytes | BinaryIO) -> np.ndarray:
    """Decode an encoded image (file object or bytes) to RGB at its displayed size.

    Returns:
        uint8 array (H, W, 3), RGB, 0-255, C-contiguous; EXIF orientation applied.

    Raises:
        DecodeError: empty, not an image of `PIL_FORMATS`, truncated or corrupt, unsupported
            colour mode, or more pixels than Pillow's decompression-bomb limit.
        OSError: reading the file object failed (permission, I/O): the caller names the file.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise DecodeError(EMPTY_REASON)
        source = io.BytesIO(source)
    try:
        decoded = Image.open(source, formats=PIL_FORMATS)
        check_pixels(decoded.size)
        decoded.load()
        return pil_to_rgb(ImageOps.exif_transpose(decoded))
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image (content is not JPEG, PNG, BMP, WebP or TIFF)") from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused as a decompression bomb ({exc})") from exc
    except (PermissionError, IsADirectoryError):
        raise  # the caller's file, not the data: it says which
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated"),
        # SyntaxError (bad headers in some plugins), ValueError or struct.error (short headers).
        raise DecodeError(f"truncated or corrupt image data ({exc})") from exc


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any supported mode to uint8 RGB.

    Args:
        img: a loaded Pillow image (orientation already applied).

    Returns:
        uint8 array (H, W, 3), RGB, C-contiguous.

    Raises:
        DecodeError: floating-point images, 32-bit values outside 0-65535, or a mode Pillow
            cannot convert to RGB.
    """
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)  # (H, W, 4); uint16 avoids overflow
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # composite onto black, rounded
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        data = np.asarray(img)
        if mode == "I" and data.size and (data.min() < 0 or data.max() > 65535):
            raise DecodeError(
                f"32-bit integer image with values {data.min()}..{data.max()} outside 0-65535; "
                "convert it to 8 or 16 bit"
            )
        gray = (data.astype(np.uint32) * 255 + 32767) // 65535  # round(v * 255 / 65535)
        return np.ascontiguousarray(np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2))
    if mode == "F":
        raise DecodeError(
            "floating-point image (mode F) has no defined range; convert it to 8 or 16 bit"
        )
    try:
        rgb_img = img if mode == "RGB" else img.convert("RGB")
    except ValueError as exc:
        raise DecodeError(f"colour mode {mode} cannot be converted to RGB") from exc
    return np.ascontiguousarray(np.asarray(rgb_img, dtype=np.uint8))


def check_pixels(size: tuple[int, int]) -> None:
    """Refuse images above Pillow's decompression-bomb limit, read at call time.

    Pillow itself only warns between 1x and 2x its limit and raises above 2x; one threshold is
    clearer. Setting `PIL.Image.MAX_IMAGE_PIXELS = None` disables the check, as in Pillow.

    Raises:
        DecodeError: width x height above the limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        raise DecodeError(
            f"{width}x{height} = {width * height} pixels is above the decompression-bomb limit of "
            f"{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); downscale the image"
        )
