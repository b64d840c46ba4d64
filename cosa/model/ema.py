"""The assignment network (teacher): an exponential moving average of the online network.

xi <- m * xi + (1 - m) * theta after every optimizer step (METHOD.md section 1; m = 0.9994 in the
paper). Both functions take the plain `CosaNet`: under DistributedDataParallel pass
`ddp_model.module`, never the DDP wrapper (its parameters are the same tensors, but `make_teacher`
would deep-copy the wrapper and its process group). Every rank holds identical student weights after
the all-reduced step, so running `ema_update` on every rank keeps the teachers identical without
communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cosa.errors import ConfigError
from cosa.model.network import CosaNet


def make_teacher(student: CosaNet, copy_heads: bool = False) -> CosaNet:
    """Create the assignment network from the online network.

    The encoder (parameters and buffers) is copied. The heads (CAM classifiers and decoder) get
    their own fresh random init unless `copy_heads`, as in the reference, where the teacher is built
    separately and only the pretrained encoder weights coincide.

    Args:
        student: the online network (unwrapped, not DDP).
        copy_heads: copy the student's heads too instead of re-initialising them.

    Returns:
        A new `CosaNet` on the student's device with `requires_grad=False` everywhere, in eval mode
        (BatchNorm of the EfficientNet then uses the running statistics that `ema_update` copies;
        ViTs have no mode-dependent layers, so this matches the reference's train-mode teacher).
    """
    teacher = copy.deepcopy(student)
    if not copy_heads:
        for head in (teacher.classifier, teacher.aux_classifier, teacher.decoder):
            for module in head.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: CosaNet, student: CosaNet, momentum: float) -> None:
    """One EMA step in place: `t = momentum * t + (1 - momentum) * s` for every parameter.

    Buffers (BatchNorm running statistics and counters) are copied from the student, not averaged.

    Args:
        teacher: the assignment network (from `make_teacher`).
        student: the online network (unwrapped, not DDP).
        momentum: m in [0, 1] (`optim.ema_momentum`, range-checked once with the config); 1
            keeps the teacher, 0 copies the student.

    Raises:
        ConfigError: the two networks have different parameters (built from different configs).
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ConfigError(
            "teacher and student have different parameters; build both from the same "
            "ModelConfig and class count (use make_teacher)"
        )
    names = list(t_params)
    # lerp: t + (1 - m) * (s - t) == m * t + (1 - m) * s, fused over all tensors.
    torch._foreach_lerp_(
        [t_params[n] for n in names], [s_params[n].detach() for n in names], 1.0 - momentum
    )
    s_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        buffer.copy_(s_buffers[name])
