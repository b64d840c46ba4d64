"""Class names and the colour palette of the supported datasets.

Index 0 is always ``background``; mask id ``IGNORE_INDEX`` (255, `cosa.choices`) means "ignore" (VOC
object boundaries, padding). The VOC colour map is `cosa.images.voc_palette`, re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cosa.choices import IGNORE_INDEX as IGNORE_INDEX  # declared once, for every layer
from cosa.errors import DataError
from cosa.images import voc_palette as voc_palette  # declared once, for every layer

# fmt: off
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
"""The 21 PASCAL VOC 2012 classes (background + 20), in mask-id order."""

COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# fmt: on
"""The 81 COCO 2014 ids of the VOC-style masks (background + the 80 "things" in category order)."""

CLASSES_FILENAME = "classes.json"
"""Class list of a dataset with its own classes (the synthetic set): names and palette."""


def read_classes_file(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Read a `classes.json`.

    Args:
        path: JSON {"names": ["background", ...], "palette": [[r, g, b], ...]}, one colour per name,
            at most 255 names (id 255 is reserved for "ignore").

    Returns:
        (names incl. background, palette as (r, g, b) tuples).

    Raises:
        DataError: unreadable JSON, missing keys, fewer than 2 names, first name not "background",
            duplicate names, or a palette of the wrong length or with values outside 0..255.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); fix or regenerate it") from exc
    names = data.get("names") if isinstance(data, dict) else None
    palette = data.get("palette") if isinstance(data, dict) else None
    fix = 'expected {"names": ["background", ...], "palette": [[r, g, b], ...]}'
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: 'names' must be a list of strings; {fix}")
    if not 2 <= len(names) <= IGNORE_INDEX or names[0] != "background":
        raise DataError(
            f"{path}: 'names' must start with 'background' and hold 2..255 names "
            f"(got {len(names)}, first {names[:1]}); {fix}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names must be unique; {fix}")
    if not (
        isinstance(palette, list)
        and len(palette) == len(names)
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
    ):
        raise DataError(
            f"{path}: 'palette' must hold one [r, g, b] (ints 0..255) per name "
            f"({len(names)}); {fix}"
        )
    return tuple(names), tuple((c[0], c[1], c[2]) for c in palette)


def classes_file_text(names: tuple[str, ...], palette: np.ndarray) -> str:
    """The `classes.json` text for `names` and a uint8 (len(names), 3) palette (stable bytes)."""
    body = {"names": list(names), "palette": [[int(v) for v in c] for c in palette]}
    return json.dumps(body, indent=1) + "\n"
