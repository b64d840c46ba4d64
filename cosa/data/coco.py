"""COCO 2014 as VOC-style masks with 81 ids (the reference's / ToCo's conversion).

```
ROOT/JPEGImages/train2014/COCO_train2014_000000000009.jpg
ROOT/JPEGImages/val2014/COCO_val2014_000000000042.jpg
ROOT/SegmentationClass/train2014/COCO_train2014_000000000009.png   ids 0..80, 255 = ignore
ROOT/SegmentationClass/val2014/COCO_val2014_000000000042.png
ROOT/ImageSets/Segmentation/{train,val,val_part}.txt               the reference's lists, one name
                                                                   a line
ROOT/cls_labels_onehot.npy                                         optional: dict name -> 80-vector
```
The reference keeps its lists and `cls_labels_onehot.npy` in its code tree and picks the sub-folder
from the training stage; here both live in ROOT and the sub-folder comes from the name's prefix
(`COCO_train2014_` -> `train2014/`, `COCO_val2014_` -> `val2014/`), so any list may mix them.
"""

from __future__ import annotations

from pathlib import Path

from cosa.data.classes import COCO_CLASSES, voc_palette
from cosa.data.index import (
    LABELS_FILENAME,
    SPLIT_DIR,
    DatasetIndex,
    build_samples,
    read_split_list,
)
from cosa.errors import DataError

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
SUBSETS = ("train2014", "val2014")


def subset_of(name: str) -> str:
    """The 2014 sub-folder of a COCO image name, from its `COCO_<subset>_` prefix.

    Raises:
        DataError: the name has neither prefix.
    """
    for subset in SUBSETS:
        if name.startswith(f"COCO_{subset}_"):
            return subset
    raise DataError(
        f"COCO image name {name!r} starts with neither 'COCO_train2014_' nor "
        "'COCO_val2014_'; list file names as in the official release "
        "(e.g. COCO_val2014_000000000042)"
    )


def open_coco(root: Path, split: str) -> DatasetIndex:
    """Open one split of a COCO 2014 folder in the layout above.

    Raises:
        DataError: missing split list, a name without a 2014 prefix, missing image, bad or missing
            labels (see `build_samples`).
    """
    names = read_split_list(root, split)
    split_desc = str(root / SPLIT_DIR / f"{split}.txt")
    for name in names:  # fail on a bad name before touching any file
        subset_of(name)
    labels = root / LABELS_FILENAME
    samples = build_samples(
        names,
        image_path=lambda name: root / IMAGE_DIR / subset_of(name) / f"{name}.jpg",
        mask_paths=lambda name: [root / MASK_DIR / subset_of(name) / f"{name}.png"],
        label_table_path=labels if labels.is_file() else None,
        num_foreground=len(COCO_CLASSES) - 1,
        split_desc=split_desc,
    )
    palette = tuple((int(r), int(g), int(b)) for r, g, b in voc_palette(len(COCO_CLASSES)))
    return DatasetIndex(
        root=root,
        kind="coco",
        split=split,
        class_names=COCO_CLASSES,
        palette=palette,
        samples=samples,
    )
