"""The CoSA training loop (METHOD.md), read top-down: set-up, then one function per phase.

One step: the assignment network (EMA teacher) makes multi-scale pseudo-labels from the weak view
without autograd; the online network (student) sees the strong view; the objective swaps the
assignments (CAM -> seg, seg -> CAM) and adds the regulariser and the three techniques; AdamW
steps; the teacher follows by EMA. Everything a resume needs goes into `checkpoints/last.pt`,
atomically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cosa import __version__
from cosa.allocator import keep_freed_memory
from cosa.checkpoint import Checkpoint, load_checkpoint, restore_scaler, save_checkpoint
from cosa.config import CosaConfig, dump_yaml
from cosa.data import DatasetIndex, EvalDataset, TrainDataset, open_dataset, write_synthetic_dataset
from cosa.data.check import check_dataset, list_splits
from cosa.data.problems import raise_on_errors
from cosa.errors import CheckpointError, ConfigError, DataError
from cosa.evaluation.evaluate import CamQuality, EvalResult, evaluate
from cosa.evaluation.predictors import DeployPredictor, normalised_image
from cosa.files import remove_stale_temporaries
from cosa.losses import CosaObjective
from cosa.model import CosaNet, build_model, ema_update, make_teacher
from cosa.pseudo import (
    DynamicThresholds,
    TeacherOutput,
    box_mask,
    cam_pseudo_label,
    seg_pseudo_label,
    teacher_forward,
)
from cosa.train.distributed import (
    DistContext,
    barrier,
    broadcast_from_main,
    setup_distributed,
    teardown_distributed,
)
from cosa.train.rng import restore_rng_state, rng_state, seed_everything
from cosa.train.runlog import DeferredScalars, MetricsLog, read_metrics
from cosa.train.sampler import ResumableSampler
from cosa.train.schedule import build_optimizer, build_scheduler
from cosa.train.selection import Selection, resolve_select_metric
from cosa.train.visualize import cam_picture, save_curves, save_grid

log = logging.getLogger(__name__)

# Images whose median long side exceeds this many crops get a warning: the preset's crops (and its
# 0.5-2x rescale) are sized for VOC's ~500 px images, not for 12-megapixel photos.
LARGE_IMAGE_FACTOR = 4


@dataclass
class TrainResult:
    """What a finished run produced. Scores are fractions in [0, 1].

    `best_score` is the selection criterion's value (`selection_metric`: miou, tag_f1, ...) of
    `best_checkpoint` on the selection split, reached at `best_iteration`.
    """

    out: Path
    iterations: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    selection_metric: str
    best_score: float | None
    best_iteration: int | None
    test: dict[str, Any] | None
    seconds_per_iter: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "iterations": self.iterations,
            "last_checkpoint": str(self.last_checkpoint),
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "selection_metric": self.selection_metric,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
            "test": self.test,
            "seconds_per_iter": self.seconds_per_iter,
            **self.extra,
        }


def _autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast only ever on CUDA: bf16 where supported, else fp16; None = full precision."""
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "fp16":
        return torch.float16
    if choice == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """Keep BatchNorm statistics fixed (eval mode); small per-device batches would corrupt them."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """Owns the networks, optimiser, data and run folder of one training run (one process)."""

    def __init__(
        self,
        cfg: CosaConfig,
        out: Path,
        ctx: DistContext,
        resume: bool,
        max_iters: int | None = None,
    ) -> None:
        self.out = out
        self.ctx = ctx
        self.ckpt_dir = out / "checkpoints"
        last = self.ckpt_dir / "last.pt"
        resumed: Checkpoint | None = None
        if resume:
            if not last.is_file():
                raise CheckpointError(
                    f"--resume: no checkpoint at {last}; start the run without --resume"
                )
            remove_stale_temporaries(self.ckpt_dir)  # left by a save that was killed midway
            resumed = load_checkpoint(last, map_location="cpu")
            cfg = resumed.config  # a resumed run keeps its own config; only the length may change
        elif last.exists():
            raise ConfigError(
                f"{out} already holds a run ({last}); pass --resume to continue it or "
                "choose another --out"
            )
        if max_iters is not None:
            cfg = replace(cfg, train=replace(cfg.train, max_iters=max_iters))
        self.cfg = cfg
        # The data is checked before anything is written: a refused run leaves no run folder.
        self.train_index, self.val_index, self.test_index = self._open_data(
            resumed.class_names if resumed is not None else None
        )
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            dump_yaml(cfg, out / "config.yaml")
        self.class_names = list(self.train_index.class_names)
        self.palette = [list(map(int, c)) for c in self.train_index.palette]
        num_fg = len(self.class_names) - 1
        self.selection = Selection(
            resolve_select_metric(
                cfg.train.select_metric, self.val_index, cfg.train.eval_max_images
            ),
            self.val_index.split,
        )

        seed_everything(cfg.train.seed)
        initialised = resumed is None and cfg.model.init_checkpoint is not None
        self.student: CosaNet = build_model(
            cfg.model, num_classes=num_fg, load_pretrained=resumed is None and not initialised
        ).to(ctx.device)
        if initialised:
            self._initialise(Path(cfg.model.init_checkpoint))
        self.teacher: CosaNet = make_teacher(
            self.student, copy_heads=cfg.model.copy_heads_to_teacher or initialised
        ).to(ctx.device)
        self.teacher.eval()
        self.optimizer = build_optimizer(
            self.student.param_groups(
                cfg.optim.lr, cfg.optim.head_lr_scale, cfg.optim.weight_decay
            ),
            cfg.optim,
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_iters)
        self.amp_dtype = _autocast_dtype(cfg.train.amp, ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if cfg.train.supervision not in ("weak", "full"):
            raise ConfigError(
                f"train.supervision must be weak or full, got {cfg.train.supervision!r}"
            )
        self.objective = CosaObjective(cfg)
        per_side = max(1, cfg.data.crop_size // cfg.thresholds.stride)
        self.thresholds = {
            "main": DynamicThresholds(
                cfg.pseudo.low_threshold,
                cfg.pseudo.high_threshold,
                cfg.thresholds.queue_images,
                per_side * per_side,
                cfg.thresholds.min_value,
                cfg.thresholds.ema,
                cfg.thresholds.em_iters,
                device=ctx.device,
                seed=cfg.train.seed,
            ),
            "aux": DynamicThresholds(
                cfg.pseudo.aux_low_threshold,
                cfg.pseudo.aux_high_threshold,
                cfg.thresholds.queue_images,
                per_side * per_side,
                cfg.thresholds.min_value,
                cfg.thresholds.ema,
                cfg.thresholds.em_iters,
                device=ctx.device,
                seed=cfg.train.seed + 1,
            ),
        }
        self.iteration = 0
        if resumed is not None:
            self._restore(resumed)
        self.model: torch.nn.Module = self.student
        if ctx.distributed:
            self.model = DistributedDataParallel(
                self.student,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=True,  # decoder and heads get no gradient during the warm-up
            )
        self.batches = self._loader()
        self.metrics = (
            MetricsLog(out / "metrics.jsonl", resume_iteration=self.iteration if resume else None)
            if ctx.is_main
            else None
        )
        self.vis_rows = self._fixed_vis_images()

    # ------------------------------------------------------------------------------------- set-up

    def _open_data(
        self, class_names: list[str] | None
    ) -> tuple[DatasetIndex, DatasetIndex, DatasetIndex | None]:
        """Check the data (rank 0; every rank refuses on an error), then open its splits.

        A resumed run passes its checkpoint's class list, so a tagged folder keeps its ids. The
        test split is optional: a folder without it (a user's own data) is trained without.
        """
        data = self.cfg.data
        if data.root is None:
            root = self.out / "data"
            if self.ctx.is_main and not (root / "classes.json").exists():
                log.info("writing the embedded synthetic dataset to %s", root)
                write_synthetic_dataset(
                    root, data.synth_train, data.synth_val, data.synth_test, seed=data.synth_seed
                )
            barrier(self.ctx)
        else:
            root = Path(data.root)
        split_args = {
            "class_names": class_names,
            "val_fraction": data.val_fraction,
            "split_seed": data.split_seed,
        }
        splits = [data.train_split, data.val_split]
        test_split = data.test_split
        if test_split and test_split not in list_splits(root, data.val_fraction, data.split_seed):
            log.info("%s has no %r split: no test report", root, test_split)
            test_split = None
        failure = None
        checked: dict[str, DatasetIndex] = {}  # rank 0 reuses the splits the check opened
        if self.ctx.is_main:
            report = check_dataset(
                root,
                splits + ([test_split] if test_split else []),
                train_split=data.train_split,
                **split_args,
            )
            for problem in report.warnings:
                log.warning("%s", problem)
            side = report.median_long_side
            if side is not None and side > LARGE_IMAGE_FACTOR * data.crop_size:
                log.warning(
                    "the images' median long side is %d px, over %dx the %d px crops: a crop "
                    "sees a small part of an image, which its tags may not describe; downscale "
                    "the images (long side about twice the crop) or raise data.crop_size",
                    side,
                    LARGE_IMAGE_FACTOR,
                    data.crop_size,
                )
            try:
                raise_on_errors(report.problems, root)
            except DataError as exc:
                failure = str(exc)
            checked = report.indices
        failure = broadcast_from_main(failure, self.ctx)
        if failure is not None:
            raise DataError(failure)

        def opened(split: str) -> DatasetIndex:
            return checked[split] if split in checked else open_dataset(root, split, **split_args)

        train, val = opened(data.train_split), opened(data.val_split)
        test = opened(test_split) if test_split else None
        for index in (train, val):
            if len(index.samples) == 0:
                raise DataError(
                    f"{root}: split {index.split!r} is empty; add images to it (a tagged folder "
                    "without a split column: raise data.val_fraction)"
                )
        return train, val, test

    def _loader(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        if cfg.train.batch_size % self.ctx.world_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"{self.ctx.world_size} processes"
            )
        per_rank = cfg.train.batch_size // self.ctx.world_size
        dataset = TrainDataset(
            self.train_index,
            cfg.data.crop_size,
            (cfg.data.scale_min, cfg.data.scale_max),
            seed=cfg.train.seed,
            with_masks=cfg.train.supervision == "full",
        )
        sampler = ResumableSampler(
            len(dataset),
            per_rank,
            self.ctx.rank,
            self.ctx.world_size,
            seed=cfg.train.seed,
            start_iteration=self.iteration,
        )
        loader = DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
        )
        return iter(loader)

    def _initialise(self, path: Path) -> None:
        """Start the online network from the assignment network of another run's checkpoint.

        Raises:
            CheckpointError: unreadable, other classes, or another architecture.
        """
        init = load_checkpoint(path, map_location="cpu")
        if init.class_names != self.class_names:
            raise CheckpointError(
                f"model.init_checkpoint {path} predicts {init.class_names[1:]} but the data has "
                f"{self.class_names[1:]}; start from a checkpoint of the same classes"
            )
        missing, unexpected = self.student.load_state_dict(init.teacher, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"model.init_checkpoint {path} does not fit backbone {self.cfg.model.backbone!r} "
                f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); use the "
                "first run's model settings"
            )
        log.info("both networks start from the assignment network of %s", path)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.student.load_state_dict(ckpt.online)
        self.teacher.load_state_dict(ckpt.teacher)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler is not None:
            self.scheduler.load_state_dict(ckpt.scheduler)
        restore_scaler(self.scaler, ckpt.scaler)
        if ckpt.thresholds is not None:
            for name, state in ckpt.thresholds.items():
                self.thresholds[name].load_state_dict(state)
        if ckpt.rng is not None:
            restore_rng_state(ckpt.rng)
        self.iteration = ckpt.iteration
        self.selection.restore(ckpt.metrics)
        log.info("resumed from iteration %d", self.iteration)

    def _fixed_vis_images(self) -> list[dict[str, Any]]:
        if not self.ctx.is_main or self.cfg.train.vis_images <= 0:
            return []
        dataset = EvalDataset(self.val_index)
        return [dataset[i] for i in range(min(self.cfg.train.vis_images, len(dataset)))]

    # ----------------------------------------------------------------------------------- the loop

    def run(self, progress: bool = True) -> TrainResult:
        cfg = self.cfg
        bar = None
        if progress and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.train.max_iters,
                initial=self.iteration,
                desc="train",
                unit="it",
                dynamic_ncols=True,
            )
        timings: list[float] = []
        records = DeferredScalars()  # no per-step device sync for the log
        while self.iteration < cfg.train.max_iters:
            start = time.perf_counter()
            batch = next(self.batches)
            self.iteration += 1
            record = self._step(batch)  # queued on the device, not yet run
            # Waits for the previous step's device work, so the host stays at most one step
            # ahead and `elapsed` is the device's time per step once the loop is steady.
            previous = records.flush()
            elapsed = time.perf_counter() - start
            timings.append(elapsed)
            record.update(
                kind="step",
                iter=self.iteration,
                sec_per_it=elapsed,
                images_per_sec=cfg.train.batch_size / elapsed,
            )
            records.push(record)
            self._log_step(previous, bar)
            if bar is not None:
                bar.update(1)
            evaluating = (
                self.iteration % cfg.train.eval_every == 0 or self.iteration == cfg.train.max_iters
            )
            saving = (
                self.iteration % cfg.train.checkpoint_every == 0
                or self.iteration == cfg.train.max_iters
            )
            if evaluating or saving:  # the log catches up first: a NaN is never saved
                self._log_step(records.flush(), bar)
            if evaluating:
                self._evaluate_and_select()
            if saving:
                self._save(self.ckpt_dir / "last.pt")
        if bar is not None:
            bar.close()
        return self._finish(timings)

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimisation step; returns its metrics record (losses as 0-d device tensors)."""
        cfg, device = self.cfg, self.ctx.device
        batch = {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        self.model.train()
        _freeze_batchnorm(self.model)
        autocast = (
            torch.autocast(device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        step = self.iteration - 1  # 0-based, as the objective's warm-up rule counts
        full = cfg.train.supervision == "full"
        needs_teacher = not full and self.objective.warmup_factor(step) > 0.0
        with autocast:
            teacher = None
            thresholds = self._fixed_thresholds()
            if (
                needs_teacher
            ):  # no teacher pass during the warm-up: only cls + cls_aux are optimised
                teacher = teacher_forward(
                    self.teacher,
                    batch["weak"],
                    batch["label"],
                    scales=cfg.pseudo.scales,
                    flip=cfg.pseudo.flip,
                    aux_last_scale_only=cfg.pseudo.aux_last_scale_only,
                )
                thresholds = self._thresholds(teacher, batch["img_box"])
            student = self.model(batch["strong"])
            if full:
                result = supervised_objective(student, batch, cfg)
            else:
                result = self.objective(student, teacher, batch, thresholds, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        ema_update(self.teacher, self.student, cfg.optim.ema_momentum)

        # Device tensors stay tensors: `DeferredScalars` reads them back a step later.
        record: dict[str, Any] = {"loss/total": result.total.detach()}
        record.update({f"loss/{k}": v.detach() for k, v in result.terms.items()})
        record.update({f"lr/group{i}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        record.update(
            tau_low=thresholds["low"],
            tau_high=thresholds["high"],
            tau_aux_low=thresholds["aux_low"],
            tau_aux_high=thresholds["aux_high"],
        )
        return record

    def _log_step(self, record: dict[str, Any] | None, bar: Any) -> None:
        """Write a step record that `DeferredScalars` read back; stop on a non-finite loss."""
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

    def _fixed_thresholds(self) -> dict[str, Any]:
        """The thresholds in force: the dynamic ones' current values, or the configured ones."""
        if self.cfg.thresholds.enabled:
            main, aux = self.thresholds["main"], self.thresholds["aux"]
            return {"low": main.low, "high": main.high, "aux_low": aux.low, "aux_high": aux.high}
        p = self.cfg.pseudo
        return {
            "low": p.low_threshold,
            "high": p.high_threshold,
            "aux_low": p.aux_low_threshold,
            "aux_high": p.aux_high_threshold,
        }

    def _thresholds(self, teacher: TeacherOutput, img_box: torch.Tensor) -> dict[str, Any]:
        """Push this batch's teacher max-CAM through the dynamic search (METHOD.md 5.2)."""
        if not self.cfg.thresholds.enabled:
            return self._fixed_thresholds()
        stride = self.cfg.thresholds.stride
        height, width = teacher.cam.shape[-2:]
        inside = box_mask(img_box, height, width).float()[:, None]  # (B, 1, H, W)
        valid = F.avg_pool2d(inside, stride)[:, 0] > 0.5  # (B, h, w): cells mostly inside the image
        low, high = self.thresholds["main"].update(
            F.avg_pool2d(teacher.cam.float().amax(dim=1, keepdim=True), stride)[:, 0], valid
        )
        aux_low, aux_high = self.thresholds["aux"].update(
            F.avg_pool2d(teacher.aux_cam.float().amax(dim=1, keepdim=True), stride)[:, 0], valid
        )
        return {"low": low, "high": high, "aux_low": aux_low, "aux_high": aux_high}

    # ------------------------------------------------------------------------- evaluation, saving

    def _evaluate_and_select(self) -> None:
        """Score the teacher on the selection split (val) on rank 0; keep the best as best.pt."""
        if self.ctx.is_main:
            result = self.evaluate_teacher(self.val_index)
            record = {
                "kind": "eval",
                "iter": self.iteration,
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
                "score": getattr(result, self.selection.metric),
                "eval_seconds": result.seconds,
            }
            if self.metrics is not None:
                self.metrics.write(record)
            log.info(
                "iter %d: val %s %.4f (tag F1 %.4f)",
                self.iteration,
                self.selection.metric,
                record["score"],
                result.tag_f1,
            )
            self._save_grid()
            if self.selection.consider(record["score"], self.iteration):
                self._save(self.ckpt_dir / "best.pt")
        barrier(self.ctx)

    def evaluate_teacher(self, index: DatasetIndex, max_images: int | None = None) -> EvalResult:
        cfg = self.cfg
        limit = cfg.train.eval_max_images if max_images is None else max_images
        low, high = self._current_thresholds()
        quality = CamQuality(
            self.teacher, self.ctx.device, len(self.class_names), cfg.pseudo.scales, low, high
        )
        return evaluate(
            DeployPredictor(self.teacher, self.ctx.device),
            index,
            protocol="deploy",
            max_images=limit,
            cam_quality=quality,
        )

    def _current_thresholds(self) -> tuple[float, float]:
        current = self._fixed_thresholds()
        return float(current["low"]), float(current["high"])

    @torch.no_grad()
    def _save_grid(self) -> None:
        if not self.vis_rows:
            return
        device = self.ctx.device
        predictor = DeployPredictor(self.teacher, device)
        low, high = self._current_thresholds()
        rows = []
        for item in self.vis_rows:
            image, mask = item["image"], item["mask"]  # mask: None without ground truth
            height, width = image.shape[:2]
            x = normalised_image(image, device)
            label = torch.from_numpy(item["label"]).to(device)[None].float()
            teacher = teacher_forward(
                self.teacher, x, label, scales=self.cfg.pseudo.scales, flip=True
            )
            box = torch.tensor([[0, height, 0, width]], device=device)
            cpl = cam_pseudo_label(teacher.cam, box, low, high)[0].cpu().numpy()
            spl = seg_pseudo_label(teacher.seg, label, self.cfg.pseudo.seg_temperature).argmax(1)[0]
            rows.append(
                {
                    "image": image,
                    "CAM": cam_picture(image, teacher.cam.amax(dim=1)[0].cpu().numpy()),
                    "CPL": cpl,
                    "SPL": spl.cpu().numpy(),
                    "prediction": predictor(image).argmax(0),
                    "ground truth": mask,
                }
            )
        save_grid(rows, self.palette, self.out / "vis" / f"iter_{self.iteration:06d}.png")

    def _save(self, path: Path) -> None:
        if not self.ctx.is_main:
            return
        ckpt = Checkpoint(
            config=self.cfg,
            class_names=self.class_names,
            palette=self.palette,
            iteration=self.iteration,
            online=self.student.state_dict(),
            teacher=self.teacher.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_state(),
            thresholds={name: t.state_dict() for name, t in self.thresholds.items()},
            metrics=self.selection.to_dict(),
            package_version=__version__,
        )
        save_checkpoint(ckpt, path)

    def _rank_divergence(self) -> float:
        """Max |difference| of any student parameter between ranks (0.0 when in sync)."""
        flat = torch.cat([p.detach().float().flatten() for p in self.student.parameters()])
        high, low = flat.clone(), flat.clone()
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        return float((high - low).abs().max())

    def _finish(self, timings: list[float]) -> TrainResult:
        last = self.ckpt_dir / "last.pt"
        best = self.ckpt_dir / "best.pt"
        test = None
        if self.ctx.is_main:
            if self.metrics is not None:
                self.metrics.close()
                save_curves(read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png")
            if self.test_index is not None and best.is_file():
                best_ckpt = load_checkpoint(best, map_location=self.ctx.device)
                self.teacher.load_state_dict(best_ckpt.teacher)
                test = self.evaluate_teacher(self.test_index, max_images=0).to_json()
                test["checkpoint"] = str(best)
        sync = self._rank_divergence() if self.ctx.distributed else None
        steady = timings[min(len(timings) - 1, 3) :] if timings else []
        return TrainResult(
            out=self.out,
            iterations=self.iteration,
            last_checkpoint=last,
            best_checkpoint=best if best.is_file() else None,
            selection_metric=self.selection.metric,
            best_score=self.selection.best_score,
            best_iteration=self.selection.best_iteration,
            test=test,
            seconds_per_iter=float(np.mean(steady)) if steady else float("nan"),
            extra={
                "selection_split": self.val_index.split,
                "test_split": self.test_index.split if self.test_index else None,
                "world_size": self.ctx.world_size,
                "ddp_max_param_divergence": sync,
            },
        )


def supervised_objective(student: Any, batch: dict[str, torch.Tensor], cfg: CosaConfig) -> Any:
    """The fully supervised upper bound: cls + cls_aux + pixel cross-entropy on ground-truth masks.

    Same network, same views, same schedule as CoSA; only the seg stream's target changes.
    """
    from cosa.losses import ObjectiveResult, classification_loss

    size = batch["mask"].shape[-2:]
    seg = F.interpolate(student.seg.float(), size=size, mode="bilinear", align_corners=False)
    terms = {
        "cls": classification_loss(student.cls_logits.float(), batch["label"]),
        "cls_aux": classification_loss(student.aux_cls_logits.float(), batch["label"]),
        "seg": F.cross_entropy(seg, batch["mask"], ignore_index=255),
    }
    weighted = {
        "cls": cfg.loss.cls_weight * terms["cls"],
        "cls_aux": cfg.loss.cls_aux_weight * terms["cls_aux"],
        "seg": terms["seg"],
    }
    total = sum(weighted.values())
    return ObjectiveResult(
        total=total,
        terms={k: v.detach() for k, v in terms.items()},
        weighted={k: v.detach() for k, v in weighted.items()},
        maps=None,
    )


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
