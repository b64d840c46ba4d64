"""Reading images and masks from disk, and writing palette masks.

Images are returned as RGB with the EXIF orientation applied (a phone photo stored sideways comes
back upright); masks are returned as raw ids, never through the palette.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cosa.errors import DataError

MASK_MODES = ("P", "L")
"""PIL modes accepted for masks: palette (VOC) and 8-bit grey (COCO conversions often use it)."""


def read_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, EXIF orientation applied.

    Args:
        path: any format Pillow reads (JPEG, PNG, ...); grey or CMYK images are converted.

    Returns:
        A loaded PIL image in mode "RGB".

    Raises:
        DataError: the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as img:
            upright = ImageOps.exif_transpose(img)
            return upright.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image {path} does not exist; check the dataset folder") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image {path} cannot be read ({exc}); replace or remove it") from exc


def read_mask(path: Path) -> np.ndarray:
    """Read a class-id mask.

    Args:
        path: a PNG in palette ("P") or grey ("L") mode whose pixel values are class ids
            (255 = ignore).

    Returns:
        uint8 array (H, W) of ids.

    Raises:
        DataError: the file is missing, unreadable, or an RGB(A) colour image (colours are not ids).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                raise DataError(
                    f"mask {path} has mode {img.mode!r}; masks must be palette (P) or grey (L) "
                    "PNGs whose pixel values are class ids (convert colour masks to ids first)"
                )
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"mask {path} does not exist; check the dataset folder") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"mask {path} cannot be read ({exc}); replace or remove it") from exc


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
