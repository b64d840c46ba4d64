"""`cosa data check`: validate a dataset folder of any layout and summarise it.

The same check runs before `cosa train` starts, so a bad row or a broken image is reported in the
first seconds, never after an hour of training. It reads the labels (every problem of a tagged
folder's labels file, with its line), then decodes every image of the checked splits with the one
decoder (`cosa.images.load_image`) and reads every mask: unreadable or empty images, masks of
another size than their image (after its EXIF orientation), mask ids out of range. Images are
decoded on a thread pool (Pillow releases the GIL while decoding).

VOC, COCO and synthetic folders report the first problem of each split list (the list readers stop
there) and every problem of the images and masks they list.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cosa.data.datasets import detect_layout, open_dataset
from cosa.data.image_io import mask_as_displayed, read_mask
from cosa.data.index import (
    SPLIT_DIR,
    DatasetIndex,
    Sample,
    available_splits,
    labels_from_mask,
)
from cosa.data.problems import Problem, error, errors_of, warning
from cosa.data.tagged import DEFAULT_VAL_FRACTION, read_tagged_folder
from cosa.errors import DataError
from cosa.images import ImageReadError, load_image_and_orientation

MIN_TRAIN_IMAGES_PER_CLASS = 5  # fewer gives the classifier almost nothing to learn a class from
TOP_PAIRS = 10  # co-occurring class pairs listed in the summary


@dataclass
class SplitSummary:
    """Counts of one split. `per_class` maps every foreground class to its number of images."""

    images: int
    with_masks: int
    without_tags: int
    per_class: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "with_masks": self.with_masks,
            "without_tags": self.without_tags,
            "per_class": self.per_class,
        }


@dataclass
class DataReport:
    """What `check_dataset` found.

    Attributes:
        root: the folder.
        layout: "tagged", "voc", "coco" or "synth".
        class_names: incl. background.
        class_source: where the classes come from ("classes.txt", "tags", "model", or the layout).
        split_derived: True when a tagged folder's splits were drawn (no split column).
        splits: summary per checked split, in check order.
        pairs: the most frequent co-occurring class pairs over the checked images,
            (class a, class b, images), most frequent first.
        problems: every problem found, errors and warnings, in the order found.
        images_checked: distinct images decoded.
        median_long_side: the median of the decoded images' longer side, in pixels as displayed.
        indices: the checked splits, opened (what `open_dataset` returns for them), so a caller
            that checks first need not read the folder again.
    """

    root: Path
    layout: str
    class_names: tuple[str, ...]
    class_source: str
    split_derived: bool
    splits: dict[str, SplitSummary]
    pairs: list[tuple[str, str, int]]
    problems: list[Problem] = field(default_factory=list)
    images_checked: int = 0
    median_long_side: int | None = None
    indices: dict[str, DatasetIndex] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return errors_of(self.problems)

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": list(self.class_names),
            "class_source": self.class_source,
            "split_derived": self.split_derived,
            "splits": {name: s.to_json() for name, s in self.splits.items()},
            "cooccurring_pairs": [{"a": a, "b": b, "images": n} for a, b, n in self.pairs],
            "images_checked": self.images_checked,
            "median_long_side": self.median_long_side,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_json() for p in self.problems],
        }


def list_splits(
    root: Path, val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = 0
) -> list[str]:
    """The split names a dataset folder offers (a tagged folder: those holding an image).

    Raises:
        DataError: `root` is no dataset folder.
    """
    if detect_layout(root) == "tagged":
        return read_tagged_folder(root, None, val_fraction, split_seed).split_names()
    return available_splits(root)


def check_dataset(
    root: Path,
    splits: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
    train_split: str = "train",
    progress: bool = False,
) -> DataReport:
    """Validate `root` and summarise it (see the module docstring for what is checked).

    Args:
        root: a dataset folder of any supported layout.
        splits: the splits to check; None = every split the folder has. A split that does not
            exist is an error.
        class_names: a trained model's class list incl. background (see `open_dataset`).
        val_fraction, split_seed: a tagged folder's seeded split.
        train_split: the split whose classes must have `MIN_TRAIN_IMAGES_PER_CLASS` images.
        progress: show a progress bar while decoding.

    Raises:
        DataError: `root` is no dataset folder (every other problem is in the report).
    """
    root = Path(root)
    layout = detect_layout(root)
    problems: list[Problem] = []
    indices: dict[str, DatasetIndex] = {}
    if layout == "tagged":
        folder = read_tagged_folder(root, class_names, val_fraction, split_seed)
        problems.extend(folder.problems)
        names, source, derived = folder.class_names, folder.class_source, folder.split_derived
        labels_file = folder.labels_file or root
        present = folder.split_names()
        for split in present if splits is None else splits:
            if split not in present:
                problems.append(_missing_split(root, split, present))
                continue
            indices[split] = folder.index(split)
    else:
        present = available_splits(root)
        for split in present if splits is None else splits:
            try:
                indices[split] = open_dataset(root, split, class_names=class_names)
            except DataError as exc:
                problems.append(error(root, None, str(exc)))
        first = next(iter(indices.values()), None)
        names = first.class_names if first is not None else tuple(class_names or ())
        source, derived = layout, False
        labels_file = root / SPLIT_DIR / f"{train_split}.txt"

    summaries = {split: _summarise(index) for split, index in indices.items()}
    if train_split in summaries:
        problems.extend(_rare_classes(labels_file, summaries[train_split], train_split))
    unique = {(s.image_path, s.mask_path): (s, len(names) - 1) for s in _all_samples(indices)}
    file_problems, sides = _check_files(list(unique.values()), progress)
    problems.extend(file_problems)
    return DataReport(
        root=root,
        layout=layout,
        class_names=tuple(names),
        class_source=source,
        split_derived=derived,
        splits=summaries,
        pairs=_top_pairs(indices),
        problems=problems,
        images_checked=len(unique),
        median_long_side=int(np.median(sides)) if sides else None,
        indices=indices,
    )


def _missing_split(root: Path, split: str, present: list[str]) -> Problem:
    found = ", ".join(present) if present else "none"
    return error(
        root,
        None,
        f"has no {split!r} split (splits with images: {found}); set "
        f"data.train_split / data.val_split to one of them",
    )


def _all_samples(indices: dict[str, DatasetIndex]) -> Iterator[Sample]:
    for index in indices.values():
        yield from index.samples


def _summarise(index: DatasetIndex) -> SplitSummary:
    labels = np.stack([s.label for s in index.samples]) if index.samples else np.zeros((0, 0))
    counts = labels.sum(axis=0).astype(int) if len(labels) else np.zeros(index.num_classes, int)
    return SplitSummary(
        images=len(index.samples),
        with_masks=sum(s.mask_path is not None for s in index.samples),
        without_tags=int((labels.sum(axis=1) == 0).sum()) if len(labels) else 0,
        per_class={name: int(n) for name, n in zip(index.class_names[1:], counts, strict=True)},
    )


def _rare_classes(labels: Path, train: SplitSummary, split: str) -> list[Problem]:
    return [
        warning(
            labels,
            None,
            f"class {name!r} has {n} {split} image(s); with fewer than "
            f"{MIN_TRAIN_IMAGES_PER_CLASS} the model barely learns it: tag more images",
        )
        for name, n in train.per_class.items()
        if n < MIN_TRAIN_IMAGES_PER_CLASS
    ]


def _top_pairs(indices: dict[str, DatasetIndex]) -> list[tuple[str, str, int]]:
    pairs: Counter[tuple[str, str]] = Counter()
    seen: set[Path] = set()
    for index in indices.values():
        names = index.class_names[1:]
        for sample in index.samples:
            if sample.image_path in seen:
                continue
            seen.add(sample.image_path)
            present = [names[i] for i in np.flatnonzero(sample.label)]
            pairs.update(itertools.combinations(present, 2))
    return [(a, b, n) for (a, b), n in pairs.most_common(TOP_PAIRS)]


def _check_files(work: list[tuple[Sample, int]], progress: bool) -> tuple[list[Problem], list[int]]:
    """Decode every image and read every mask, on a thread pool: the problems in input order and
    the long sides of the images that decode."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda item: _check_sample(*item), work)
        found = list(
            tqdm(
                results,
                total=len(work),
                desc="check",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
    problems = [problem for sample_problems, _ in found for problem in sample_problems]
    return problems, [side for _, side in found if side is not None]


def _check_sample(sample: Sample, num_foreground: int) -> tuple[list[Problem], int | None]:
    """The problems of one image and its mask (decodable, same size, ids in range), and the
    image's long side in pixels as displayed (None when it cannot be decoded)."""
    try:
        image, orientation = load_image_and_orientation(sample.image_path)
    except ImageReadError as exc:
        reason = f"{exc.reason}; replace the file or remove it"
        return [error(sample.image_path, None, reason)], None
    height, width = image.shape[:2]
    return _check_mask(sample, num_foreground, orientation, height, width), max(height, width)


def _check_mask(
    sample: Sample, num_foreground: int, orientation: int, height: int, width: int
) -> list[Problem]:
    if sample.mask_path is None:
        return []
    try:
        raw = read_mask(sample.mask_path)
    except DataError as exc:
        return [error(sample.mask_path, None, str(exc))]
    mask = mask_as_displayed(raw, orientation, (height, width))
    if mask is None:
        return [
            error(
                sample.mask_path,
                None,
                f"is {raw.shape[1]}x{raw.shape[0]} but its image {sample.image_path} is "
                f"{width}x{height} as displayed (EXIF orientation {orientation}); a mask must "
                "have its image's stored or displayed size",
            )
        ]
    try:
        in_mask = labels_from_mask(mask, num_foreground)
    except DataError as exc:
        return [error(sample.mask_path, None, f"{exc}; fix the mask")]
    found = []
    if orientation != 1 and raw.shape == mask.shape and mask is not raw:
        # The size cannot tell whether the mask was drawn on the stored or the displayed picture.
        found.append(
            warning(
                sample.mask_path,
                None,
                f"is turned with its image's EXIF orientation {orientation}, as masks are read "
                "in the image file's stored orientation; if it was drawn on the displayed "
                "picture, save it unturned or remove the image's orientation tag",
            )
        )
    extra = np.flatnonzero((in_mask > 0) & (np.asarray(sample.label) == 0)) + 1
    if extra.size:
        found.append(
            warning(
                sample.mask_path,
                None,
                f"holds class id(s) {extra.tolist()} that the image's tags do not list; "
                "fix the tags or the mask",
            )
        )
    return found
