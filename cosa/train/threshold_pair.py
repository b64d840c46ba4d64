"""The CAM thresholds in force: main and aux, fixed or dynamic, one state on every rank.

The dual thresholds (tau_l, tau_h) of the main CAM and of the aux CAM (METHOD.md 3) are either the
configured constants or follow the dynamic search (METHOD.md 5.2). Under DDP every rank pushes the
max-CAM rows of the whole global batch (gathered in rank order) into identical queues, so all
ranks fit the same mixture and hold the same thresholds, and rank 0's checkpoint is every rank's
state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cosa.config import CosaConfig
from cosa.pseudo import DynamicThresholds, TeacherOutput, queue_values
from cosa.train.distributed import DistContext, all_gather_rows

THRESHOLD_KEYS = ("low", "high", "aux_low", "aux_high")


class ThresholdPair:
    """Main and aux dual thresholds of one run.

    Args:
        cfg: reads `pseudo.*_threshold` (the fixed values, and the dynamic ones' start),
            `thresholds.*`, `data.crop_size` and `train.seed`.
        ctx: the process's rank and device.
    """

    def __init__(self, cfg: CosaConfig, ctx: DistContext) -> None:
        p, t = cfg.pseudo, cfg.thresholds
        self.ctx = ctx
        self.enabled = t.enabled
        self.stride = t.stride
        self.fixed = {
            "low": p.low_threshold,
            "high": p.high_threshold,
            "aux_low": p.aux_low_threshold,
            "aux_high": p.aux_high_threshold,
        }
        per_side = cfg.data.crop_size // t.stride

        def dynamic(low: float, high: float, seed: int) -> DynamicThresholds:
            return DynamicThresholds(
                low,
                high,
                t.queue_images,
                per_side * per_side,
                t.min_value,
                t.ema,
                t.em_iters,
                device=ctx.device,
                seed=seed,
            )

        self.main = dynamic(p.low_threshold, p.high_threshold, cfg.train.seed)
        self.aux = dynamic(p.aux_low_threshold, p.aux_high_threshold, cfg.train.seed + 1)

    def current(self) -> dict[str, float | Tensor]:
        """`low`, `high`, `aux_low`, `aux_high`: floats, or 0-d device tensors when dynamic."""
        if not self.enabled:
            return dict(self.fixed)
        return {
            "low": self.main.low,
            "high": self.main.high,
            "aux_low": self.aux.low,
            "aux_high": self.aux.high,
        }

    def main_pair(self) -> tuple[float, float]:
        """The main CAM's (tau_l, tau_h) as floats (reads a device tensor back)."""
        current = self.current()
        return float(current["low"]), float(current["high"])

    def update(self, teacher: TeacherOutput, img_box: Tensor) -> dict[str, float | Tensor]:
        """Push this step's teacher max-CAM (every rank's) through the search; return `current`.

        Args:
            teacher: this rank's teacher output; `cam`, `aux_cam` (B, C, H, W).
            img_box: (B, 4) valid region of each crop.
        """
        if not self.enabled:
            return self.current()
        main, valid = queue_values(teacher.cam, img_box, self.stride)  # (B, h, w) each
        aux, _ = queue_values(teacher.aux_cam, img_box, self.stride)
        packed = torch.stack([main, aux, valid.float()], dim=1)  # (B, 3, h, w): one collective
        packed = all_gather_rows(packed, self.ctx)  # (world * B, 3, h, w)
        valid_all = packed[:, 2] > 0.5
        self.main.update(packed[:, 0], valid_all)
        self.aux.update(packed[:, 1], valid_all)
        return self.current()

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "aux": self.aux.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.aux.load_state_dict(state["aux"])
