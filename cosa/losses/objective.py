"""The whole CoSA training objective of one step (METHOD.md sections 4 and 5).

`CosaObjective(cfg)(student, teacher, batch, thresholds, iteration)` turns the online network's
output on the strong view and the teacher's fused output on the weak view into the weighted total
loss, the per-term values for logging, and the pseudo-label maps for pictures.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from cosa.config import CosaConfig
from cosa.data import denormalize
from cosa.errors import ConfigError, DataError
from cosa.losses.classification import classification_loss
from cosa.losses.crf import crf_energy_loss
from cosa.losses.reliability import reliability_pseudo_label
from cosa.losses.separation import contrastive_separation_loss, labels_at_cell_centres
from cosa.losses.swapped import cam2seg_loss, seg2cam_loss
from cosa.model.outputs import NetOutput
from cosa.pseudo import (
    IGNORE_INDEX,
    TeacherOutput,
    box_mask,
    cam_pseudo_label,
    seg_pseudo_label,
)

TERM_NAMES = ("cls", "cls_aux", "seg", "cam", "reg", "csp")
# Terms that the warm-up switch never scales.
_ALWAYS_ON = frozenset({"cls", "cls_aux"})


class ObjectiveResult(NamedTuple):
    """What one call of `CosaObjective` returns.

    Attributes:
        total: 0-d float32 loss to back-propagate (weights and warm-up applied).
        terms: detached 0-d tensors, UNWEIGHTED: cls, cls_aux, seg (cam2seg), cam (seg2cam),
            reg (CRF energy), csp (0 when off), plus `warmup_factor` (the multiplier of the
            non-classification terms: 0 in warm-up, then the ramp, then 1).
        weighted: detached 0-d tensors, the contribution of each term to `total` (config weight x
            warm-up factor); they sum to `total`.
        maps: pseudo-label maps at crop size for pictures (None during the warm-up):
            `cpl`, `cpl_aux` (B, H, W) int64 dual-threshold CPLs; `spl` (B, H, W) int64 argmax of
            Q, 255 outside the box; `weight` (B, H, W) float32 RAW weights of the main CAM, or
            None when RAW is off.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weighted: dict[str, Tensor]
    maps: dict[str, Tensor | None] | None


class CosaObjective:
    """Callable that computes the CoSA loss of one step from a config.

    Warm-up: for `iteration <= cfg.loss.warmup_iters` only cls + cls_aux are computed; the other
    terms are reported as 0 and `maps` is None (evaluating them only for logging would add several
    hundred ms per step on a CPU at the demo size), so no teacher output is needed then.
    After the switch the other terms are multiplied by a linear ramp over `cfg.loss.warmup_ramp`
    iterations (1 at once when the ramp is 0, as in the reference).

    Losses are computed in float32 with autocast disabled, whatever the caller's autocast state.

    Args:
        cfg: the resolved run configuration (reads `loss`, `pseudo`, `reliability`, `separation`).

    Raises:
        ConfigError: a weight is negative or the ramp is negative.
    """

    def __init__(self, cfg: CosaConfig) -> None:
        loss = cfg.loss
        weights = {
            "loss.cls_weight": loss.cls_weight,
            "loss.cls_aux_weight": loss.cls_aux_weight,
            "loss.seg_weight": loss.seg_weight,
            "loss.cam_weight": loss.cam_weight,
            "loss.reg_weight": loss.reg_weight,
            "separation.weight": cfg.separation.weight,
        }
        negative = [f"{name}={value}" for name, value in weights.items() if value < 0]
        if negative:
            raise ConfigError(f"loss weights must be >= 0, got {', '.join(negative)}")
        if loss.warmup_ramp < 0:
            raise ConfigError(f"loss.warmup_ramp must be >= 0, got {loss.warmup_ramp}")
        self.cfg = cfg
        self.weights = {
            "cls": loss.cls_weight,
            "cls_aux": loss.cls_aux_weight,
            "seg": loss.seg_weight,
            "cam": loss.cam_weight,
            "reg": loss.reg_weight,
            "csp": cfg.separation.weight if cfg.separation.enabled else 0.0,
        }

    def warmup_factor(self, iteration: int) -> float:
        """Multiplier of the non-classification terms at `iteration` (0-based, as the reference)."""
        start = self.cfg.loss.warmup_iters
        if iteration <= start:
            return 0.0
        ramp = self.cfg.loss.warmup_ramp
        return 1.0 if ramp == 0 else min(1.0, (iteration - start) / ramp)

    def __call__(
        self,
        student: NetOutput,
        teacher: TeacherOutput | None,
        batch: dict[str, Tensor],
        thresholds: dict[str, float | Tensor],
        iteration: int,
    ) -> ObjectiveResult:
        """Compute the loss of one step.

        Args:
            student: online-network output on `batch["strong"]`.
            teacher: `teacher_forward` output on `batch["weak"]`; unused (may be None) during
                the warm-up.
            batch: `strong` (B, 3, H, W) ImageNet-normalised, `label` (B, C) in {0, 1},
                `img_box` (B, 4) `[h0, h1, w0, w1]`; other keys are ignored.
            thresholds: `low`, `high`, `aux_low`, `aux_high` (floats or 0-d tensors); unused
                during the warm-up.
            iteration: 0-based step number, compared with `cfg.loss.warmup_iters`.

        Returns:
            ObjectiveResult.

        Raises:
            DataError: the labels do not match the network's classes.
            ConfigError: no teacher output after the warm-up, or a threshold key is missing.
        """
        labels = batch["label"]
        if labels.shape != student.cls_logits.shape:
            raise DataError(
                f"image labels have shape {tuple(labels.shape)} but the network predicts "
                f"{tuple(student.cls_logits.shape)}; the dataset's class count must match "
                "the model's"
            )
        factor = self.warmup_factor(iteration)
        if factor > 0 and teacher is None:
            raise ConfigError(
                f"iteration {iteration} is past loss.warmup_iters; a teacher output is required"
            )
        missing = {"low", "high", "aux_low", "aux_high"} - set(thresholds)
        if factor > 0 and missing:
            raise ConfigError(f"thresholds lack {sorted(missing)}")

        device_type = student.cls_logits.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            terms = {
                "cls": classification_loss(student.cls_logits, labels),
                "cls_aux": classification_loss(student.aux_cls_logits, labels),
            }
            zero = terms["cls"].new_zeros(())
            maps: dict[str, Tensor | None] | None = None
            if factor > 0 and teacher is not None:
                swapped, maps = self._swapped_terms(student, teacher, batch, thresholds)
                terms.update(swapped)
            for name in TERM_NAMES:
                terms.setdefault(name, zero)

            weighted = {
                name: terms[name] * self.weights[name] * (1.0 if name in _ALWAYS_ON else factor)
                for name in TERM_NAMES
            }
            total = torch.stack(list(weighted.values())).sum()

        detached = {name: value.detach() for name, value in terms.items()}
        detached["warmup_factor"] = zero.detach() + factor
        return ObjectiveResult(
            total=total,
            terms=detached,
            weighted={name: value.detach() for name, value in weighted.items()},
            maps=maps,
        )

    def _swapped_terms(
        self,
        student: NetOutput,
        teacher: TeacherOutput,
        batch: dict[str, Tensor],
        thresholds: dict[str, float | Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
        """seg, cam, reg, csp (when enabled), plus the pseudo-label maps."""
        cfg = self.cfg
        labels, img_box = batch["label"], batch["img_box"]
        height, width = teacher.cam.shape[-2:]
        seg = F.interpolate(
            student.seg.float(), size=(height, width), mode="bilinear", align_corners=False
        )  # (B, C+1, H, W)

        cpl = cam_pseudo_label(teacher.cam, img_box, thresholds["low"], thresholds["high"])
        cpl_aux = cam_pseudo_label(
            teacher.aux_cam, img_box, thresholds["aux_low"], thresholds["aux_high"]
        )
        main_weight: Tensor | None = None
        if cfg.reliability.enabled:
            raw = cfg.reliability
            main_label, main_weight = reliability_pseudo_label(
                teacher.cam,
                labels,
                img_box,
                thresholds["low"],
                thresholds["high"],
                raw.temperature,
                raw.beta,
                raw.keep_ignore_band,
            )
            aux_label, aux_weight = reliability_pseudo_label(
                teacher.aux_cam,
                labels,
                img_box,
                thresholds["aux_low"],
                thresholds["aux_high"],
                raw.temperature,
                raw.beta,
                raw.keep_ignore_band,
            )
            seg_term = cam2seg_loss(
                seg,
                main_label,
                aux_label,
                cfg.loss.aux_cam2seg_mix,
                cfg.loss.fg_alpha,
                main_weight,
                aux_weight,
            )
        else:
            seg_term = cam2seg_loss(seg, cpl, cpl_aux, cfg.loss.aux_cam2seg_mix, cfg.loss.fg_alpha)

        q = seg_pseudo_label(teacher.seg, labels, cfg.pseudo.seg_temperature)  # (B, C+1, H, W)
        inside = box_mask(img_box, height, width)
        # max().indices == argmax (first maximum), ~4x faster on the CPU over the channel dim.
        spl = q.max(dim=1).indices.masked_fill(~inside, IGNORE_INDEX)  # (B, H, W)
        terms = {"seg": seg_term, "cam": seg2cam_loss(student.cam, q)}
        maps: dict[str, Tensor | None] = {
            "cpl": cpl,
            "cpl_aux": cpl_aux,
            "spl": spl,
            "weight": main_weight,
        }
        image = denormalize(batch["strong"])  # (B, 3, H, W) in 0-255
        with record_function("cosa.crf"):
            terms["reg"] = crf_energy_loss(
                torch.softmax(seg, dim=1),
                image,
                inside.float(),
                cpl == IGNORE_INDEX,
                cfg.loss.crf_sigma_rgb,
                cfg.loss.crf_sigma_xy,
                cfg.loss.crf_window,
                cfg.loss.crf_dilation,
            )
        if cfg.separation.enabled:
            grid = student.features.shape[-2:]
            spl_small = labels_at_cell_centres(spl, grid)  # (B, h, w)
            weight_small = None
            if main_weight is not None:  # average reliability of the pixels a feature covers
                weight_small = F.adaptive_avg_pool2d(main_weight[:, None], grid)[:, 0]
            with record_function("cosa.csp"):
                terms["csp"] = contrastive_separation_loss(
                    student.features,
                    teacher.features,
                    spl_small,
                    labels.shape[1],
                    weight_small,
                    cfg.separation.temperature,
                )
        return terms, maps
