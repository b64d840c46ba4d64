"""`cosa train --nproc N` and `cosa train --nnodes N ...`: start the DDP ranks of a run.

One node: N local processes spawned here (no torchrun needed). Several nodes: torch's elastic agent
(the launcher behind torchrun, c10d rendezvous, no restarts) starts this node's ranks once every
node has joined. Gloo on CPU, NCCL on GPU. Both run `_run_rank` in each process, and report the
error that stopped the run once, in this process: a rank's own `cosa.errors` error or non-finite
loss as it was raised, anything else (a rank killed, a node lost) as a `DistributedError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from cosa.config import CosaConfig
from cosa.errors import ConfigError, CosaError, DistributedError
from cosa.files import write_text_atomic
from cosa.train.distributed import check_process_count, free_port
from cosa.train.rendezvous import NodeGroup, check_endpoint
from cosa.train.result import TrainResult

RESULT_FILE = "train_result.json"
RUN_ID = "cosa-train"  # one run per rendezvous store: node 0 hosts a fresh store for each launch
_TORCH_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ")  # "[.../pair.cc:545] " in gloo's


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (to cross the process boundary), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception type whose constructor takes other arguments
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _run_rank(
    errors: Any,
    cfg: CosaConfig,
    out: Path,
    device: str,
    resume: bool,
    max_iters: int | None,
    progress: bool,
) -> TrainResult | None:
    """One DDP rank (RANK, WORLD_SIZE, ... set by the launcher): rank 0's result, else None.

    An error is also put on `errors` as (rank, exception), so that the launcher can raise it as it
    was; rank 0 writes its result to RESULT_FILE in the run folder.
    """
    from cosa.train.trainer import train  # here: a node's launcher process needs no model code

    rank = int(os.environ["RANK"])
    try:
        result = train(
            cfg,
            out,
            device=device,
            resume=resume,
            max_iters=max_iters,
            progress=progress and rank == 0,
        )
    except Exception as exc:
        errors.put((rank, _portable(exc)))
        raise
    if rank != 0:
        return None
    write_text_atomic(out / RESULT_FILE, json.dumps(result.to_json(), indent=2))
    return result


def _spawned_rank(
    rank: int,
    world_size: int,
    port: int,
    errors: Any,
    cfg: CosaConfig,
    out: Path,
    device: str,
    resume: bool,
    max_iters: int | None,
    progress: bool,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    _run_rank(errors, cfg, out, device, resume, max_iters, progress)


def _reported(errors: Any) -> list[tuple[int, BaseException]]:
    """The (rank, exception) pairs the ranks put on `errors`, lowest rank first."""
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    return sorted(reported, key=lambda item: item[0])


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
        from cosa.train.trainer import train

        return train(cfg, out, device=device, resume=resume, max_iters=max_iters, progress=progress)
    check_process_count(nproc, device)  # in the children it would be "invalid device ordinal"
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _spawned_rank,
            args=(nproc, free_port(), errors, cfg, out, device, resume, max_iters, progress),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException:
        reported = _reported(errors)
        if not reported:
            raise
        raise reported[0][1] from None
    return TrainResult.from_json(json.loads((out / RESULT_FILE).read_text()))


def launch_nodes(
    cfg: CosaConfig,
    out: Path,
    nodes: NodeGroup,
    device: str = "auto",
    resume: bool = False,
    max_iters: int | None = None,
    nproc: int = 1,
    progress: bool = True,
) -> TrainResult | None:
    """Run this node's `nproc` ranks of a `nodes.nnodes`-node run; rank 0's result where it ran.

    Every node calls this with the same arguments but `nodes.node_rank`; it returns when every
    rank of every node has finished. `out` must be one folder that all nodes share (rank 0 writes
    it, every rank reads `checkpoints/last.pt` on `resume`).

    Returns:
        Rank 0's `TrainResult` on the node that ran rank 0, None on the others.

    Raises:
        ConfigError: launched under torchrun already, too few GPUs for `nproc`, node rank 0's
            endpoint unreachable or its port taken, or not every node joined within the timeout.
        The `cosa.errors` error or non-finite loss that stopped a rank of this node, as raised.
        DistributedError: any other end: a rank of this node failed, was killed, or lost a rank
            of another node (which stops every rank), or this node's launcher got a signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError(
            "this process was started by torchrun, which already placed it: drop --nnodes, "
            "--node-rank and --rdzv-endpoint (torchrun's own options set them)"
        )
    check_process_count(nproc, device)
    check_endpoint(nodes)
    config = LaunchConfig(
        min_nodes=nodes.nnodes,
        max_nodes=nodes.nnodes,
        nproc_per_node=nproc,
        run_id=RUN_ID,
        rdzv_backend="c10d",
        rdzv_endpoint=nodes.endpoint,
        # Node 0 hosts the store (not whichever node's host name matches: on one machine every
        # node's does); join_timeout is the c10d backend's name for the wait for all nodes.
        rdzv_configs={"is_host": nodes.hosts_store, "join_timeout": nodes.timeout_s},
        max_restarts=0,  # a lost rank ends the run on every node; --resume continues it
        start_method="spawn",
    )
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        with _quiet_launcher_logs():
            returns = elastic_launch(config, _run_rank)(
                errors, cfg, out, device, resume, max_iters, progress
            )
    except ChildFailedError as failed:
        raise _stopped(failed, _reported(errors), out) from None
    except RendezvousTimeoutError:
        raise ConfigError(
            f"not all {nodes.nnodes} nodes joined the rendezvous at {nodes.endpoint} within "
            f"{nodes.timeout_s} s; start every node with --nnodes {nodes.nnodes} and this "
            "--rdzv-endpoint (node rank 0's address), or raise --rdzv-timeout"
        ) from None
    except RendezvousError as exc:  # also the agent's own check of the store during the run
        raise DistributedError(
            f"training stopped: the rendezvous at {nodes.endpoint} failed ({type(exc).__name__}): "
            f"node rank 0, which hosts it, stopped or cannot be reached; {_how_to_continue(out)}"
        ) from None
    except SignalException as exc:
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise DistributedError(
            f"training stopped by {exc.sigval.name} (every rank of this node with it); "
            f"{_how_to_continue(out)}"
        ) from None
    return returns.get(0)


def _stopped(failed: Any, reported: list[tuple[int, BaseException]], out: Path) -> BaseException:
    """What to raise when ranks of this node failed (`failed`: torch's ChildFailedError)."""
    for _, exc in reported:
        if isinstance(exc, (CosaError, FloatingPointError)):  # the rank's own, clear error
            return exc
    if reported:
        rank, exc = reported[0]
        why = f"raised {type(exc).__name__}: {_first_sentence(exc)}"
        where = ""
    else:
        rank, failure = failed.get_first_failure()
        why = f"exited with code {failure.exitcode}"
        if failure.exitcode < 0:
            why = f"was killed by {failure.signal_name()}"
        where = f" (traceback: {failure.error_file})" if os.path.isfile(failure.error_file) else ""
    return DistributedError(
        f"training stopped: rank {rank} on this node {why}{where}, as every rank does when a rank "
        "of any node fails or is killed (the first node to fail says why); "
        f"{_how_to_continue(out)}"
    )


def _how_to_continue(out: Path) -> str:
    if (out / "checkpoints" / "last.pt").is_file():
        return f"run every node again with --resume to continue from {out}/checkpoints/last.pt"
    return "run every node again (no checkpoint was saved yet)"


def _first_sentence(exc: BaseException) -> str:
    """The gist of an error from torch: its first sentence, without gloo's source location."""
    lines = str(exc).strip().splitlines() or [""]
    return _TORCH_LOCATION.sub("", lines[0]).split(". ")[0]


@contextlib.contextmanager
def _quiet_launcher_logs() -> Iterator[None]:
    """Keep the elastic agent's failure logs (whose content `_stopped` reports) off the terminal."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
