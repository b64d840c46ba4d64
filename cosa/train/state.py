"""Everything a training step changes and a checkpoint holds: the two networks, the optimiser and
its schedule, the gradient scaler, the thresholds and the step count."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cosa import __version__
from cosa.checkpoint import Checkpoint, load_checkpoint, restore_scaler
from cosa.config import CosaConfig
from cosa.device import training_memory_format
from cosa.errors import CheckpointError
from cosa.model import CosaNet, build_model, make_teacher
from cosa.model.folding import FoldedNetwork
from cosa.train.distributed import DistContext
from cosa.train.rng import restore_rng_state, rng_state, seed_everything
from cosa.train.schedule import build_optimizer, build_scheduler
from cosa.train.threshold_pair import ThresholdPair

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """One rank's training state.

    Attributes:
        student: the online network (unwrapped).
        model: what the step calls: `student`, or its DDP wrapper.
        teacher: the assignment network (EMA of the student, never back-propagated); it owns the
            teacher's weights (checkpoints, evaluation).
        teacher_pass: the teacher with its BatchNorms folded into its convolutions, for the
            step's teacher pass and the evaluations (recomputed whenever the teacher changes).
        optimizer, scheduler, scaler: AdamW, its per-step LR schedule, the fp16 gradient scaler.
        trainable: every parameter the optimiser updates.
        thresholds: the CAM thresholds in force.
        iteration: optimisation steps done (1-based after the first).
    """

    student: CosaNet
    model: torch.nn.Module
    teacher: CosaNet
    teacher_pass: FoldedNetwork[CosaNet]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]
    thresholds: ThresholdPair
    iteration: int = 0

    def checkpoint(
        self, cfg: CosaConfig, class_names: list[str], palette: list[list[int]], metrics: dict
    ) -> Checkpoint:
        """The state as a checkpoint (with this process's RNG state)."""
        return Checkpoint(
            config=cfg,
            class_names=class_names,
            palette=palette,
            iteration=self.iteration,
            online=self.student.state_dict(),
            teacher=self.teacher.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_state(),
            thresholds=self.thresholds.state_dict(),
            metrics=metrics,
            package_version=__version__,
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt` exactly (networks, optimiser, schedule, RNG, thresholds)."""
        self.student.load_state_dict(ckpt.online)
        self.teacher.load_state_dict(ckpt.teacher)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler is not None:
            self.scheduler.load_state_dict(ckpt.scheduler)
        restore_scaler(self.scaler, ckpt.scaler)
        if ckpt.thresholds is not None:
            self.thresholds.load_state_dict(ckpt.thresholds)
        if ckpt.rng is not None:
            restore_rng_state(ckpt.rng)
        self.iteration = ckpt.iteration


def build_state(
    cfg: CosaConfig,
    ctx: DistContext,
    class_names: list[str],
    amp_fp16: bool,
    resumed: Checkpoint | None,
) -> TrainState:
    """Seed, build both networks, the optimiser and the thresholds; restore `resumed` if given.

    The student starts from `model.pretrained` (or random), from `model.init_checkpoint`'s
    assignment network when set, or from `resumed`.

    Raises:
        CheckpointError: `model.init_checkpoint` is unreadable, predicts other classes or has
            another architecture.
    """
    seed_everything(cfg.train.seed)
    initialised = resumed is None and cfg.model.init_checkpoint is not None
    student = build_model(
        cfg.model,
        num_classes=len(class_names) - 1,
        load_pretrained=resumed is None and not initialised,
    ).to(ctx.device, memory_format=training_memory_format(ctx.device))
    if initialised:
        _initialise(student, Path(cfg.model.init_checkpoint), cfg, class_names)
    teacher = make_teacher(student, copy_heads=cfg.model.copy_heads_to_teacher or initialised).to(
        ctx.device
    )
    teacher.eval()
    optimizer = build_optimizer(
        student.param_groups(cfg.optim.lr, cfg.optim.head_lr_scale, cfg.optim.weight_decay),
        cfg.optim,
    )
    state = TrainState(
        student=student,
        model=student,
        teacher=teacher,
        teacher_pass=FoldedNetwork(teacher),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, cfg.train.max_iters),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_fp16),
        trainable=[p for group in optimizer.param_groups for p in group["params"]],
        thresholds=ThresholdPair(cfg, ctx),
    )
    if resumed is not None:
        state.restore(resumed)
    if ctx.distributed:
        state.model = DistributedDataParallel(
            student,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True,  # decoder and heads get no gradient during the warm-up
        )
    return state


def _initialise(student: CosaNet, path: Path, cfg: CosaConfig, class_names: list[str]) -> None:
    """Load another run's assignment network into the student (a second stage, fine-tuning)."""
    init = load_checkpoint(path, map_location="cpu")
    if init.class_names != class_names:
        raise CheckpointError(
            f"model.init_checkpoint {path} predicts {init.class_names[1:]} but the data has "
            f"{class_names[1:]}; start from a checkpoint of the same classes"
        )
    missing, unexpected = student.load_state_dict(init.teacher, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"model.init_checkpoint {path} does not fit backbone {cfg.model.backbone!r} "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); use the "
            "first run's model settings"
        )
    log.info("both networks start from the assignment network of %s", path)
