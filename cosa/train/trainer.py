"""The CoSA training loop (METHOD.md), read top-down: set-up, the loop, evaluation, the end.

The step itself is `cosa.train.step.train_step`; what it changes and a checkpoint holds is
`cosa.train.state.TrainState`; the thresholds are `cosa.train.threshold_pair.ThresholdPair`.
Everything a resume needs goes into `checkpoints/last.pt`, atomically, every
`train.checkpoint_every` steps.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosa.allocator import keep_freed_memory
from cosa.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cosa.config import CosaConfig, dump_yaml, validate
from cosa.data import DatasetIndex
from cosa.errors import CheckpointError, ConfigError
from cosa.evaluation.evaluate import CamQuality, EvalResult, evaluate
from cosa.evaluation.predictors import DeployPredictor
from cosa.files import remove_stale_temporaries
from cosa.losses import CosaObjective
from cosa.train.data import open_run_data, training_batches
from cosa.train.distributed import DistContext, barrier, setup_distributed, teardown_distributed
from cosa.train.estimate import MIN_STEPS_TO_ESTIMATE, estimate_duration
from cosa.train.pictures import picture_images, save_teacher_pictures
from cosa.train.result import TrainResult
from cosa.train.runlog import DeferredScalars, MetricsLog, read_metrics
from cosa.train.selection import Selection, resolve_select_metric
from cosa.train.state import build_state
from cosa.train.step import autocast_dtype, train_step
from cosa.train.visualize import save_curves

log = logging.getLogger(__name__)


class Trainer:
    """One training run in one process (a DDP rank or the only one)."""

    def __init__(
        self,
        cfg: CosaConfig,
        out: Path,
        ctx: DistContext,
        resume: bool,
        max_iters: int | None = None,
    ) -> None:
        self.out, self.ctx = out, ctx
        self.ckpt_dir = out / "checkpoints"
        last = self.ckpt_dir / "last.pt"
        resumed = self._resumed_checkpoint(last) if resume else None
        if resumed is None and last.exists():
            raise ConfigError(
                f"{out} already holds a run ({last}); pass --resume to continue it or "
                "choose another --out"
            )
        if resumed is not None:
            cfg = resumed.config  # a resumed run keeps its own config; only the length may change
        if max_iters is not None:
            cfg = replace(cfg, train=replace(cfg.train, max_iters=max_iters))
        self.cfg = cfg = validate(cfg)  # before any data is read
        # The data is checked before anything is written: a refused run leaves no run folder.
        self.data = open_run_data(cfg, out, ctx, resumed.class_names if resumed else None)
        if ctx.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, out / "config.yaml")
        self.class_names = list(self.data.train.class_names)
        self.palette = [list(map(int, c)) for c in self.data.train.palette]
        metric = resolve_select_metric(
            cfg.train.select_metric, self.data.val, cfg.train.eval_max_images
        )
        self.selection = Selection(metric, self.data.val.split)

        self.amp_dtype = autocast_dtype(cfg.train.amp, ctx.device)
        self.state = build_state(
            cfg, ctx, self.class_names, self.amp_dtype == torch.float16, resumed
        )
        if resumed is not None:
            self.selection.restore(resumed.metrics)
            log.info("resumed from iteration %d", self.state.iteration)
        self.objective = CosaObjective(cfg)
        self.batches = training_batches(cfg, self.data.train, ctx, self.state.iteration)
        self.metrics = (
            MetricsLog(
                out / "metrics.jsonl", resume_iteration=self.state.iteration if resume else None
            )
            if ctx.is_main
            else None
        )
        count = cfg.train.vis_images if ctx.is_main else 0
        self.pictured = picture_images(self.data.val, count)

    def _resumed_checkpoint(self, last: Path) -> Checkpoint:
        if not last.is_file():
            raise CheckpointError(
                f"--resume: no checkpoint at {last}; start the run without --resume"
            )
        remove_stale_temporaries(self.ckpt_dir)  # left by a save that was killed midway
        return load_checkpoint(last, map_location="cpu")

    # ----------------------------------------------------------------------------------- the loop

    def run(self, progress: bool = True) -> TrainResult:
        cfg, state = self.cfg, self.state
        bar = None
        if progress and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.train.max_iters,
                initial=state.iteration,
                desc="train",
                unit="it",
                dynamic_ncols=True,
            )
        if bar is not None:
            self._announce_duration(bar)
        timings: list[float] = []
        records = DeferredScalars()  # no per-step device sync for the log
        while state.iteration < cfg.train.max_iters:
            start = time.perf_counter()
            batch = next(self.batches)
            state.iteration += 1
            record = train_step(state, self.objective, cfg, self.ctx, self.amp_dtype, batch)
            # Waits for the previous step's device work, so the host stays at most one step
            # ahead and `elapsed` is the device's time per step once the loop is steady.
            previous = records.flush()
            elapsed = time.perf_counter() - start
            timings.append(elapsed)
            record.update(
                kind="step",
                iter=state.iteration,
                sec_per_it=elapsed,
                images_per_sec=cfg.train.batch_size / elapsed,
            )
            records.push(record)
            self._log_step(previous, bar)
            if bar is not None:
                bar.update(1)
            last_step = state.iteration == cfg.train.max_iters
            evaluating = state.iteration % cfg.train.eval_every == 0 or last_step
            saving = state.iteration % cfg.train.checkpoint_every == 0 or last_step
            if evaluating or saving:  # the log catches up first: a NaN is never saved
                self._log_step(records.flush(), bar)
            if evaluating:
                self._evaluate_and_select()
            if saving:
                self._save(self.ckpt_dir / "last.pt")
        if bar is not None:
            bar.close()
        return self._finish(timings)

    def _announce_duration(self, bar: Any) -> None:
        """Print how long the rest of the run should take here, timed on a copy of its state
        (single-process runs of at least `MIN_STEPS_TO_ESTIMATE` steps), and log it."""
        if self.ctx.distributed:
            return
        if self.cfg.train.max_iters - self.state.iteration < MIN_STEPS_TO_ESTIMATE:
            return
        first = next(self.batches)
        self.batches = itertools.chain([first], self.batches)
        estimate = estimate_duration(
            self.state,
            self.objective,
            self.cfg,
            self.ctx,
            self.amp_dtype,
            first,
            evaluate_one_image=lambda: self.evaluate_teacher(self.data.val, max_images=1),
            val_images=len(self.data.val),
            test_images=len(self.data.test) if self.data.test is not None else 0,
        )
        bar.write(estimate.describe(), file=sys.stderr)  # beside the bar, off stdout
        if self.metrics is not None:
            self.metrics.write(
                {"kind": "estimate", "iter": self.state.iteration, **estimate.to_json()}
            )

    def _log_step(self, record: dict[str, Any] | None, bar: Any) -> None:
        """Write a step record that `DeferredScalars` read back; stop on a non-finite loss.

        Every rank checks the same value (the mean over ranks), so every rank stops at once.
        """
        if record is None:
            return
        if not math.isfinite(record["loss/total"]):
            raise FloatingPointError(
                f"loss became {record['loss/total']} at iteration {record['iter']}; "
                "lower the learning rate or use train.amp=off"
            )
        if self.metrics is not None:
            self.metrics.write(record)
        if bar is not None and record["iter"] % self.cfg.train.log_every == 0:
            bar.set_postfix(
                loss=f"{record['loss/total']:.3f}",
                tau_l=f"{record['tau_low']:.2f}",
                tau_h=f"{record['tau_high']:.2f}",
            )

    # ------------------------------------------------------------------------- evaluation, saving

    def _evaluate_and_select(self) -> None:
        """Score the teacher on the selection split (val) on rank 0; keep the best as best.pt."""
        if self.ctx.is_main:
            iteration = self.state.iteration
            result = self.evaluate_teacher(self.data.val)
            score = getattr(result, self.selection.metric)
            if self.metrics is not None:
                self.metrics.write(
                    {
                        "kind": "eval",
                        "iter": iteration,
                        "split": result.split,
                        "miou": result.miou,
                        "miou_label_masked": result.miou_label_masked,
                        "cam_miou": result.cam_miou,
                        "cam_miou_predicted_labels": result.cam_miou_predicted_labels,
                        "cpl_miou": result.cpl_miou,
                        "cpl_coverage": result.cpl_coverage,
                        "tag_f1": result.tag_f1,
                        "images": result.num_images,
                        "images_with_masks": result.num_images_with_masks,
                        "select_metric": self.selection.metric,
                        "score": score,
                        "eval_seconds": result.seconds,
                    }
                )
            log.info(
                "iter %d: val %s %.4f (tag F1 %.4f)",
                iteration,
                self.selection.metric,
                score,
                result.tag_f1,
            )
            save_teacher_pictures(
                self.state.teacher_pass.refreshed(),
                self.pictured,
                self.cfg,
                self.state.thresholds.main_pair(),
                self.palette,
                self.out / "vis" / f"iter_{iteration:06d}.png",
                self.ctx.device,
            )
            if self.selection.consider(score, iteration):
                self._save(self.ckpt_dir / "best.pt")
        barrier(self.ctx)

    def evaluate_teacher(self, index: DatasetIndex, max_images: int | None = None) -> EvalResult:
        """The teacher's deployed output, CAM and CPL quality on a split."""
        cfg, teacher = self.cfg, self.state.teacher_pass.refreshed()
        low, high = self.state.thresholds.main_pair()
        quality = CamQuality(
            teacher,
            self.ctx.device,
            len(self.class_names),
            cfg.pseudo.scales,
            low,
            high,
            flip=cfg.pseudo.flip,
        )
        return evaluate(
            DeployPredictor(teacher, self.ctx.device),
            index,
            protocol="deploy",
            max_images=cfg.train.eval_max_images if max_images is None else max_images,
            cam_quality=quality,
        )

    def _save(self, path: Path) -> None:
        if self.ctx.is_main:
            metrics = self.selection.to_dict()
            save_checkpoint(
                self.state.checkpoint(self.cfg, self.class_names, self.palette, metrics), path
            )

    def _finish(self, timings: list[float]) -> TrainResult:
        """Curves, the best checkpoint's test score (rank 0), and the run's result."""
        last, best = self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt"
        test = None
        if self.ctx.is_main:
            if self.metrics is not None:
                self.metrics.close()
                save_curves(read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png")
            if self.data.test is not None and best.is_file():
                best_ckpt = load_checkpoint(best, map_location=self.ctx.device)
                self.state.teacher.load_state_dict(best_ckpt.teacher)
                test = self.evaluate_teacher(self.data.test, max_images=0).to_json()
                test["checkpoint"] = str(best)
        sync = _rank_divergence(self.state.student) if self.ctx.distributed else None
        steady = timings[min(len(timings) - 1, 3) :] if timings else []
        return TrainResult(
            out=self.out,
            iterations=self.state.iteration,
            last_checkpoint=last,
            best_checkpoint=best if best.is_file() else None,
            selection_metric=self.selection.metric,
            best_score=self.selection.best_score,
            best_iteration=self.selection.best_iteration,
            test=test,
            seconds_per_iter=float(np.mean(steady)) if steady else float("nan"),
            extra={
                "selection_split": self.data.val.split,
                "test_split": self.data.test.split if self.data.test else None,
                "world_size": self.ctx.world_size,
                "ddp_max_param_divergence": sync,
            },
        )


def _rank_divergence(net: torch.nn.Module) -> float:
    """Max |difference| of any parameter between ranks (0.0 when in sync)."""
    flat = torch.cat([p.detach().float().flatten() for p in net.parameters()])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return float((high - low).abs().max())


def train(
    cfg: CosaConfig,
    out: Path,
    device: str = "auto",
    resume: bool = False,
    max_iters: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one run in this process (a DDP rank when launched by torchrun).

    With `resume`, the run's own config (from `checkpoints/last.pt`) is used and `cfg` is ignored;
    `max_iters` may still lengthen or shorten the run.
    """
    keep_freed_memory()  # each step re-allocates hundreds of MB of temporaries (cosa.allocator)
    ctx = setup_distributed(device)
    try:
        return Trainer(cfg, out, ctx, resume, max_iters=max_iters).run(progress=progress)
    finally:
        teardown_distributed()
