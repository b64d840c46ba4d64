"""Which torch device a command runs on (`--device auto|cpu|cuda`)."""

from __future__ import annotations

import torch

from cosa.choices import Device, parse_choice
from cosa.errors import ConfigError


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` without a GPU is a ConfigError.

    Args:
        choice: a `cosa.choices.Device` value.
        local_rank: the CUDA device index of this process (DDP).

    Raises:
        ConfigError: an unknown choice, `cuda` without a visible GPU, or fewer GPUs visible
            than `local_rank + 1` (say, a torchrun with more processes per node than GPUs).
    """
    choice = parse_choice(Device, choice, "device")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"process {local_rank} of this node needs GPU {local_rank} but {count} GPU(s) are "
            f"visible; start at most {count} process(es) per node, or use --device cpu"
        )
    return torch.device("cuda", local_rank)


def training_memory_format(device: torch.device) -> torch.memory_format:
    """The layout training keeps the networks' 4-D weights (and so their activations) in.

    channels_last on the CPU: oneDNN runs convolutions, the depthwise ones above all, faster on
    NHWC than on NCHW (`benchmarks/results/train_ab_channels_last.md`). CUDA keeps PyTorch's
    default: the GPU timings (docs/benchmarks.md) were measured with it.
    """
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format
