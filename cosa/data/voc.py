"""PASCAL VOC 2012 layout (also used by the synthetic set).

```
ROOT/JPEGImages/NAME.jpg
ROOT/SegmentationClassAug/NAME.png     optional: SBD-augmented masks (10,582 train_aug + val)
ROOT/SegmentationClass/NAME.png        official masks (2,913 names)
ROOT/ImageSets/Segmentation/{train,train_aug,val,...}.txt
ROOT/cls_labels_onehot.npy             optional: dict name -> (C,) float label (the reference's)
ROOT/classes.json                      synthetic set only: names and palette
```
A sample's mask is `SegmentationClassAug/NAME.png` when that file exists, else
`SegmentationClass/NAME.png`, else none (allowed when labels come from `cls_labels_onehot.npy`).
Labels come from `cls_labels_onehot.npy` when present, else from the masks.
"""

from __future__ import annotations

from pathlib import Path

from cosa.data.classes import VOC_CLASSES, voc_palette
from cosa.data.index import (
    LABELS_FILENAME,
    SPLIT_DIR,
    DatasetIndex,
    DatasetKind,
    build_samples,
    read_split_list,
)

IMAGE_DIR = "JPEGImages"
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")  # in order of preference


def open_voc(
    root: Path,
    split: str,
    class_names: tuple[str, ...] = VOC_CLASSES,
    palette: tuple[tuple[int, int, int], ...] | None = None,
    kind: DatasetKind = "voc",
) -> DatasetIndex:
    """Open one split of a VOC-layout folder.

    Args:
        root: the folder holding `JPEGImages/` (e.g. `VOCdevkit/VOC2012`).
        split: list name, e.g. "train_aug", "train", "val".
        class_names: incl. background; VOC's 21 unless the folder has its own `classes.json`.
        palette: one colour per class; the VOC colour map when None.
        kind: recorded in the index ("voc" or "synth").

    Raises:
        DataError: missing split list, missing image, bad or missing labels (see `build_samples`).
    """
    names = read_split_list(root, split)
    labels = root / LABELS_FILENAME
    samples = build_samples(
        names,
        image_path=lambda name: root / IMAGE_DIR / f"{name}.jpg",
        mask_paths=lambda name: [root / d / f"{name}.png" for d in MASK_DIRS],
        label_table_path=labels if labels.is_file() else None,
        num_foreground=len(class_names) - 1,
        split_desc=str(root / SPLIT_DIR / f"{split}.txt"),
    )
    if palette is None:
        palette = tuple((int(r), int(g), int(b)) for r, g, b in voc_palette(len(class_names)))
    return DatasetIndex(
        root=root,
        kind=kind,
        split=split,
        class_names=tuple(class_names),
        palette=palette,
        samples=samples,
    )
