"""Datasets (VOC 2012 + SBD, COCO 2014, the synthetic benchmark), training views, loaders.

The door of the package: import from `cosa.data`, not from its modules.
"""

from cosa.data.classes import COCO_CLASSES, IGNORE_INDEX, VOC_CLASSES, voc_palette
from cosa.data.datasets import detect_layout, open_dataset
from cosa.data.image_io import read_mask, read_rgb
from cosa.data.index import DatasetIndex, Sample, labels_from_mask
from cosa.data.loaders import EvalDataset, TrainDataset
from cosa.data.synth import (
    CLASS_NAMES as SYNTH_CLASSES,
)
from cosa.data.synth import (
    SynthStats,
    SynthSummary,
    is_synthetic_dataset,
    measure_cooccurrence,
    write_synthetic_dataset,
)
from cosa.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRONG_OPS,
    TrainViews,
    ViewParams,
    apply_strong_op,
    apply_view_params,
    denormalize,
    make_train_views,
    normalize,
    sample_view_params,
)
from cosa.images import palette_image

__all__ = [
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STRONG_OPS",
    "SYNTH_CLASSES",
    "VOC_CLASSES",
    "DatasetIndex",
    "EvalDataset",
    "Sample",
    "SynthStats",
    "SynthSummary",
    "TrainDataset",
    "TrainViews",
    "ViewParams",
    "apply_strong_op",
    "apply_view_params",
    "denormalize",
    "detect_layout",
    "is_synthetic_dataset",
    "labels_from_mask",
    "make_train_views",
    "measure_cooccurrence",
    "normalize",
    "open_dataset",
    "palette_image",
    "read_mask",
    "read_rgb",
    "sample_view_params",
    "voc_palette",
    "write_synthetic_dataset",
]
