"""Shared test helpers for tiny real networks: save one as a checkpoint, and load it back for
export with the ViT cut short (tests/test_export_*, tests/serving_fixtures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from cosa.checkpoint import Checkpoint, load_deploy_model, save_checkpoint
from cosa.config import CosaConfig, ModelConfig
from cosa.model import DeployModel

KEEP_BLOCKS = 2  # ViT blocks kept by `shallow_loader`


def save_net_checkpoint(
    net: nn.Module,
    model_cfg: ModelConfig,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    path: Path,
) -> Path:
    """Save `net` as iteration 0 of a run, the same weights as online and teacher network."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_checkpoint(
        Checkpoint(
            config=CosaConfig(model=model_cfg),
            class_names=list(class_names),
            palette=[list(c) for c in palette],
            iteration=0,
            online=state,
            teacher=state,
        ),
        path,
    )
    return path


def shallow_loader(path: Path) -> tuple[DeployModel, Checkpoint]:
    """The real `load_deploy_model`, then a ViT cut to KEEP_BLOCKS blocks (test speed only; other
    backbones are returned as loaded)."""
    model, ckpt = load_deploy_model(path)
    if hasattr(model.net.encoder, "vit"):
        vit = model.net.encoder.vit
        vit.blocks = vit.blocks[:KEEP_BLOCKS]
    return model, ckpt
