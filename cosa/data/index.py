"""The dataset index every format opens into: `Sample` and `DatasetIndex`, plus the shared helpers
that read split lists and image-level labels.

Label vectors have one entry per foreground class (C = len(class_names) - 1, background excluded),
float32 in {0, 1}, in mask-id order (entry i is mask id i + 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cosa.data.classes import IGNORE_INDEX
from cosa.data.image_io import read_mask
from cosa.errors import DataError

logger = logging.getLogger(__name__)

DatasetKind = Literal["voc", "coco", "synth", "tagged"]
SPLIT_DIR = Path("ImageSets") / "Segmentation"
LABELS_FILENAME = "cls_labels_onehot.npy"


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy labels with == is ambiguous
class Sample:
    """One image of a split.

    Attributes:
        name: the id in the split list (file stem), e.g. "2007_000032"; in a tagged folder the
            image's path relative to `images/`, e.g. "dogs/001.jpg".
        image_path: the image file.
        mask_path: the id mask (palette PNG), or None when the split has labels but no masks
            (e.g. VOC `train_aug` without `SegmentationClassAug/`).
        label: float32 (C,) image-level label, 1 where the foreground class is present (read-only).
    """

    name: str
    image_path: Path
    mask_path: Path | None
    label: np.ndarray


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """An opened split: where it is, its classes and its samples.

    Attributes:
        root: the dataset folder.
        kind: the detected layout.
        split: the split name (its list is `ImageSets/Segmentation/<split>.txt`; a tagged
            folder's splits are train, val and test).
        class_names: names incl. background at index 0; K = len(class_names).
        palette: one (r, g, b) per class id, 0..255.
        samples: in list-file order.
    """

    root: Path
    kind: DatasetKind
    split: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    samples: tuple[Sample, ...]

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes (the length of every label vector)."""
        return len(self.class_names) - 1

    @property
    def has_masks(self) -> bool:
        """True when every sample has a mask (required for evaluation)."""
        return all(s.mask_path is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def labels_from_mask(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Image-level label of a mask: which foreground ids occur in it.

    Args:
        mask: integer (H, W) ids; 0 (background) and 255 (ignore) do not count.
        num_foreground: C, the number of foreground classes (valid ids are 1..C).

    Returns:
        float32 (C,), entry i is 1.0 when id i + 1 occurs.

    Raises:
        DataError: the mask holds an id above C other than 255 (the caller adds the file name).
    """
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    counts[0] = 0
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[num_foreground + 1 :]) + num_foreground + 1
    if bad.size:
        raise DataError(
            f"mask holds class id(s) {bad.tolist()} but the dataset has only {num_foreground} "
            f"foreground classes (valid ids 1..{num_foreground}, 0 = background, 255 = ignore)"
        )
    return (counts[1 : num_foreground + 1] > 0).astype(np.float32)


def available_splits(root: Path) -> list[str]:
    """Names of the split lists under `root/ImageSets/Segmentation/` (sorted)."""
    folder = root / SPLIT_DIR
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def read_split_list(root: Path, split: str) -> list[str]:
    """Names listed in `root/ImageSets/Segmentation/<split>.txt`.

    A line is either a bare name (VOC, ToCo lists) or, as in the DeepLab/SBD `train_aug.txt`,
    "/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png": then the stem of the first path is the
    name. Blank lines are skipped.

    Raises:
        DataError: the list is missing (the message lists the splits that exist), empty, or names an
            image twice.
    """
    path = root / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        found = available_splits(root)
        listed = ", ".join(found) if found else "none"
        raise DataError(
            f"split list {path} does not exist (splits found: {listed}); pick one of those or "
            f"write {path.name} with one image name per line"
        )
    names: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        name = Path(tokens[0]).stem if "/" in tokens[0] or len(tokens) > 1 else tokens[0]
        if name in seen:
            raise DataError(f"{path}:{number}: {name!r} is listed twice; remove the duplicate line")
        seen.add(name)
        names.append(name)
    if not names:
        raise DataError(f"split list {path} is empty; list one image name per line")
    return names


def load_label_table(path: Path) -> dict[str, np.ndarray]:
    """Read `cls_labels_onehot.npy`: a pickled dict name -> (C,) vector (the reference's format).

    The file is a pickle (`allow_pickle=True`): only open files you trust.

    Raises:
        DataError: unreadable, or not a dict.
    """
    try:
        raw = np.load(path, allow_pickle=True)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path} cannot be read as a .npy file ({exc}); regenerate it or delete "
            "it to derive labels from the masks"
        ) from exc
    # np.save(dict) stores a 0-d object array wrapping the dict.
    table = raw.item() if isinstance(raw, np.ndarray) and raw.shape == () else None
    if not isinstance(table, dict):
        what = (
            f"a {raw.dtype} array of shape {raw.shape}"
            if isinstance(raw, np.ndarray)
            else (type(raw).__name__)
        )
        raise DataError(
            f"{path} holds {what}, expected a dict name -> label vector; "
            "regenerate it or delete it to derive labels from the masks"
        )
    return table


class _Listing:
    """Existence checks by directory listing: one `os.scandir` per folder instead of a stat per file
    (VOC train_aug has 10,582 images; COCO train 82,081)."""

    def __init__(self) -> None:
        self._folders: dict[Path, frozenset[str]] = {}

    def __contains__(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._folders:
            try:
                with os.scandir(folder) as entries:
                    self._folders[folder] = frozenset(e.name for e in entries)
            except (FileNotFoundError, NotADirectoryError):
                self._folders[folder] = frozenset()
        return path.name in self._folders[folder]


def build_samples(
    names: Iterable[str],
    image_path: Callable[[str], Path],
    mask_paths: Callable[[str], Iterable[Path]],
    label_table_path: Path | None,
    num_foreground: int,
    split_desc: str,
) -> tuple[Sample, ...]:
    """Resolve files and labels for every listed name.

    Args:
        names: names from the split list.
        image_path: name -> expected image path.
        mask_paths: name -> candidate mask paths, first existing one wins.
        label_table_path: `cls_labels_onehot.npy` to take labels from, or None to derive them from
            the masks.
        num_foreground: C.
        split_desc: the split list's path, for messages.

    Raises:
        DataError: a listed image is missing; a label vector has the wrong length or the name is not
            in the label table; a name has neither a label entry nor a mask; a mask holds ids > C.
    """
    listing = _Listing()
    table = load_label_table(label_table_path) if label_table_path is not None else None
    samples: list[Sample] = []
    for name in names:
        img = image_path(name)
        if img not in listing:
            raise DataError(
                f"{img} is listed in {split_desc} but does not exist; restore the "
                "image or remove its line from the list"
            )
        mask = next((p for p in mask_paths(name) if p in listing), None)
        if table is not None:
            label = _label_from_table(table, name, num_foreground, label_table_path)
        elif mask is not None:
            try:
                label = labels_from_mask(read_mask(mask), num_foreground)
            except DataError as exc:
                raise DataError(f"{mask}: {exc}") from exc
        else:
            candidates = ", ".join(str(p) for p in mask_paths(name))
            raise DataError(
                f"{name} (in {split_desc}) has no image-level label: no "
                f"{LABELS_FILENAME} and no mask ({candidates}); add either"
            )
        label.setflags(write=False)
        samples.append(Sample(name=name, image_path=img, mask_path=mask, label=label))
    if table is None:
        logger.info("derived image labels of %d images from their masks", len(samples))
    return tuple(samples)


def _label_from_table(
    table: dict[str, np.ndarray], name: str, num_foreground: int, path: Path | None
) -> np.ndarray:
    if name not in table:
        raise DataError(
            f"{name} is missing from {path}; add its label vector, or delete the file "
            "to derive every label from the masks"
        )
    label = np.asarray(table[name], dtype=np.float32).reshape(-1)
    if label.shape != (num_foreground,):
        raise DataError(
            f"{path}: the label of {name} has {label.size} entries but the dataset "
            f"has {num_foreground} foreground classes; regenerate the file for this "
            "class list"
        )
    return label.copy()
