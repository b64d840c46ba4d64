"""How long a run will take on this machine, measured before its first step.

The two kinds of step differ 2-3x in time on the demo preset (the warm-up trains the classifier
alone; the full step adds the teacher's multi-scale pass, the decoder and the losses), and
evaluation is a sixth of the demo's time, so neither a first-steps rate nor a progress bar's ETA
says how long a run takes. `estimate_duration` times each part once on this machine instead: a
warm-up step and a full step on a throwaway copy of the training state, and the evaluation of one
image. The run itself is untouched: its state is copied and its random number generators are
restored afterwards.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cosa.config import CosaConfig
from cosa.losses import CosaObjective
from cosa.train.distributed import DistContext
from cosa.train.rng import restore_rng_state, rng_state
from cosa.train.state import TrainState
from cosa.train.step import train_step

# Runs shorter than this end before an estimate would help; they are not probed.
MIN_STEPS_TO_ESTIMATE = 100


@dataclass(frozen=True)
class DurationEstimate:
    """Expected seconds of the rest of a run, from per-part timings taken on this machine.

    Attributes:
        warmup_steps, full_steps: steps of each kind still to run.
        warmup_s_per_it, full_s_per_it: measured seconds of one step of each kind.
        evaluated_images: images the remaining evaluations score (val at every evaluation,
            and the test split once at the end).
        s_per_eval_image: measured seconds to evaluate one image.
    """

    warmup_steps: int
    full_steps: int
    warmup_s_per_it: float
    full_s_per_it: float
    evaluated_images: int
    s_per_eval_image: float

    @property
    def seconds(self) -> float:
        return (
            self.warmup_steps * self.warmup_s_per_it
            + self.full_steps * self.full_s_per_it
            + self.evaluated_images * self.s_per_eval_image
        )

    def to_json(self) -> dict[str, float | int]:
        return {**asdict(self), "seconds": self.seconds}

    def describe(self) -> str:
        """One line for the console, e.g. `expected: about 16 min on this machine (...)`."""
        parts = []
        if self.warmup_steps:
            parts.append(f"{self.warmup_steps} warm-up steps at {self.warmup_s_per_it:.2f} s")
        if self.full_steps:
            parts.append(f"{self.full_steps} full steps at {self.full_s_per_it:.2f} s")
        if self.evaluated_images:
            parts.append(
                f"{self.evaluated_images} image evaluations at {self.s_per_eval_image:.2f} s"
            )
        return f"expected: about {_minutes(self.seconds)} on this machine ({', '.join(parts)})"


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def remaining_steps(cfg: CosaConfig, done: int) -> tuple[int, int]:
    """(warm-up steps, full steps) left after `done` steps. Steps 1 to `loss.warmup_iters + 1`
    are the warm-up (`CosaObjective.warmup_factor` is 0 there). A fully supervised run has no
    warm-up and its steps are timed as warm-up steps (no teacher pass)."""
    total = cfg.train.max_iters
    if cfg.train.supervision == "full":
        return total - done, 0
    warmup = min(total, cfg.loss.warmup_iters + 1)
    return max(0, warmup - done), total - max(warmup, done)


def evaluated_images(cfg: CosaConfig, done: int, val_images: int, test_images: int) -> int:
    """Images the remaining evaluations score: val every `eval_every` steps and at the last
    step (at most `eval_max_images` each), then the test split once."""
    total, every = cfg.train.max_iters, cfg.train.eval_every
    evaluations = total // every - done // every + (1 if total % every else 0)
    per_evaluation = val_images
    if cfg.train.eval_max_images:
        per_evaluation = min(val_images, cfg.train.eval_max_images)
    return evaluations * per_evaluation + test_images


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of the second of two calls: the first pays one-off costs (kernel selection,
    allocator growth) that the run pays once, not every step."""
    seconds = math.inf
    for _ in range(2):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds


def estimate_duration(
    state: TrainState,
    objective: CosaObjective,
    cfg: CosaConfig,
    ctx: DistContext,
    amp_dtype: torch.dtype | None,
    batch: dict[str, torch.Tensor],
    evaluate_one_image: Callable[[], object] | None,
    val_images: int,
    test_images: int,
) -> DurationEstimate:
    """Time this run's parts on this machine and add up the rest of the run.

    Args:
        state: the run's state at its current iteration; only a copy of it is stepped.
        batch: a training batch of the run's shapes (the run's first one).
        evaluate_one_image: evaluates one image of the selection split; None = no evaluation
            is timed.
        val_images, test_images: images in the selection and test splits (0 = none).

    Raises:
        ValueError: under DDP (every rank would have to probe in step; not supported).
    """
    if ctx.distributed:
        raise ValueError("estimate_duration runs in a single process, not under DDP")
    warmup_steps, full_steps = remaining_steps(cfg, state.iteration)
    device = ctx.device

    def step_from(iteration: int) -> Callable[[], object]:
        probe = copy.deepcopy(state)
        probe.iteration = iteration

        def run() -> object:
            probe.iteration += 1
            return train_step(probe, objective, cfg, ctx, amp_dtype, batch)

        return run

    saved_rng = rng_state()
    try:
        with warnings.catch_warnings():
            # A deep-copied optimiser has lost the step counter its scheduler wraps around
            # `optimizer.step`, so the copy's first `scheduler.step()` warns about call order.
            warnings.filterwarnings(
                "ignore", message="Seems like `optimizer.step", category=UserWarning
            )
            warmup_s = _timed(step_from(0), device) if warmup_steps else 0.0
            full_s = _timed(step_from(cfg.loss.warmup_iters + 1), device) if full_steps else 0.0
        images = evaluated_images(cfg, state.iteration, val_images, test_images)
        eval_s = _timed(evaluate_one_image, device) if evaluate_one_image and images else 0.0
    finally:
        restore_rng_state(saved_rng)
    return DurationEstimate(
        warmup_steps=warmup_steps,
        full_steps=full_steps,
        warmup_s_per_it=warmup_s,
        full_s_per_it=full_s,
        evaluated_images=images if eval_s else 0,
        s_per_eval_image=eval_s,
    )
