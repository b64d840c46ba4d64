"""Optimiser and learning-rate schedule (METHOD.md section 6).

AdamW, linear warm-up, then poly decay.
"""

from __future__ import annotations

import torch

from cosa.config import OptimConfig


def lr_multiplier(step: int, warmup_iters: int, max_iters: int, power: float) -> float:
    """LR factor at optimiser step `step` (0-based).

    As the reference: a linear warm-up from ~0 to 1 over `warmup_iters` steps
    (`1 - (1 - s/W)(1 - 1e-6)`), then the poly decay `(1 - s/N)^power`, floored at 0. The decay
    does not multiply the warm-up, so the factor reaches 1 at the end of the warm-up.
    """
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - 1e-6)
    return max(0.0, 1.0 - step / max(1, max_iters)) ** power


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the network's parameter groups (each group carries its own `lr`)."""
    for group in param_groups:
        group.setdefault("weight_decay", cfg.weight_decay)
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR implementing `lr_multiplier`; its state goes into the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.lr_warmup_iters, max_iters, cfg.poly_power)
    )
