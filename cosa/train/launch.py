"""`cosa train --nproc N`: spawn N local DDP processes without torchrun.

Gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from cosa.config import CosaConfig
from cosa.files import write_text_atomic
from cosa.train.distributed import check_process_count, free_port
from cosa.train.trainer import TrainResult, train

RESULT_FILE = "train_result.json"


def _worker(
    rank: int,
    world_size: int,
    port: int,
    cfg: CosaConfig,
    out: Path,
    device: str,
    resume: bool,
    max_iters: int | None,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    result = train(cfg, out, device=device, resume=resume, max_iters=max_iters, progress=rank == 0)
    if rank == 0:
        write_text_atomic(out / RESULT_FILE, json.dumps(result.to_json(), indent=2))


def launch(
    cfg: CosaConfig,
    out: Path,
    device: str = "auto",
    resume: bool = False,
    max_iters: int | None = None,
    nproc: int = 1,
    progress: bool = True,
) -> TrainResult | dict:
    """Train in this process (`nproc == 1`, or under torchrun) or spawn `nproc` DDP processes.

    Returns the `TrainResult` of a single-process run, or rank 0's result as a dict after a spawn.

    Raises:
        ConfigError: `nproc` processes on CUDA with fewer GPUs visible.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return train(cfg, out, device=device, resume=resume, max_iters=max_iters, progress=progress)
    check_process_count(nproc, device)  # in the children it would be "invalid device ordinal"
    mp.start_processes(
        _worker,
        args=(nproc, free_port(), cfg, out, device, resume, max_iters),
        nprocs=nproc,
        join=True,
        start_method="spawn",
    )
    return json.loads((out / RESULT_FILE).read_text())
