"""`open_dataset`: detect a folder's layout and open one split of it.

Detection, first match wins:
1. `classes.json` in the folder: the synthetic set (VOC layout with its own classes).
2. `JPEGImages/train2014/` or `JPEGImages/val2014/`: COCO 2014 as VOC-style masks
   (`cosa.data.coco`).
3. `JPEGImages/` and `ImageSets/Segmentation/`: PASCAL VOC 2012, with or without SBD's
   `SegmentationClassAug/` and `train_aug` list (`cosa.data.voc`).
4. `images/`, `labels.csv` or `labels.jsonl`: a user's own tagged photos (`cosa.data.tagged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cosa.data.classes import CLASSES_FILENAME, read_classes_file
from cosa.data.coco import IMAGE_DIR as COCO_IMAGE_DIR
from cosa.data.coco import SUBSETS as COCO_SUBSETS
from cosa.data.coco import open_coco
from cosa.data.index import SPLIT_DIR, DatasetIndex, DatasetKind
from cosa.data.tagged import (
    CSV_FILENAME,
    DEFAULT_VAL_FRACTION,
    IMAGES_DIR,
    JSONL_FILENAME,
    is_tagged_folder,
    open_tagged,
)
from cosa.data.voc import IMAGE_DIR as VOC_IMAGE_DIR
from cosa.data.voc import open_voc
from cosa.errors import DataError


def detect_layout(root: Path) -> DatasetKind:
    """Which layout `root` holds ("synth", "coco", "voc" or "tagged").

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
    if is_tagged_folder(root):
        return "tagged"
    hint = ""
    nested = sorted(p for p in root.glob("*/JPEGImages") if p.is_dir())
    if nested:
        hint = f" (did you mean {nested[0].parent}?)"
    raise DataError(
        f"{root} is not a dataset folder{hint}: expected {CLASSES_FILENAME} (synthetic set), "
        f"{COCO_IMAGE_DIR}/train2014 or {COCO_IMAGE_DIR}/val2014 (COCO 2014), or "
        f"{VOC_IMAGE_DIR}/ with {SPLIT_DIR}/ (VOC 2012), or {IMAGES_DIR}/ with {CSV_FILENAME} "
        f"or {JSONL_FILENAME} (your own tagged photos; see the README's 'Train on your own "
        "images'); run `cosa data synth DIR` to make a synthetic one"
    )


def open_dataset(
    root: Path,
    split: str,
    class_names: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> DatasetIndex:
    """Open split `split` of the dataset in `root`, whatever its layout.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        split: a list name under `ImageSets/Segmentation/` ("train", "train_aug", "val", ...), or
            "train" / "val" / "test" of a tagged folder.
        class_names: the class list incl. background a trained model uses. A tagged folder's ids
            follow it; any other layout must have exactly these classes.
        val_fraction, split_seed: a tagged folder's seeded validation split (used when its labels
            have no split column).

    Returns:
        The split's index: class names, palette and one `Sample` per listed image.

    Raises:
        DataError: unknown layout, missing split list, a listed image missing, a label vector of the
            wrong length, a label missing, a bad `classes.json`, a tagged folder with errors, or
            classes that differ from `class_names`.
    """
    root = Path(root)
    kind = detect_layout(root)
    if kind == "tagged":
        return open_tagged(root, split, class_names, val_fraction, split_seed)
    if kind == "synth":
        names, palette = read_classes_file(root / CLASSES_FILENAME)
        index = open_voc(root, split, class_names=names, palette=palette, kind="synth")
    elif kind == "coco":
        index = open_coco(root, split)
    else:
        index = open_voc(root, split)
    if class_names is not None and tuple(class_names) != index.class_names:
        raise DataError(
            f"the model predicts {len(class_names)} classes ({', '.join(class_names[:4])}, ...) "
            f"but {root} has {len(index.class_names)} "
            f"({', '.join(index.class_names[:4])}, ...); use the dataset the model was trained on"
        )
    return index
