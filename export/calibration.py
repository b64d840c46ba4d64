"""The INT8 calibration set: representative images read from a folder, kept as `calib.npz`.

Images are found recursively, drawn in a seeded random order (so a folder sorted by class does not
give a calibration set of one class), read with EXIF orientation applied, and fitted to one fixed
size (the optimization profile's opt H x W): scaled to cover it, then centre-cropped, so objects
keep their proportions. Unreadable files are skipped with a warning; fewer readable images than
`MIN_CALIBRATION_IMAGES` is an error, never a silent fallback to other data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cosa.data import read_rgb
from cosa.errors import DataError, ExportError
from cosa.export.layout import FILES, Role
from cosa.files import atomic_path

logger = logging.getLogger(__name__)

CALIB_FILENAME = FILES[Role.CALIBRATION]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_CALIBRATION_IMAGES = 8
"""Below this, activation ranges are estimated from too few samples to trust."""
DEFAULT_CALIBRATION_IMAGES = 256
"""Default `--calib-size`: a few hundred images is the usual range (DEPLOYMENT.md: ~512 common)."""


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images at one fixed size.

    Attributes:
        images: (N, 3, H, W) uint8 RGB, exactly what the deploy graph receives (as float32 0-255).
        files: N paths relative to the calibration folder (POSIX separators), in `images` order.
        skipped: paths (relative) of files that could not be read.
    """

    images: np.ndarray
    files: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def sha256(self) -> str:
        """Content hash of the image tensor (shape and pixels), independent of file names."""
        digest = hashlib.sha256(repr(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Float32 (b, 3, H, W) batches in [0, 255], b <= batch_size, in order."""
        for start in range(0, self.count, batch_size):
            yield self.images[start : start + batch_size].astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """The image part of spec.json `calibration` (the quantizer adds method and exclusions)."""
        return {
            "count": self.count,
            "size": list(self.size),
            "sha256": self.sha256(),
            "skipped": len(self.skipped),
            "file": CALIB_FILENAME,
        }


def find_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, by suffix, case-insensitive), sorted.

    Raises:
        ExportError: `root` is not a folder, or holds no image files.
    """
    if not root.is_dir():
        raise ExportError(
            f"--calib {root} is not a folder; pass a folder of representative images "
            "(a few hundred, like the ones the model will see)"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ExportError(
            f"--calib {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
            "representative images"
        )
    return files


def load_calibration_set(
    root: Path,
    size: tuple[int, int],
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
    min_images: int = MIN_CALIBRATION_IMAGES,
    seed: int = 0,
) -> CalibrationSet:
    """Read up to `max_images` readable images from `root` and fit them to `size`.

    Args:
        root: folder searched recursively.
        size: (H, W) every image is fitted to (cover + centre crop, bilinear).
        max_images: at most this many images are used (`--calib-size`).
        min_images: fewer readable images than this is an error.
        seed: order in which files are drawn (the same folder gives the same set).

    Returns:
        The calibration set; `skipped` lists the unreadable files met while drawing.

    Raises:
        ExportError: not a folder, no images, or fewer than `min_images` readable ones.
    """
    if max_images < min_images:
        raise ExportError(
            f"--calib-size {max_images} is below the minimum of {min_images} calibration images"
        )
    files = find_images(root)
    order = np.random.default_rng(seed).permutation(len(files))
    height, width = size
    images: list[np.ndarray] = []
    used: list[str] = []
    skipped: list[str] = []
    for index in order:
        if len(images) == max_images:
            break
        path = files[int(index)]
        rel = path.relative_to(root).as_posix()
        try:
            rgb = read_rgb(path)
        except DataError as exc:
            logger.warning("skipping calibration image %s: %s", path, exc)
            skipped.append(rel)
            continue
        fitted = ImageOps.fit(rgb, (width, height), method=Image.Resampling.BILINEAR)
        images.append(np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)
        used.append(rel)
    if len(images) < min_images:
        raise ExportError(
            f"--calib {root}: only {len(images)} readable images ({len(skipped)} unreadable "
            f"skipped); INT8 calibration needs at least {min_images}. Add representative images"
        )
    logger.info(
        "calibration set: %d images from %s at %dx%d (%d unreadable skipped)",
        len(images),
        root,
        height,
        width,
        len(skipped),
    )
    return CalibrationSet(images=np.stack(images), files=tuple(used), skipped=tuple(skipped))


def save_calibration_set(calib: CalibrationSet, path: Path) -> Path:
    """Write `images` (uint8 N x 3 x H x W), `files` and `skipped` to `path` (.npz) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            images=calib.images,
            files=np.array(calib.files, dtype=np.str_),
            skipped=np.array(calib.skipped, dtype=np.str_),
        )
    return path


def read_calibration_set(path: Path) -> CalibrationSet:
    """Read a `calib.npz` written by `save_calibration_set`.

    Raises:
        ExportError: missing file or not a calibration archive.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
            files = tuple(str(f) for f in data["files"])
            skipped = tuple(str(f) for f in data["skipped"])
    except (OSError, KeyError, ValueError) as exc:
        raise ExportError(f"{path} is not a calibration archive ({exc}); re-export") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ExportError(
            f"{path}: images are {images.dtype} {images.shape}, expected uint8 Nx3xHxW; re-export"
        )
    return CalibrationSet(images=images, files=files, skipped=skipped)
