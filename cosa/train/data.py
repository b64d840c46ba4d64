"""A run's data: the checked splits and the endless stream of training batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from cosa.config import CosaConfig
from cosa.data import DatasetIndex, TrainDataset, open_dataset, write_synthetic_dataset
from cosa.data.check import check_dataset, list_splits
from cosa.data.problems import raise_on_errors
from cosa.errors import ConfigError, DataError
from cosa.train.distributed import DistContext, barrier, broadcast_from_main
from cosa.train.sampler import ResumableSampler

log = logging.getLogger(__name__)

# Images whose median long side exceeds this many crops get a warning: the preset's crops (and its
# 0.5-2x rescale) are sized for VOC's ~500 px images, not for 12-megapixel photos.
LARGE_IMAGE_FACTOR = 4


class RunData(NamedTuple):
    """The splits of one run: train, val (selects best.pt) and the optional reported test."""

    train: DatasetIndex
    val: DatasetIndex
    test: DatasetIndex | None


def open_run_data(
    cfg: CosaConfig, out: Path, ctx: DistContext, class_names: list[str] | None
) -> RunData:
    """Check the data (rank 0; every rank refuses on an error), then open its splits.

    Without `data.root` the embedded synthetic set is written into `out/data` first. A resumed
    run passes its checkpoint's class list, so a tagged folder keeps its ids. The test split is
    optional: a folder without it (a user's own data) is trained without.

    Raises:
        DataError: the check found errors, or the train or val split is empty.
    """
    data = cfg.data
    if data.root is None:
        root = out / "data"
        if ctx.is_main and not (root / "classes.json").exists():
            log.info("writing the embedded synthetic dataset to %s", root)
            write_synthetic_dataset(
                root, data.synth_train, data.synth_val, data.synth_test, seed=data.synth_seed
            )
        barrier(ctx)
    else:
        root = Path(data.root)
    split_args = {
        "class_names": class_names,
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
    }
    splits = [data.train_split, data.val_split]
    test_split = data.test_split
    if test_split and test_split not in list_splits(root, data.val_fraction, data.split_seed):
        log.info("%s has no %r split: no test report", root, test_split)
        test_split = None
    failure = None
    checked: dict[str, DatasetIndex] = {}  # rank 0 reuses the splits the check opened
    if ctx.is_main:
        report = check_dataset(
            root,
            splits + ([test_split] if test_split else []),
            train_split=data.train_split,
            **split_args,
        )
        for problem in report.warnings:
            log.warning("%s", problem)
        side = report.median_long_side
        if side is not None and side > LARGE_IMAGE_FACTOR * data.crop_size:
            log.warning(
                "the images' median long side is %d px, over %dx the %d px crops: a crop "
                "sees a small part of an image, which its tags may not describe; downscale "
                "the images (long side about twice the crop) or raise data.crop_size",
                side,
                LARGE_IMAGE_FACTOR,
                data.crop_size,
            )
        try:
            raise_on_errors(report.problems, root)
        except DataError as exc:
            failure = str(exc)
        checked = report.indices
    failure = broadcast_from_main(failure, ctx)
    if failure is not None:
        raise DataError(failure)

    def opened(split: str) -> DatasetIndex:
        return checked[split] if split in checked else open_dataset(root, split, **split_args)

    train, val = opened(data.train_split), opened(data.val_split)
    test = opened(test_split) if test_split else None
    for index in (train, val):
        if len(index.samples) == 0:
            raise DataError(
                f"{root}: split {index.split!r} is empty; add images to it (a tagged folder "
                "without a split column: raise data.val_fraction)"
            )
    return RunData(train, val, test)


def training_batches(
    cfg: CosaConfig, index: DatasetIndex, ctx: DistContext, start_iteration: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of each global batch, from step `start_iteration` on, without end.

    Raises:
        ConfigError: the global batch does not divide among the processes.
    """
    if cfg.train.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the "
            f"{ctx.world_size} processes"
        )
    per_rank = cfg.train.batch_size // ctx.world_size
    dataset = TrainDataset(
        index,
        cfg.data.crop_size,
        (cfg.data.scale_min, cfg.data.scale_max),
        seed=cfg.train.seed,
        with_masks=cfg.train.supervision == "full",
    )
    sampler = ResumableSampler(
        len(dataset),
        per_rank,
        ctx.rank,
        ctx.world_size,
        seed=cfg.train.seed,
        start_iteration=start_iteration,
    )
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    return iter(loader)
