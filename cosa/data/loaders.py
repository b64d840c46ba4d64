"""Torch datasets over a `DatasetIndex`: training views and evaluation samples."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cosa.data.image_io import read_image_and_mask, read_rgb
from cosa.data.index import DatasetIndex
from cosa.data.transforms import apply_view_params, mask_view, sample_view_params
from cosa.errors import ConfigError, DataError


class TrainDataset(Dataset):
    """Aligned weak/strong views (METHOD.md section 2) with image-level labels.

    The augmentation of item i in epoch e is a pure function of (seed, e, i), independent of worker
    count and order, so a resumed run sees the same views. Items may be requested as `i` (the epoch
    set by `set_epoch`) or as `(epoch, i)` pairs (as `cosa.train.sampler.ResumableSampler` yields).

    Each item is a dict:
        weak, strong: float32 (3, crop, crop), ImageNet-normalised;
        label: float32 (C,) image-level label;
        img_box: int64 (4,) [h0, h1, w0, w1] valid region of the crop;
        index: int, position in the index.
    """

    def __init__(
        self,
        index: DatasetIndex,
        crop_size: int,
        scale_range: tuple[float, float],
        seed: int,
        with_masks: bool = False,
    ) -> None:
        """
        Args:
            with_masks: also return the ground-truth `mask` (int64 (crop, crop), 255 = ignore)
                under the same geometry; only the fully supervised bound uses it.

        Raises:
            ConfigError: crop_size < 16, a scale range that is not 0 < low <= high, or seed < 0.
            DataError: `with_masks` and some image has no mask.
        """
        low, high = scale_range
        if crop_size < 16:
            raise ConfigError(f"data.crop_size must be >= 16 (one output cell), got {crop_size}")
        if not 0 < low <= high:
            raise ConfigError(
                f"data.scale_min/scale_max must satisfy 0 < min <= max, got ({low}, {high})"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if with_masks:
            missing = [s for s in index.samples if s.mask_path is None]
            if missing:
                raise DataError(
                    f"fully supervised training (train.supervision=full) needs a mask for every "
                    f"image of split {index.split!r} of {index.root}, but {len(missing)} of "
                    f"{len(index.samples)} have none (first: {missing[0].image_path}); add their "
                    "masks (`cosa pseudo` writes them) or train with train.supervision=weak"
                )
        self.index = index
        self.crop_size = crop_size
        self.scale_range = (float(low), float(high))
        self.seed = seed
        self.with_masks = with_masks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used for plain integer indices."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, i = item if isinstance(item, tuple) else (self.epoch, item)
        sample = self.index.samples[i]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, i]))
        mask = None
        if self.with_masks:
            assert sample.mask_path is not None  # checked by __init__
            pixels, mask = read_image_and_mask(sample.image_path, sample.mask_path)
            image = Image.fromarray(pixels)
        else:
            image = read_rgb(sample.image_path)
        params = sample_view_params(
            image.height, image.width, self.crop_size, self.scale_range, rng
        )
        views = apply_view_params(image, self.crop_size, params)
        item: dict[str, torch.Tensor | int] = {
            "weak": views.weak,
            "strong": views.strong,
            "label": torch.from_numpy(np.array(sample.label, dtype=np.float32)),
            "img_box": views.img_box,
            "index": i,
        }
        if mask is not None:
            item["mask"] = mask_view(mask, self.crop_size, params)
        return item


class EvalDataset(Dataset):
    """Whole images with their masks (where they have one), unaugmented, for evaluation.

    Each item is a dict:
        image: uint8 (H, W, 3) RGB (EXIF orientation applied);
        mask: uint8 (H, W) ids, 255 = ignore; None for an image without a mask;
        label: float32 (C,) image-level label;
        name: the sample's name.
    """

    def __init__(self, index: DatasetIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | str | None]:
        sample = self.index.samples[i]
        mask = None
        if sample.mask_path is None:
            image = np.asarray(read_rgb(sample.image_path), dtype=np.uint8)
        else:
            image, mask = read_image_and_mask(sample.image_path, sample.mask_path)
        return {
            "image": image,
            "mask": mask,
            "label": np.array(sample.label, dtype=np.float32),
            "name": sample.name,
        }
