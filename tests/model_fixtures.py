"""Shared test helpers for tiny real networks: save one as a checkpoint, load it back for export
with the ViT cut short (tests/test_export_*, tests/serving_fixtures.py), and move its BatchNorms
away from the identity (the folding tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cosa.checkpoint import Checkpoint, load_deploy_model, save_checkpoint
from cosa.config import CosaConfig, ModelConfig
from cosa.model import CosaNet, DeployModel

KEEP_BLOCKS = 2  # ViT blocks kept by `cut_vit` (>= 2: F_aux comes from a block before the last)


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


def cut_vit(net: CosaNet) -> CosaNet:
    """Cut a ViT backbone of `net` to its first KEEP_BLOCKS blocks, in place (test speed only: the
    same code path with fewer repeats of the same block); other backbones are left as they are."""
    encoder = net.encoder
    if hasattr(encoder, "vit"):
        encoder.vit.blocks = encoder.vit.blocks[:KEEP_BLOCKS]
        # F_aux stays the output of a block before the last, as block 10 of 12 is in full.
        encoder.aux_block = KEEP_BLOCKS - 2
    return net


def shallow_loader(path: Path) -> tuple[DeployModel, Checkpoint]:
    """The real `load_deploy_model`, then a ViT cut to KEEP_BLOCKS blocks (`cut_vit`)."""
    model, ckpt = load_deploy_model(path)
    cut_vit(model.net)
    return model, ckpt


def scramble_norms(net: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine far from the identity, so a missed fold shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
