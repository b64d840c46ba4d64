"""Reading dataset images and masks from disk.

Images go through the one decoder (`cosa.images.load_image`: EXIF orientation applied, so a phone
photo stored sideways comes back upright); masks are returned as raw ids, never through the
palette.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cosa.errors import DataError
from cosa.images import ImageReadError, load_image

MASK_MODES = ("P", "L")
"""PIL modes accepted for masks: palette (VOC) and 8-bit grey (COCO conversions often use it)."""


def read_rgb(path: Path) -> Image.Image:
    """Open a dataset image as RGB through the one decoder (`cosa.images.load_image`).

    The same pixels `cosa segment` sees: EXIF orientation applied, alpha composited onto black,
    16-bit scaled to 8 bit (see `cosa.images` for the whole policy).

    Returns:
        A PIL image in mode "RGB" at the displayed size.

    Raises:
        DataError: the file is missing or not a readable image (the message names it).
    """
    try:
        return Image.fromarray(load_image(path))
    except ImageReadError as exc:
        raise DataError(
            f"image {exc.path} cannot be read: {exc.reason}; replace the file or remove it "
            "from the dataset"
        ) from exc


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
