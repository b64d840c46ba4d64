"""Process-group set-up for single-process and DDP training (torchrun or `cosa train --nproc N`).

NCCL on CUDA, gloo on CPU. Under torchrun the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT variables are set; `cosa train --nproc N` spawns N processes and sets them itself.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from cosa.device import resolve_device
from cosa.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs. `world_size == 1` means no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_process_count(nproc: int, choice: str) -> None:
    """Refuse `--nproc N` on CUDA with fewer than N GPUs visible (one process per GPU).

    Raises:
        ConfigError: naming N, the GPUs visible and the fix; also the errors of `resolve_device`.
    """
    if resolve_device(choice).type != "cuda":
        return  # gloo on the CPU: any number of processes
    count = torch.cuda.device_count()
    if nproc > count:
        raise ConfigError(
            f"--nproc {nproc} runs one process per GPU but {count} GPU(s) are visible; pass "
            f"--nproc {count} or fewer, or --device cpu"
        )


def setup_distributed(device_choice: str) -> DistContext:
    """Initialise the process group from the environment when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    share_cores(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def share_cores(device: torch.device, local_ranks: int) -> None:
    """CPU ranks of one machine split its cores between their compute threads.

    Each rank would otherwise start one thread per core, and N ranks oversubscribe the machine N
    times over (torchrun sets OMP_NUM_THREADS=1 for the same reason). An OMP_NUM_THREADS the user
    (or torchrun) set is kept.
    """
    if device.type != "cpu" or local_ranks <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_from_main(value: T, ctx: DistContext) -> T:
    """Rank 0's `value` on every rank (any picklable object; returned as is without DDP)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along dim 0 in rank order.

    (B, ...) -> (world_size * B, ...); the tensor itself without a process group.
    """
    if not ctx.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of `tensor` over ranks (a new tensor; gloo has no AVG, so SUM / world size).

    A NaN on any rank makes the mean NaN on every rank, so all of them see it at the same step.
    """
    if not ctx.distributed:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / ctx.world_size
