"""One CoSA optimisation step (METHOD.md sections 3-6).

The assignment network (EMA teacher) makes multi-scale pseudo-labels from the weak view without
autograd; the thresholds follow its CAMs; the online network (student) sees the strong view; the
objective swaps the assignments and adds the regulariser and the three techniques; AdamW steps;
the teacher follows by EMA.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch.profiler import record_function

from cosa.config import CosaConfig
from cosa.losses import CosaObjective
from cosa.model import ema_update
from cosa.pseudo import teacher_forward
from cosa.train.distributed import DistContext, mean_over_ranks
from cosa.train.state import TrainState
from cosa.train.supervised import supervised_objective


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast only ever on CUDA: bf16 where supported, else fp16; None = full precision."""
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "fp16":
        return torch.float16
    if choice == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """Keep BatchNorm statistics fixed (eval mode); small per-device batches would corrupt them."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_step(
    state: TrainState,
    objective: CosaObjective,
    cfg: CosaConfig,
    ctx: DistContext,
    amp_dtype: torch.dtype | None,
    batch: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Run step `state.iteration` (already counted, 1-based) on this rank's share of a batch.

    Args:
        batch: `weak`, `strong` (B, 3, H, W), `label` (B, C), `img_box` (B, 4), and `mask`
            (B, H, W) under full supervision.

    Returns:
        The step's record: `loss/<term>` (means over ranks), `lr/group<i>` and `tau_*`, as 0-d
        device tensors or floats; nothing is read back from the device here.
    """
    device = ctx.device
    batch = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    state.model.train()
    _freeze_batchnorm(state.model)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    step = state.iteration - 1  # 0-based, as the objective's warm-up rule counts
    full = cfg.train.supervision == "full"
    # As in the reference (`loss.reference_warmup`), dynamic thresholds follow the teacher's CAMs
    # from the first step, so at the end of the warm-up they come from real CAMs, not from the
    # queue's initial noise. Fixed thresholds need no teacher until the swapped terms start.
    reference_warmup = cfg.loss.reference_warmup
    thresholds_from_start = reference_warmup and cfg.thresholds.enabled
    needs_teacher = not full and (thresholds_from_start or objective.warmup_factor(step) > 0.0)
    # The named regions show up in torch.profiler traces (benchmarks/profile_step.py).
    with autocast:
        teacher = None
        thresholds = state.thresholds.current()
        if needs_teacher:
            with record_function("cosa.teacher"):
                teacher = teacher_forward(
                    state.teacher_pass,
                    batch["weak"],
                    batch["label"],
                    scales=cfg.pseudo.scales,
                    flip=cfg.pseudo.flip,
                    aux_last_scale_only=cfg.pseudo.aux_last_scale_only,
                )
            with record_function("cosa.thresholds"):
                thresholds = state.thresholds.update(teacher, batch["img_box"])
        with record_function("cosa.student"):
            student = state.model(batch["strong"])
        with record_function("cosa.objective"):
            if full:
                result = supervised_objective(student, batch, cfg)
            else:
                result = objective(student, teacher, batch, thresholds, step)
    with record_function("cosa.backward"):
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(result.total).backward()
    with record_function("cosa.optimizer"):
        # The reference computes every term from the first step with weight 0, so parameters
        # outside the warm-up's graph (the decoder) get zero gradients: AdamW still decays them
        # and counts their steps, and its bias correction is not restarted at the switch.
        if reference_warmup:
            for parameter in state.trainable:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
    with record_function("cosa.ema"):
        ema_update(state.teacher, state.student, cfg.optim.ema_momentum)

    # Losses are the mean over ranks, so a NaN on any rank reaches every rank's log at once.
    names = ["total", *result.terms]
    losses = torch.stack([result.total.detach(), *(v.detach() for v in result.terms.values())])
    losses = mean_over_ranks(losses.float(), ctx)
    record: dict[str, Any] = {f"loss/{k}": v for k, v in zip(names, losses, strict=True)}
    record.update({f"lr/group{i}": g["lr"] for i, g in enumerate(state.optimizer.param_groups)})
    record.update(
        tau_low=thresholds["low"],
        tau_high=thresholds["high"],
        tau_aux_low=thresholds["aux_low"],
        tau_aux_high=thresholds["aux_high"],
    )
    return record
