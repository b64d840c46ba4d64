"""`cosa eval` for checkpoints: build the predictor of the chosen protocol and score a split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cosa.checkpoint import Checkpoint, build_teacher_from_checkpoint, load_checkpoint
from cosa.choices import DEFAULT_EVAL_SCALES, EvalProtocol, parse_choice
from cosa.data import DatasetIndex, open_dataset
from cosa.device import resolve_device
from cosa.evaluation.evaluate import CamQuality, EvalResult, evaluate
from cosa.evaluation.predictors import (
    DeployPredictor,
    NativeMultiScalePredictor,
    PaperProtocolPredictor,
    Predictor,
)


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path,
    split: str = "val",
    protocol: str = "deploy",
    scales: Sequence[float] = DEFAULT_EVAL_SCALES,
    flip: bool = True,
    with_cam: bool = True,
    max_images: int = 0,
    device: str = "auto",
) -> EvalResult:
    """Score the assignment network (teacher) of `checkpoint` on `data`/`split`.

    `protocol`: "deploy" (native size, single scale: what `cosa segment` writes), "paper" (448x448,
    `scales` + `flip`) or "tta" (native size, `scales` + `flip`). The CAM and CPL scores use the
    checkpoint's teacher scales and flip (`pseudo.scales`, `pseudo.flip`) except under "tta",
    where they use `scales` and `flip` too, so a CAM-only model and a seg stream can be compared
    with the same augmentation.

    The result's `extra["checkpoint"]` holds the checkpoint's iteration and how its run chooses
    best.pt (`selection_metric`, `selection_split`, `best_score`, `best_iteration`).

    Raises:
        ConfigError: unknown protocol. CheckpointError: unreadable checkpoint. DataError: bad
        dataset, or its classes do not match the checkpoint's.
    """
    protocol = parse_choice(EvalProtocol, protocol, "protocol").value
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=torch_device)
    index = open_checkpoint_data(ckpt, data, split)
    net = build_teacher_from_checkpoint(ckpt).to(torch_device)
    predictor: Predictor
    if protocol == "paper":
        predictor = PaperProtocolPredictor(net, torch_device, scales=scales, flip=flip)
    elif protocol == "tta":
        predictor = NativeMultiScalePredictor(net, torch_device, scales=scales, flip=flip)
    else:
        predictor = DeployPredictor(net, torch_device)
    quality = None
    if with_cam:
        thresholds = (ckpt.thresholds or {}).get("main") or {}
        low = float(thresholds.get("low", ckpt.config.pseudo.low_threshold))
        high = float(thresholds.get("high", ckpt.config.pseudo.high_threshold))
        cam_scales, cam_flip = (
            (tuple(scales), flip)
            if protocol == "tta"
            else (ckpt.config.pseudo.scales, ckpt.config.pseudo.flip)
        )
        quality = CamQuality(
            net, torch_device, len(index.class_names), cam_scales, low, high, flip=cam_flip
        )
    result = evaluate(
        predictor, index, protocol=protocol, max_images=max_images, cam_quality=quality
    )
    result.extra["checkpoint"] = {"iteration": ckpt.iteration, **ckpt.metrics}
    warning = selection_warning(ckpt, data, split)
    result.extra["warnings"] = [warning] if warning else []
    return result


def selection_warning(ckpt: Checkpoint, data: Path, split: str) -> str | None:
    """A warning when `split` of `data` is the split whose score chose `ckpt` as its run's best.

    Such a score is optimistic (METHOD.md 7, caveat 2): the checkpoint won a comparison on those
    very images. A run on the embedded synthetic set (no `data.root`) matches any `data`.
    """
    metrics = ckpt.metrics
    if metrics.get("best_iteration") != ckpt.iteration or metrics.get("selection_split") != split:
        return None
    root = ckpt.config.data.root
    if root is not None and Path(root).resolve() != Path(data).resolve():
        return None
    return (
        f"split {split!r} chose this checkpoint (the best {metrics.get('selection_metric')} "
        f"of its run at iteration {ckpt.iteration}), so its score there is optimistic; report a "
        "split that did not select it (e.g. --split test)"
    )


def open_checkpoint_data(ckpt: Checkpoint, data: Path, split: str) -> DatasetIndex:
    """Open `split` of `data` as the checkpoint's run saw it: its class ids, and for a tagged
    folder without a split column its seeded split.

    Raises:
        DataError: bad dataset, or classes that differ from the checkpoint's.
    """
    return open_dataset(
        data,
        split,
        class_names=ckpt.class_names,
        val_fraction=ckpt.config.data.val_fraction,
        split_seed=ckpt.config.data.split_seed,
    )
