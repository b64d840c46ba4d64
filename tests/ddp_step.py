"""One CoSA step as a gloo rank, for the DDP-against-one-process test (test_train_run.py).

A function of an importable module, so that `torch.multiprocessing.spawn` can start it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cosa.config import CosaConfig
from cosa.losses import CosaObjective
from cosa.train.distributed import setup_distributed, teardown_distributed
from cosa.train.state import build_state
from cosa.train.step import train_step


def one_step(
    cfg: CosaConfig, class_names: list[str], batch: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Build the training state of `cfg` in this process (a rank when WORLD_SIZE > 1), run the
    first step on `batch` and return the gradients it stepped with (all-reduced under DDP), what
    it changed (both networks, the thresholds), each parameter's learning rate and the loss."""
    ctx = setup_distributed("cpu")
    state = build_state(cfg, ctx, class_names, False, None)
    state.iteration = 1
    record = train_step(state, CosaObjective(cfg), cfg, ctx, None, batch)
    lr_of = {id(p): g["lr"] for g in state.optimizer.param_groups for p in g["params"]}
    return {
        "online": {k: v.detach().clone() for k, v in state.student.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in state.teacher.state_dict().items()},
        "grads": {
            name: p.grad.detach().clone()
            for name, p in state.student.named_parameters()
            if p.grad is not None
        },
        "lr": {name: lr_of[id(p)] for name, p in state.student.named_parameters()},
        "thresholds": state.thresholds.state_dict(),
        "loss": float(record["loss/total"]),
    }


def rank_step(
    rank: int,
    world_size: int,
    port: int,
    cfg: CosaConfig,
    class_names: list[str],
    batch_file: Path,
    out: Path,
) -> None:
    """Rank `rank` of `world_size`: rows [rank * b, (rank + 1) * b) of the saved global batch,
    one step; rank 0 saves `one_step`'s result to `out`."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    batch = torch.load(batch_file, weights_only=False)
    b = batch["weak"].shape[0] // world_size
    share = {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}
    try:
        result = one_step(cfg, class_names, share)
        if rank == 0:
            torch.save(result, out)
    finally:
        teardown_distributed()
