"""The tiny training configuration shared by the end-to-end training tests: seconds per run on
2 CPU cores, every phase of the CoSA step still exercised (warm-up of one iteration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosa.config import CosaConfig, apply_overrides, preset

TINY: dict[str, Any] = {
    "model.decoder_channels": 16,
    "data.crop_size": 64,
    "data.num_workers": 0,
    "pseudo.scales": [1.0],
    "loss.warmup_iters": 1,
    "loss.warmup_ramp": 0,
    "train.batch_size": 2,
    "train.max_iters": 4,
    "train.eval_every": 2,
    "train.checkpoint_every": 1,
    "train.eval_max_images": 2,
    "train.vis_images": 1,
    "thresholds.queue_images": 4,
}


def tiny_config(data: Path, **extra: Any) -> CosaConfig:
    """The demo preset shrunk by `TINY`, on `data`, with `extra` dotted-key overrides."""
    return apply_overrides(preset("demo"), {**TINY, "data.root": str(data), **extra})
