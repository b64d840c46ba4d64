"""The picture of each evaluation: what the teacher makes of a few fixed val images.

One row per image: the image, the teacher's max-CAM, its CAM pseudo-label (CPL) and seg
pseudo-label (SPL) at the thresholds in force, the deployed prediction and the ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosa.config import CosaConfig
from cosa.data import DatasetIndex, EvalDataset
from cosa.evaluation.predictors import DeployPredictor, normalised_image
from cosa.model import CosaNet
from cosa.pseudo import cam_pseudo_label, seg_pseudo_label, teacher_forward
from cosa.train.visualize import cam_picture, save_grid


def picture_images(index: DatasetIndex, count: int) -> list[dict[str, Any]]:
    """The first `count` images of a split (`EvalDataset` items), drawn at every evaluation."""
    dataset = EvalDataset(index)
    return [dataset[i] for i in range(min(count, len(dataset)))]


@torch.no_grad()
def save_teacher_pictures(
    teacher: CosaNet,
    images: list[dict[str, Any]],
    cfg: CosaConfig,
    thresholds: tuple[float, float],
    palette: list[list[int]],
    path: Path,
    device: torch.device,
) -> None:
    """Draw one row per image (module docstring) into the PNG `path`.

    Args:
        teacher: the assignment network; it passes as in training (`pseudo.scales`, `pseudo.flip`).
        images: `picture_images` items; `mask` may be None.
        thresholds: the main CAM's (tau_l, tau_h) in force.
    """
    if not images:
        return
    predictor = DeployPredictor(teacher, device)
    low, high = thresholds
    rows = []
    for item in images:
        image = item["image"]
        height, width = image.shape[:2]
        label = torch.from_numpy(item["label"]).to(device)[None].float()  # (1, C)
        out = teacher_forward(
            teacher,
            normalised_image(image, device),
            label,
            scales=cfg.pseudo.scales,
            flip=cfg.pseudo.flip,
        )
        box = torch.tensor([[0, height, 0, width]], device=device)
        cpl = cam_pseudo_label(out.cam, box, low, high)[0]  # (H, W)
        spl = seg_pseudo_label(out.seg, label, cfg.pseudo.seg_temperature).argmax(1)[0]
        rows.append(
            {
                "image": image,
                "CAM": cam_picture(image, out.cam.amax(dim=1)[0].cpu().numpy()),
                "CPL": cpl.cpu().numpy(),
                "SPL": spl.cpu().numpy(),
                "prediction": np.asarray(predictor(image)).argmax(0),
                "ground truth": item["mask"],
            }
        )
    save_grid(rows, palette, path)
