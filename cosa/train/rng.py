"""Capture and restore every RNG a training step touches, for exact `--resume`."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        restore_cuda_rng_states(state["cuda"])


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore per-GPU generator states saved with `torch.cuda.get_rng_state_all`.

    A checkpoint saved with more GPUs visible than now holds states for devices that do not
    exist here (`set_rng_state_all` then fails with an IndexError): the visible GPUs get the
    states of the first devices and the rest are dropped, with a warning, since the resumed run
    then draws other random numbers than an uninterrupted one would.
    """
    count = torch.cuda.device_count()
    if len(states) != count:
        log.warning(
            "the checkpoint holds CUDA RNG states of %d GPU(s) and %d are visible now: restoring "
            "%d; the resumed run is not bit-identical to an uninterrupted one",
            len(states),
            count,
            min(len(states), count),
        )
    for index, device_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), index)
