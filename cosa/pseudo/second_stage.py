"""`cosa pseudo`: pseudo-masks of a trained model, written as a tagged folder for a second stage.

The second stage is the usual last step of weakly supervised segmentation: train a segmenter with
full supervision on the first stage's pseudo-masks (`cosa train --data OUT --set
train.supervision=full`). What makes each mask, and why:

- the assignment network (the EMA teacher: the network `cosa segment` deploys, and the one that
  made the training targets);
- its seg stream fused over the run's teacher scales and flip (`pseudo.scales`, `pseudo.flip`)
  at the image's own size (`NativeMultiScalePredictor`: the fusion the teacher used during
  training), because the fused prediction is smoother and more complete than one pass;
- restricted to the image's tags: classes the image is not tagged with get no pixel. Tags are known
  for every training image, so this removes the first stage's false classes for free (the README's
  label-masked mIoU is the same restriction at test time);
- pixels whose fused class probability is below `min_confidence` become 255 (ignored by the
  second stage's loss): object borders and uncertain regions, where a wrong label would teach the
  second stage the first stage's mistakes. The probability is the softmax of the logits averaged
  over the passes, after the restriction.

The output folder is a complete tagged dataset: `images/` (hard links to the source images, or
copies across file systems or with `copy=True`), `masks/` (pseudo-masks for the images of
`split`; the source's own masks for the images of the other splits, when it has them),
`classes.txt` (the model's classes) and `labels.csv` (every image's tags and split: the split it
had in the source, so the second stage validates on the same images as the first). From a VOC,
COCO or synthetic source, `split` becomes `train`, the run's validation split `val` and its test
split `test`. Masks are written atomically, one file at a time; `skip_existing` resumes an
interrupted run, and the labels files are written last, so a folder without `labels.csv` is not
finished.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cosa.checkpoint import Checkpoint, build_teacher_from_checkpoint, load_checkpoint
from cosa.data import DatasetIndex
from cosa.data.check import list_splits
from cosa.data.classes import IGNORE_INDEX
from cosa.data.image_io import mask_as_displayed, read_mask, read_rgb_and_orientation
from cosa.data.tagged import (
    IMAGES_DIR,
    MASKS_DIR,
    TaggedRow,
    mask_name,
    write_labels,
)
from cosa.device import resolve_device
from cosa.errors import ConfigError, DataError
from cosa.evaluation.metrics import PartialLabelScore
from cosa.evaluation.predictors import NativeMultiScalePredictor
from cosa.evaluation.run import open_checkpoint_data
from cosa.files import atomic_path, write_bytes_atomic
from cosa.images import encode_palette_png, orient_mask

DEFAULT_MIN_CONFIDENCE = 0.5


@dataclass
class PseudoResult:
    """What `write_pseudo_dataset` did. `miou` / `coverage` are None without ground truth.

    Attributes:
        out: the tagged folder written.
        split: the split that got pseudo-masks.
        images: images in the output (all splits).
        pseudo_masks: pseudo-masks in the output (written now or kept from an earlier run).
        written: pseudo-masks computed by this run; skipped: kept from an earlier run.
        miou: mIoU of the pseudo-masks against the source's ground truth, on the pixels they label.
        coverage: share of the ground truth's labelled pixels the pseudo-masks label (not 255).
        scored: pseudo-masks that had ground truth to score against.
        seconds: wall time.
    """

    out: Path
    split: str
    images: int
    pseudo_masks: int
    written: int
    skipped: int
    miou: float | None
    coverage: float | None
    scored: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "split": self.split,
            "images": self.images,
            "pseudo_masks": self.pseudo_masks,
            "written": self.written,
            "skipped": self.skipped,
            "miou": self.miou,
            "coverage": self.coverage,
            "scored": self.scored,
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class _Entry:
    """One image of the output: where it comes from and what its mask will be."""

    row: TaggedRow
    source: Path
    label: np.ndarray  # (C,) the image's tags as a 0/1 vector
    truth: Path | None  # the source's mask
    pseudo: bool  # True: a pseudo-mask; False: the source's mask (if any) is carried over


def pseudo_mask(
    logits: np.ndarray, label: np.ndarray, passes: int, min_confidence: float
) -> np.ndarray:
    """A pseudo-mask from fused seg logits, restricted to the image's tags.

    Args:
        logits: float32 (K, H, W) seg logits summed over `passes` passes (scales x flips).
        label: (C,) image tags in {0, 1}, C = K - 1; background is always allowed.
        passes: how many passes were summed (the softmax uses their mean).
        min_confidence: pixels whose winning probability is below it become 255.

    Returns:
        uint8 (H, W) ids: 0 background, 1..C tagged classes, 255 uncertain.
    """
    allowed = np.concatenate([[True], np.asarray(label) > 0])  # (K,)
    mean = torch.from_numpy(logits / passes)
    mean[torch.from_numpy(~allowed)] = -torch.inf
    probability, ids = torch.softmax(mean, dim=0).max(dim=0)  # (H, W) each
    mask = ids.to(torch.uint8)
    mask[probability < min_confidence] = IGNORE_INDEX
    return mask.numpy()


def write_pseudo_dataset(
    checkpoint: Path,
    data: Path,
    out: Path,
    split: str = "train",
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    skip_existing: bool = False,
    copy: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> PseudoResult:
    """Write pseudo-masks for the images of `split` as a tagged folder (module docstring).

    Args:
        checkpoint: a `cosa train` checkpoint (its teacher makes the masks).
        data: the dataset it was trained on (any layout).
        out: the folder to write; new or empty, or an interrupted one with `skip_existing`.
        split: the split to pseudo-label.
        min_confidence: in [0, 1); pixels below it become 255. 0 keeps every pixel.
        skip_existing: keep images and masks an earlier run already wrote.
        copy: copy the images instead of hard-linking them.
        device: "auto", "cpu" or "cuda".
        progress: show a progress bar.

    Raises:
        ConfigError: `min_confidence` outside [0, 1), `out` is a file, or `out` holds files and
            `skip_existing` is off.
        CheckpointError: unreadable checkpoint.
        DataError: bad dataset, classes that differ from the checkpoint's, or an unreadable image.
    """
    start = time.perf_counter()
    if not 0.0 <= min_confidence < 1.0:
        raise ConfigError(f"--min-confidence must lie in [0, 1), got {min_confidence}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder to write the tagged dataset to")
    if out.exists() and any(out.iterdir()) and not skip_existing:
        raise ConfigError(
            f"{out} is not empty; pass --skip-existing to resume an interrupted run, or choose "
            "another --out"
        )
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=torch_device)
    entries = _plan(ckpt, Path(data), split)
    net = build_teacher_from_checkpoint(ckpt).to(torch_device)
    scales = tuple(ckpt.config.pseudo.scales)
    flip = ckpt.config.pseudo.flip
    passes = len(scales) * (2 if flip else 1)
    predictor = NativeMultiScalePredictor(net, torch_device, scales=scales, flip=flip)
    palette = np.asarray(ckpt.palette, dtype=np.uint8)
    scores = PartialLabelScore(len(ckpt.class_names))
    written = skipped = 0
    for entry in tqdm(entries, desc="pseudo", unit="img", disable=not progress, dynamic_ncols=True):
        _place_image(entry.source, out / IMAGES_DIR / entry.row.image, copy)
        target = out / MASKS_DIR / mask_name(entry.row.image)
        if not entry.pseudo:
            if entry.truth is not None:
                _place_image(entry.truth, target, copy)
            continue
        if target.is_file() and entry.truth is None:
            skipped += 1
            continue
        # Masks are written in the image file's stored orientation, as datasets read them back
        # (`cosa.data.image_io`): the hard-linked image keeps its EXIF tag.
        image, orientation = read_rgb_and_orientation(entry.source)  # as displayed
        if target.is_file():
            mask = orient_mask(read_mask(target), orientation)
            skipped += 1
        else:
            logits = predictor(image)  # (K, H, W), summed over `passes` passes
            mask = pseudo_mask(logits, entry.label, passes, min_confidence)
            stored = orient_mask(mask, orientation, undo=True)
            write_bytes_atomic(target, encode_palette_png(stored, palette))
            written += 1
        if entry.truth is not None:
            truth = mask_as_displayed(read_mask(entry.truth), orientation, image.shape[:2])
            if truth is None or mask.shape != image.shape[:2]:
                raise DataError(
                    f"mask {entry.truth} does not fit its image {entry.source} "
                    f"({image.shape[1]}x{image.shape[0]} as displayed); run "
                    f"`cosa data check {data}`"
                )
            scores.update(mask, truth)
    write_labels(out, [e.row for e in entries], ckpt.class_names)
    return PseudoResult(
        out=out,
        split=split,
        images=len(entries),
        pseudo_masks=sum(e.pseudo for e in entries),
        written=written,
        skipped=skipped,
        miou=scores.miou(),
        coverage=scores.coverage(),
        scored=scores.images,
        seconds=time.perf_counter() - start,
    )


def _plan(ckpt: Checkpoint, data: Path, split: str) -> list[_Entry]:
    """Every image of the output with its source, tags, output split and mask source."""
    cfg = ckpt.config.data
    present = list_splits(data, cfg.val_fraction, cfg.split_seed)
    if split not in present:
        raise DataError(
            f"{data} has no split {split!r} (splits: {', '.join(present) or 'none'}); pass "
            "--split with one of them"
        )
    first = open_checkpoint_data(ckpt, data, split)
    if first.kind == "tagged":
        carried = [(name, name) for name in present]  # source split -> output split
    else:
        carried = [(split, "train")] + [
            (name, out_name)
            for name, out_name in ((cfg.val_split, "val"), (cfg.test_split, "test"))
            if name and name in present and name != split
        ]
    entries: list[_Entry] = []
    seen: set[str] = set()
    for source_split, out_split in carried:
        index = first if source_split == split else open_checkpoint_data(ckpt, data, source_split)
        for sample, image in zip(index.samples, _output_names(index), strict=True):
            if image in seen:
                continue
            seen.add(image)
            tags = tuple(index.class_names[1 + i] for i in np.flatnonzero(sample.label))
            entries.append(
                _Entry(
                    row=TaggedRow(image=image, tags=tags, split=out_split, line=0),
                    source=sample.image_path,
                    label=np.asarray(sample.label),
                    truth=sample.mask_path,
                    pseudo=source_split == split,
                )
            )
    return entries


def _output_names(index: DatasetIndex) -> list[str]:
    """Image paths relative to the output's `images/`: a tagged folder keeps its own; the VOC-style
    layouts are flat, so the file name is unique."""
    if index.kind == "tagged":
        return [sample.name for sample in index.samples]
    return [sample.image_path.name for sample in index.samples]


def _place_image(source: Path, target: Path, copy: bool) -> None:
    """Hard-link `source` to `target` (a copy across file systems or with `copy`); an existing
    `target` is kept. Both leave either no file or the whole file."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
