"""Reading dataset images and masks from disk.

Images go through the one decoder (`cosa.images.load_image`: EXIF orientation applied, so a phone
photo stored sideways comes back upright); masks are returned as raw ids, never through the
palette.

A mask turns with its image (`read_image_and_mask`): it is taken to be drawn on the image file's
stored pixels, as VOC's and COCO's are and as `cosa pseudo` writes them, and gets the image's EXIF
orientation. One exception, where the size shows it: under a tag that swaps width and height, a
mask that already has the displayed size (not the stored one) is used as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cosa.errors import DataError
from cosa.images import (
    SWAPPING_ORIENTATIONS,
    ImageReadError,
    load_image_and_orientation,
    orient_mask,
)

MASK_MODES = ("P", "L")
"""PIL modes accepted for masks: palette (VOC) and 8-bit grey (COCO conversions often use it)."""


def read_rgb_and_orientation(path: Path) -> tuple[np.ndarray, int]:
    """`read_rgb` as a uint8 (H, W, 3) array, with the file's EXIF orientation (1-8).

    Raises:
        DataError: the file is missing or not a readable image (the message names it).
    """
    try:
        return load_image_and_orientation(path)
    except ImageReadError as exc:
        raise DataError(
            f"image {exc.path} cannot be read: {exc.reason}; replace the file or remove it "
            "from the dataset"
        ) from exc


def mask_as_displayed(
    mask: np.ndarray, orientation: int, displayed: tuple[int, int]
) -> np.ndarray | None:
    """The mask in its image's displayed grid (module docstring), or None when it cannot fit.

    Args:
        mask: uint8 (h, w) ids as read from the file.
        orientation: the image's EXIF orientation (1-8).
        displayed: the image's (H, W) as displayed (`load_image`'s shape).
    """
    swaps = orientation in SWAPPING_ORIENTATIONS and displayed[0] != displayed[1]
    if swaps and mask.shape == displayed:
        return mask
    turned = orient_mask(mask, orientation)
    return turned if turned.shape == displayed else None


def read_image_and_mask(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image (uint8 (H, W, 3), as displayed) and its mask (uint8 (H, W)), turned together.

    Raises:
        DataError: either file is unreadable, or the mask fits the image neither as stored nor
            as displayed.
    """
    image, orientation = read_rgb_and_orientation(image_path)
    raw = read_mask(mask_path)
    mask = mask_as_displayed(raw, orientation, image.shape[:2])
    if mask is None:
        raise DataError(
            f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]} as displayed (EXIF orientation {orientation}); "
            "masks must match their images"
        )
    return image, mask


def read_rgb(path: Path) -> Image.Image:
    """Open a dataset image as RGB through the one decoder (`cosa.images.load_image`).

    The same pixels `cosa segment` sees: EXIF orientation applied, alpha composited onto black,
    16-bit scaled to 8 bit (see `cosa.images` for the whole policy).

    Returns:
        A PIL image in mode "RGB" at the displayed size.

    Raises:
        DataError: the file is missing or not a readable image (the message names it).
    """
    return Image.fromarray(read_rgb_and_orientation(path)[0])


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
