"""`cosa train --nproc N`: spawn N local DDP processes without torchrun.

Gloo on CPU, NCCL on GPU. Whatever the number of processes, `launch` returns rank 0's
`TrainResult` or raises the error that stopped the run (rank 0's when it has one), once.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from cosa.config import CosaConfig
from cosa.files import write_text_atomic
from cosa.train.distributed import check_process_count, free_port
from cosa.train.result import TrainResult
from cosa.train.trainer import train

RESULT_FILE = "train_result.json"


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (to cross the process boundary), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception type whose constructor takes other arguments
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _worker(
    rank: int,
    world_size: int,
    port: int,
    errors: Any,
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
    try:
        result = train(
            cfg, out, device=device, resume=resume, max_iters=max_iters, progress=rank == 0
        )
    except Exception as exc:
        errors.put((rank, _portable(exc)))
        raise
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
) -> TrainResult:
    """Train in this process (`nproc == 1`, or under torchrun) or spawn `nproc` DDP processes.

    Raises:
        ConfigError: `nproc` processes on CUDA with fewer GPUs visible.
        The error of the lowest rank that reported one (every rank stops on a non-finite loss,
        with the same message naming the iteration); the `cosa.errors` kinds of `train`.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return train(cfg, out, device=device, resume=resume, max_iters=max_iters, progress=progress)
    check_process_count(nproc, device)  # in the children it would be "invalid device ordinal"
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _worker,
            args=(nproc, free_port(), errors, cfg, out, device, resume, max_iters),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException:
        reported = []
        while not errors.empty():
            reported.append(errors.get())
        if not reported:
            raise
        raise min(reported, key=lambda item: item[0])[1] from None
    return TrainResult.from_json(json.loads((out / RESULT_FILE).read_text()))
