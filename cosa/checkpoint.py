"""Checkpoint format (DESIGN.md): one `.pt` file, written atomically (temp file + fsync + rename).

Contents: format tag and version, package version, resolved config, class names and palette,
iteration, both networks' state dicts, optimizer / scheduler / scaler state, RNG states, dynamic
thresholds, metrics. A run killed at any moment leaves the previous file intact, never a truncated
one.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cosa import __version__
from cosa.config import CosaConfig, from_dict
from cosa.errors import CheckpointError, ConfigError
from cosa.files import atomic_path

if TYPE_CHECKING:
    from cosa.model.deploy import DeployModel
    from cosa.model.network import CosaNet

CHECKPOINT_FORMAT = "cosa-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """In-memory view of a checkpoint file. `class_names` include background (index 0)."""

    config: CosaConfig
    class_names: list[str]
    palette: list[list[int]]
    iteration: int
    online: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__

    @property
    def num_foreground(self) -> int:
        """C, foreground classes (the classifier width)."""
        return len(self.class_names) - 1


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    """Write `ckpt` to `path` atomically.

    A temp file in the same folder, fsync, then `os.replace` (`cosa.files.atomic_path`).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "package_version": ckpt.package_version,
        "config": ckpt.config.to_dict(),
        "class_names": list(ckpt.class_names),
        "palette": [list(map(int, c)) for c in ckpt.palette],
        "iteration": int(ckpt.iteration),
        "online": ckpt.online,
        "teacher": ckpt.teacher,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "scaler": ckpt.scaler,
        "rng": ckpt.rng,
        "thresholds": ckpt.thresholds,
        "metrics": ckpt.metrics,
    }
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint.

    Raises:
        CheckpointError: missing, corrupt, not a cosa checkpoint, or another format version.
    """
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the path of a .pt file written "
            "by `cosa train` (e.g. RUN/checkpoints/best.pt)"
        )
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; pass a checkpoint file such as {path}/checkpoints/best.pt"
        )
    try:
        raw = torch.load(path, map_location=map_location, weights_only=False)
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({exc.__class__.__name__}); "
            "use another checkpoint (checkpoints/last.pt or best.pt)"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a cosa checkpoint (no '{CHECKPOINT_FORMAT}' tag); pretrained "
            "backbone weights go to `--pretrained`, not here"
        )
    version = raw.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, this cosa reads version "
            f"{CHECKPOINT_VERSION}; use cosa {raw.get('package_version', '?')} or retrain"
        )
    try:
        config = from_dict(raw["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: its stored config does not fit this cosa version: {exc}"
        ) from exc
    return Checkpoint(
        config=config,
        class_names=list(raw["class_names"]),
        palette=[list(c) for c in raw["palette"]],
        iteration=int(raw["iteration"]),
        online=raw["online"],
        teacher=raw["teacher"],
        optimizer=raw.get("optimizer"),
        scheduler=raw.get("scheduler"),
        scaler=raw.get("scaler"),
        rng=raw.get("rng"),
        thresholds=raw.get("thresholds"),
        metrics=raw.get("metrics") or {},
        package_version=str(raw.get("package_version", "?")),
    )


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> bool:
    """Load a checkpoint's `GradScaler` state into `scaler` when there is one to load.

    A disabled scaler (CPU, bf16 or fp32 runs) saves an empty dict, and an enabled scaler refuses
    to load one ("The source state dict is empty"): a run resumed with FP16 autocast from such a
    checkpoint starts with a fresh scale instead, which it recalibrates in a few steps.

    Returns:
        True when `state` was loaded.
    """
    if not state:
        return False
    scaler.load_state_dict(state)
    return True


def build_teacher_from_checkpoint(ckpt: Checkpoint) -> CosaNet:
    """The assignment network (EMA teacher) of `ckpt`, in eval mode.

    Built without loading pretrained files.
    """
    from cosa.model import build_model

    net = build_model(ckpt.config.model, num_classes=ckpt.num_foreground, load_pretrained=False)
    missing, unexpected = net.load_state_dict(ckpt.teacher, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit backbone {ckpt.config.model.backbone!r} with "
            f"{ckpt.num_foreground} classes (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
    return net.eval()


def load_deploy_model(path: Path) -> tuple[DeployModel, Checkpoint]:
    """The deploy network of a checkpoint.

    Teacher seg stream, raw 0-255 RGB in; `logits`, `mask` out.
    """
    from cosa.model import DeployModel

    ckpt = load_checkpoint(path)
    return DeployModel(build_teacher_from_checkpoint(ckpt)).eval(), ckpt
