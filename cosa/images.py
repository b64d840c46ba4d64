"""The one image decoder: any supported file to uint8 RGB at its displayed size, or a clear error.

Training, evaluation, calibration, `cosa segment` and `cosa stream` all read images through
`load_image`, so one file gives one array whatever path it takes.

Policy (what is done to each kind of image, so that nothing is changed silently):
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`): the array has the size and
  orientation the image is displayed at. `orient_mask` turns a mask the same way, so a dataset's
  image and mask turn together (`cosa.data.image_io.read_image_and_mask`).
- Grayscale ("L"), 1-bit ("1"), palette ("P"), CMYK, YCbCr: converted to RGB by Pillow. CMYK uses
  Pillow's plain conversion (embedded ICC profiles are not applied).
- Alpha (RGBA, LA, PA, palette with transparency): composited onto black, i.e. each colour is
  multiplied by its opacity. Fully transparent pixels become black whatever colour they hid, so
  hidden colours never reach the model.
- 16-bit grayscale ("I;16*"): scaled to 8 bit by round(v * 255 / 65535). 16-bit RGB files are
  reduced to 8 bit by Pillow itself when opened. 32-bit integer ("I") is read as 16-bit data and
  refused if a value lies outside 0-65535; floating point ("F") is refused (its range is unknown).
- Multi-frame files (TIFF pages, animated WebP, MPO): the first frame.
- Decompression bombs: more pixels than `PIL.Image.MAX_IMAGE_PIXELS` (Pillow's limit, about 89.5 M
  by default) is refused before decoding. Very small (1x1) and very elongated images are fine.

Only the formats of `SUPPORTED_SUFFIXES` are decoded, whatever the file's name says: Pillow
identifies the format from the content, and is restricted to `PIL_FORMATS` so that a renamed file
cannot reach a rarely used decoder.

The decoding itself is `cosa.image_decode.decode_image` (numpy and Pillow only), which the Triton
ensemble's pre-processing model ships and runs too; this module adds the file checks and names the
file in every error.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from cosa.errors import InputError
from cosa.image_decode import EMPTY_REASON, PIL_FORMATS, DecodeError, decode_image

__all__ = [
    "PIL_FORMATS",
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "encode_palette_png",
    "is_image_name",
    "load_image",
    "load_image_and_orientation",
    "orient_mask",
    "palette_image",
    "voc_palette",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
)
"""Lower-case file suffixes taken as images (compare with `path.suffix.lower()`)."""


def is_image_name(name: str) -> bool:
    """True when `name` ends with a supported image suffix, in any case (`a.JPG`, `b.TiFf`)."""
    return Path(name).suffix.lower() in SUPPORTED_SUFFIXES


class ImageReadError(InputError):
    """An image file cannot be decoded. `reason` is the message without the path."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


EXIF_ORIENTATION = 0x0112
"""The EXIF tag whose value (1-8) says how the stored pixels are turned for display."""

# What `ImageOps.exif_transpose` does to the stored pixels for each orientation value (1: nothing),
# and the transposition that undoes it (5 and 7 are their own inverse, 6 and 8 each other's).
_TURN = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_UNDO = {
    **_TURN,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""Orientations that swap width and height."""


def orient_mask(mask: np.ndarray, orientation: int, undo: bool = False) -> np.ndarray:
    """Turn a (H, W) label array as `load_image` turns the image of that EXIF `orientation`.

    Args:
        mask: uint8 (H, W) ids in the image file's stored pixel grid (or, with `undo`, as
            displayed).
        orientation: the EXIF orientation value of the image (1-8; anything else is 1).
        undo: apply the inverse, from the displayed grid back to the stored one.

    Returns:
        uint8 (H', W') ids, C-contiguous; values are moved, never interpolated.
    """
    method = (_UNDO if undo else _TURN).get(orientation)
    if method is None:
        return mask
    return np.ascontiguousarray(np.asarray(Image.fromarray(mask).transpose(method)))


def load_image(path: Path | str) -> np.ndarray:
    """Decode an image file to RGB at its displayed size (see the module docstring for the policy).

    Same as `load_image_and_orientation(path)[0]`.
    """
    return load_image_and_orientation(path)[0]


def load_image_and_orientation(path: Path | str) -> tuple[np.ndarray, int]:
    """Decode an image file to RGB at its displayed size (see the module docstring for the policy).

    Args:
        path: an image file (JPEG, PNG, BMP, WebP or TIFF content, whatever its suffix).

    Returns:
        uint8 array (H, W, 3), RGB, 0-255, C-contiguous; H, W as displayed (EXIF orientation
        applied); and the file's EXIF orientation value (1 when it has none), for `orient_mask`.

    Raises:
        ImageReadError: (an `InputError`) missing file, dangling symlink, folder, permission denied,
            empty, not an image, truncated or corrupt, unsupported colour mode, or more pixels than
            Pillow's decompression-bomb limit. The message names the file and the reason.
    """
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            rgb = decode_image(fh)
            fh.seek(0)
            return rgb, _exif_orientation(fh)
    except DecodeError as exc:
        raise ImageReadError(path, exc.reason) from exc
    except PermissionError as exc:
        raise ImageReadError(path, "permission denied; make the file readable") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(path, "is a folder, not an image file") from exc
    except OSError as exc:  # reading failed below Pillow (I/O error, file vanished)
        raise ImageReadError(path, f"cannot read ({exc.strerror or exc})") from exc


def _exif_orientation(fh: io.BufferedReader) -> int:
    """The EXIF orientation value (1-8) of an image `decode_image` accepted; 1 when it has none.

    Read beside the decoder (headers only) so that `cosa.image_decode` stays free of it."""
    with Image.open(fh, formats=PIL_FORMATS) as image:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    return value if value in _TURN else 1


def _check_file(path: Path) -> None:
    """Name the common non-image cases before Pillow turns them into vaguer errors."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError as exc:
        if path.is_symlink():
            target = os.readlink(path)
            reason = f"dangling symlink (target {target} does not exist)"
            raise ImageReadError(path, reason) from exc
        raise ImageReadError(path, "no such file") from exc
    except PermissionError as exc:
        raise ImageReadError(path, "permission denied; make the folder readable") from exc
    except OSError as exc:  # symlink loops, name too long, ...
        raise ImageReadError(path, f"cannot access ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or stream forever instead of failing.
        raise ImageReadError(path, "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        raise ImageReadError(path, EMPTY_REASON)


def palette_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Wrap an id mask as a palette ("P") image.

    Args:
        mask: uint8 (H, W) ids.
        palette: uint8 (n, 3) colours, n <= 256; missing entries are black.

    Returns:
        A PIL image in mode "P" whose pixel values are the ids of `mask`.
    """
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode "L"
    img.putpalette(flat.ravel().tolist())  # "L" + palette -> "P", ids unchanged
    return img


def encode_palette_png(mask: np.ndarray, palette: np.ndarray, compress_level: int = 6) -> bytes:
    """A palette PNG of an id mask, encoded in memory (write it with `cosa.files`).

    Args:
        mask: uint8 (H, W) ids.
        palette: uint8 (n, 3) colours, n <= 256.
        compress_level: zlib level 0-9 (1 is about 2.5x faster to encode than 6, files ~1.5x
            larger).
    """
    encoded = io.BytesIO()
    palette_image(mask, palette).save(encoded, format="PNG", compress_level=compress_level)
    return encoded.getvalue()


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of each id spread over the high bits of R, G and B.

    The default palette of masks (datasets without their own colours, a Triton model without an
    export folder).

    Args:
        n: number of entries, 1..256. Entry 255 (the ignore id) is (224, 224, 192).

    Returns:
        uint8 array (n, 3); entry 0 is black, entry 1 (128, 0, 0), entry 2 (0, 128, 0), ...

    Raises:
        ValueError: `n` outside 1..256 (a programming error, not a user input).
    """
    if not 1 <= n <= 256:
        raise ValueError(f"voc_palette: n must be in 1..256, got {n}")
    ids = np.arange(n, dtype=np.int64)
    palette = np.zeros((n, 3), dtype=np.int64)
    for triple in range(8):  # id bit 3*triple + channel becomes bit 7 - triple of that channel
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * triple + channel)) & 1) << (7 - triple)
    return palette.astype(np.uint8)
