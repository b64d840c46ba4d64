"""Pictures of a run: a per-evaluation grid and curves.

The grid shows image, CAM, CPL, SPL, prediction, ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cosa.files import atomic_path

COLUMNS = ("image", "CAM", "CPL", "SPL", "prediction", "ground truth")


def colorize(ids: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """(H, W) class ids (255 = ignore, drawn white) -> (H, W, 3) uint8."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[255] = (255, 255, 255)
    return table[ids.astype(np.uint8)]


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_grid(
    rows: list[dict[str, np.ndarray]], palette: list[list[int]], path: Path, cell: int = 160
) -> None:
    """One row per image; each row maps COLUMNS to (H, W, 3) uint8 pictures or (H, W) id maps."""
    header = 18
    canvas = Image.new("RGB", (cell * len(COLUMNS), header + cell * len(rows)), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((c * cell + 4, 3), title, fill=(230, 230, 230))
    for r, row in enumerate(rows):
        for c, name in enumerate(COLUMNS):
            picture = row.get(name)
            if picture is None:
                continue
            if picture.ndim == 2:
                picture = colorize(picture, palette)
            tile = Image.fromarray(picture).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (c * cell, header + r * cell))
    _save_png_atomic(canvas, path)


def cam_picture(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Blend the max-over-classes CAM (H, W) in [0, 1] as a heat map over the image (H, W, 3)."""
    heat = np.clip(cam, 0.0, 1.0)
    red = np.stack([heat, np.zeros_like(heat), 1.0 - heat], axis=-1) * 255.0
    return (0.5 * image + 0.5 * red).astype(np.uint8)


def save_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss terms per iteration (left) and evaluation scores (right) from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
    for term in ("total", "cls", "cls_aux", "seg", "cam", "reg", "csp"):
        xs = [r["iter"] for r in steps if r.get(f"loss/{term}") is not None]
        ys = [r[f"loss/{term}"] for r in steps if r.get(f"loss/{term}") is not None]
        if xs:
            ax_loss.plot(xs, ys, label=term, linewidth=1)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (unweighted terms)")
    ax_loss.legend(fontsize=7)
    for key, label in (
        ("miou", "seg mIoU"),
        ("cam_miou", "CAM mIoU"),
        ("cpl_miou", "CPL mIoU"),
        ("tag_f1", "seg tag F1"),
    ):
        xs = [r["iter"] for r in evals if r.get(key) is not None]
        ys = [r[key] for r in evals if r.get(key) is not None]
        if xs:
            ax_miou.plot(xs, ys, marker="o", label=label)
    ax_miou.set_xlabel("iteration")
    ax_miou.set_ylabel("score (val)")
    ax_miou.set_ylim(0, 1)
    ax_miou.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
