"""`open_dataset`: detect a folder's layout and open one split of it.

Detection, first match wins:
1. `classes.json` in the folder: the synthetic set (VOC layout with its own classes).
2. `JPEGImages/train2014/` or `JPEGImages/val2014/`: COCO 2014 as VOC-style masks
   (`cosa.data.coco`).
3. `JPEGImages/` and `ImageSets/Segmentation/`: PASCAL VOC 2012, with or without SBD's
   `SegmentationClassAug/` and `train_aug` list (`cosa.data.voc`).
"""

from __future__ import annotations

from pathlib import Path

from cosa.data.classes import CLASSES_FILENAME, read_classes_file
from cosa.data.coco import IMAGE_DIR as COCO_IMAGE_DIR
from cosa.data.coco import SUBSETS as COCO_SUBSETS
from cosa.data.coco import open_coco
from cosa.data.index import SPLIT_DIR, DatasetIndex, DatasetKind
from cosa.data.voc import IMAGE_DIR as VOC_IMAGE_DIR
from cosa.data.voc import open_voc
from cosa.errors import DataError


def detect_layout(root: Path) -> DatasetKind:
    """Which layout `root` holds ("synth", "coco" or "voc").

    Raises:
        DataError: `root` is not a folder or matches no layout; the message says what was looked for
            and points at a likely sub-folder (e.g. `VOCdevkit/VOC2012`).
    """
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    if (root / CLASSES_FILENAME).is_file():
        return "synth"
    if any((root / COCO_IMAGE_DIR / subset).is_dir() for subset in COCO_SUBSETS):
        return "coco"
    if (root / VOC_IMAGE_DIR).is_dir() and (root / SPLIT_DIR).is_dir():
        return "voc"
    hint = ""
    nested = sorted(p for p in root.glob("*/JPEGImages") if p.is_dir())
    if nested:
        hint = f" (did you mean {nested[0].parent}?)"
    raise DataError(
        f"{root} is not a dataset folder{hint}: expected {CLASSES_FILENAME} (synthetic set), "
        f"{COCO_IMAGE_DIR}/train2014 or {COCO_IMAGE_DIR}/val2014 (COCO 2014), or "
        f"{VOC_IMAGE_DIR}/ with {SPLIT_DIR}/ (VOC 2012); run `cosa data synth DIR` to make a "
        "synthetic one"
    )


def open_dataset(root: Path, split: str) -> DatasetIndex:
    """Open split `split` of the dataset in `root`, whatever its layout.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        split: list name under `ImageSets/Segmentation/` ("train", "train_aug", "val", ...).

    Returns:
        The split's index: class names, palette and one `Sample` per listed image.

    Raises:
        DataError: unknown layout, missing split list, a listed image missing, a label vector of the
            wrong length, a label missing, a bad `classes.json`.
    """
    root = Path(root)
    kind = detect_layout(root)
    if kind == "synth":
        names, palette = read_classes_file(root / CLASSES_FILENAME)
        return open_voc(root, split, class_names=names, palette=palette, kind="synth")
    if kind == "coco":
        return open_coco(root, split)
    return open_voc(root, split)
