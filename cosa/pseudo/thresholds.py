"""Dynamic threshold search: a queue of max-CAM values and a batched EM mixture (METHOD.md 5.2).

The reference fits scikit-learn's GaussianMixture on the CPU every step. Here the queue lives on the
training device and the 1-D mixture is fitted with a fixed number of vectorised EM iterations in
torch, with no host synchronisation: degenerate cases (no data, constant data, an empty mode) are
resolved with `torch.where`, never with Python branches on tensor values. So `update` can run every
step without stalling a GPU; read the thresholds with `.item()` only when logging.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.errors import CheckpointError, ConfigError
from cosa.pseudo.labels import box_mask

# Added to every component variance, as scikit-learn's `reg_covar` does, so a component that
# collapses onto one repeated value keeps a finite likelihood.
VARIANCE_FLOOR = 1e-6
# A component whose total responsibility falls below this keeps its previous mean/variance.
_DEAD_MASS = 1e-8
_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture1D(NamedTuple):
    """A fitted 1-D Gaussian mixture, components sorted by increasing mean.

    Attributes:
        means: (k,) float32.
        variances: (k,) float32, each >= VARIANCE_FLOOR.
        weights: (k,) float32 mixing proportions, summing to 1 (0 for a component with no mass).
        assignment: (N,) int64 most likely component of each value; -1 where masked out.
    """

    means: Tensor
    variances: Tensor
    weights: Tensor
    assignment: Tensor


def _log_joint(values: Tensor, means: Tensor, variances: Tensor, weights: Tensor) -> Tensor:
    """(k, N) log(weight_k * Normal(value | mean_k, variance_k)).

    Components are the leading dimension so that every reduction over N runs along contiguous
    memory (about 4x faster on the CPU than the (N, k) layout).
    """
    const = weights.clamp_min(1e-30).log() - 0.5 * (_LOG_2PI + variances.log())  # (k,)
    diff = values[None, :] - means[:, None]  # (k, N)
    return const[:, None] - diff.square() / (2.0 * variances[:, None])


def _initial_means(data: Tensor, mask: Tensor, k: int) -> Tensor:
    """(k,) evenly spaced quantiles of the valid values: [min, median, max] for k = 3."""
    hidden = torch.where(mask, data, torch.full_like(data, math.nan))
    if k == 3:  # the reference's case; nanmedian is much cheaper than a full quantile sort
        low = torch.where(mask, data, torch.full_like(data, math.inf)).amin()
        high = torch.where(mask, data, torch.full_like(data, -math.inf)).amax()
        means = torch.stack([low, hidden.nanmedian(), high])
    else:
        levels = torch.linspace(0.0, 1.0, k, device=data.device)
        means = torch.nanquantile(hidden, levels, interpolation="lower")
    return torch.where(torch.isfinite(means), means, torch.zeros_like(means))  # no valid value


def fit_gaussian_mixture_1d(
    values: Tensor, k: int = 3, iters: int = 10, mask: Tensor | None = None
) -> GaussianMixture1D:
    """Fit a 1-D Gaussian mixture by EM, fully vectorised and without host synchronisation.

    Initialisation as in the reference: means at the k evenly spaced quantiles of the data
    ([min, median, max] for k = 3), equal weights; every variance starts at the data variance
    (the reference uses unit precision, far too broad for values in [0, 1]).
    After `iters` EM steps the components are sorted by mean and each value is assigned to its
    most responsible component.

    Args:
        values: (N,) values (any float dtype; fitted in float32).
        k: number of components, >= 1.
        iters: EM iterations, >= 1.
        mask: optional (N,) bool; False entries are ignored by the fit and get assignment -1.

    Returns:
        GaussianMixture1D. With no valid value the parameters are meaningless (means 0) and every
        assignment is -1; callers decide what to do in that case.

    Raises:
        ConfigError: `k` or `iters` is smaller than 1, or `mask` does not match `values`.
    """
    if k < 1 or iters < 1:
        raise ConfigError(f"fit_gaussian_mixture_1d needs k >= 1 and iters >= 1, got {k}, {iters}")
    if mask is not None and mask.shape != values.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    data = values.detach().reshape(-1).float()
    mask = torch.ones_like(data, dtype=torch.bool) if mask is None else mask.reshape(-1)
    live = mask.float()
    total = live.sum().clamp_min(1.0)

    means = _initial_means(data, mask, k)
    centre = (data * live).sum() / total
    spread = ((data - centre).square() * live).sum() / total
    variances = spread.clamp_min(VARIANCE_FLOOR).expand(k).clone()
    weights = torch.full((k,), 1.0 / k, device=data.device)

    for _ in range(iters):
        resp = torch.softmax(_log_joint(data, means, variances, weights), dim=0) * live  # (k, N)
        mass = resp.sum(dim=1)  # (k,)
        alive = mass > _DEAD_MASS
        safe = mass.clamp_min(_DEAD_MASS)
        new_means = (resp * data).sum(dim=1) / safe
        new_vars = (resp * (data[None, :] - new_means[:, None]).square()).sum(dim=1) / safe
        means = torch.where(alive, new_means, means)
        variances = torch.where(alive, new_vars + VARIANCE_FLOOR, variances)
        weights = mass / total

    order = means.argsort()
    means, variances, weights = means[order], variances[order], weights[order]
    # max().indices == argmax (first maximum), but ~8x faster on the CPU for a non-last dim.
    best = _log_joint(data, means, variances, weights).max(dim=0).indices
    assignment = torch.where(mask, best, torch.full_like(best, -1))
    return GaussianMixture1D(means, variances, weights, assignment)


def queue_values(cam: Tensor, img_box: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Per-pixel max-CAM pooled to the queue grid, with the validity of each cell.

    Args:
        cam: (B, C, H, W) teacher CAM in [0, 1] (absent classes zeroed).
        img_box: (B, 4) `[h0, h1, w0, w1]` valid region of each crop.
        stride: pooling window and step (16: 448 -> 28 x 28 on VOC).

    Returns:
        max_cam: (B, H // stride, W // stride) float32, `max_c cam` averaged over each cell.
        valid: (B, H // stride, W // stride) bool, cells that lie mostly inside the box (padding
            cells would otherwise flood the queue with near-zero values).

    Raises:
        ConfigError: `stride` < 1 or larger than the crop.
    """
    height, width = cam.shape[-2:]
    if stride < 1 or stride > min(height, width):
        raise ConfigError(f"thresholds.stride must be in [1, {min(height, width)}], got {stride}")
    peak = cam.detach().float().amax(dim=1, keepdim=True)  # (B, 1, H, W)
    max_cam = F.avg_pool2d(peak, stride)[:, 0]  # (B, H // stride, W // stride)
    inside = box_mask(img_box, height, width)[:, None].float()
    valid = F.avg_pool2d(inside, stride)[:, 0] > 0.5
    return max_cam, valid


class DynamicThresholds:
    """Dual CAM thresholds that follow the modes of recent teacher max-CAM values.

    Every `update` pushes one batch of per-pixel `max_c CAM` maps into a ring buffer of
    `queue_images` rows, drops values <= `min_value`, fits a 3-component 1-D mixture and takes
    tau_l' = the largest value of the low component, tau_h' = the smallest value of the high
    component; then `tau <- ema * tau + (1 - ema) * tau'`. When the data is degenerate (nothing
    above `min_value`, constant values, an empty low/high component, or a result with
    tau_l >= tau_h) the previous thresholds are kept.

    The queue starts as seeded U(0, 1) noise, like the reference, so the first fits see mostly
    noise and the EMA moves the thresholds slowly away from their initial values.
    Under torch.distributed each rank holds its own queue (as the reference does per GPU); gather
    `max_cam` across ranks before `update` if the ranks must agree.

    Args:
        init_low: initial tau_l in [0, 1).
        init_high: initial tau_h in (init_low, 1].
        queue_images: rows of the ring buffer (200 on VOC).
        values_per_image: values per row, i.e. h * w of the pooled max-CAM (784 = 28 x 28 on VOC).
        min_value: values <= this are excluded from the fit (>= 0).
        ema: EMA decay in [0, 1).
        em_iters: EM iterations per update.
        device: where the queue and the thresholds live (the training device).
        seed: seed of the initial noise.

    Raises:
        ConfigError: an argument is out of range.
    """

    def __init__(
        self,
        init_low: float,
        init_high: float,
        queue_images: int,
        values_per_image: int,
        min_value: float = 0.05,
        ema: float = 0.99,
        em_iters: int = 10,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        if not 0.0 <= init_low < init_high <= 1.0:
            raise ConfigError(
                f"thresholds need 0 <= low < high <= 1, got low={init_low}, high={init_high}"
            )
        if queue_images < 1 or values_per_image < 1:
            raise ConfigError(
                f"thresholds.queue_images ({queue_images}) and the values per image "
                f"({values_per_image}) must be >= 1"
            )
        if min_value < 0.0 or not 0.0 <= ema < 1.0 or em_iters < 1:
            raise ConfigError(
                f"thresholds need min_value >= 0, 0 <= ema < 1, em_iters >= 1; got "
                f"min_value={min_value}, ema={ema}, em_iters={em_iters}"
            )
        self.device = torch.device(device)
        self.min_value = float(min_value)
        self.ema = float(ema)
        self.em_iters = int(em_iters)
        generator = torch.Generator().manual_seed(seed)  # CPU noise: identical on every device
        noise = torch.rand(queue_images, values_per_image, generator=generator)
        self._queue = noise.to(self.device)
        self._pointer = 0
        self._low = torch.tensor(float(init_low), device=self.device)
        self._high = torch.tensor(float(init_high), device=self.device)

    @property
    def low(self) -> Tensor:
        """Current tau_l, a 0-d float32 tensor on `device`."""
        return self._low

    @property
    def high(self) -> Tensor:
        """Current tau_h, a 0-d float32 tensor on `device`."""
        return self._high

    def _push(self, rows: Tensor) -> None:
        capacity = self._queue.shape[0]
        if rows.shape[0] >= capacity:  # a batch larger than the queue: keep its newest rows
            self._queue.copy_(rows[-capacity:])
            self._pointer = 0
            return
        slots = (self._pointer + torch.arange(rows.shape[0], device=self.device)) % capacity
        self._queue.index_copy_(0, slots, rows)
        self._pointer = (self._pointer + rows.shape[0]) % capacity

    def update(self, max_cam: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Push one batch of max-CAM maps, refit, and move the thresholds.

        Args:
            max_cam: (B, h, w) per-pixel max over classes of the teacher CAM, in [0, 1], with
                h * w == values_per_image (pool it to the queue's grid first).
            valid: optional (B, h, w) bool; False pixels (e.g. padding outside `img_box`) are
                stored as 0, so they fall below `min_value` and are never fitted.

        Returns:
            (low, high): the new 0-d thresholds on `device` (fresh tensors, never mutated later).

        Raises:
            ConfigError: the maps do not have `values_per_image` pixels.
        """
        rows = max_cam.detach().to(self.device, torch.float32).flatten(1)  # (B, h*w)
        if rows.shape[1] != self._queue.shape[1]:
            raise ConfigError(
                f"dynamic thresholds expect {self._queue.shape[1]} values per image, got max-CAM "
                f"maps of shape {tuple(max_cam.shape[1:])}; pool them to the queue grid "
                "(data.crop_size / thresholds.stride per side)"
            )
        if valid is not None:
            rows = torch.where(valid.to(self.device).flatten(1), rows, torch.zeros_like(rows))
        self._push(rows)

        values = self._queue.reshape(-1)
        keep = values > self.min_value
        fit = fit_gaussian_mixture_1d(values, k=3, iters=self.em_iters, mask=keep)
        inf = torch.full_like(values, math.inf)
        cand_low = torch.where(fit.assignment == 0, values, -inf).amax()
        cand_high = torch.where(fit.assignment == 2, values, inf).amin()
        spread = torch.where(keep, values, -inf).amax() - torch.where(keep, values, inf).amin()

        new_low = self.ema * self._low + (1.0 - self.ema) * cand_low
        new_high = self.ema * self._high + (1.0 - self.ema) * cand_high
        ok = (
            torch.isfinite(cand_low)
            & torch.isfinite(cand_high)
            & (spread > VARIANCE_FLOOR)
            & (new_low < new_high)
        )
        self._low = torch.where(ok, new_low, self._low)
        self._high = torch.where(ok, new_high, self._high)
        return self._low, self._high

    def state_dict(self) -> dict[str, Any]:
        """Queue, ring pointer and thresholds (tensors cloned), enough for an exact resume."""
        return {
            "queue": self._queue.clone(),
            "pointer": self._pointer,
            "low": self._low.clone(),
            "high": self._high.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (tensors are moved to `device`).

        Raises:
            CheckpointError: a key is missing or the queue shape differs from this instance's.
        """
        missing = {"queue", "pointer", "low", "high"} - set(state)
        if missing:
            raise CheckpointError(
                f"dynamic threshold state lacks {sorted(missing)}; the checkpoint was not written "
                "by this version; start without --resume"
            )
        queue = torch.as_tensor(state["queue"])
        if queue.shape != self._queue.shape:
            raise CheckpointError(
                f"dynamic threshold queue in the checkpoint has shape {tuple(queue.shape)}, the "
                f"config gives {tuple(self._queue.shape)}; resume with the same thresholds.* "
                "and data.crop_size settings"
            )
        self._queue = queue.to(self.device, torch.float32).clone()
        self._pointer = int(state["pointer"]) % self._queue.shape[0]
        self._low = torch.as_tensor(state["low"]).to(self.device, torch.float32).clone()
        self._high = torch.as_tensor(state["high"]).to(self.device, torch.float32).clone()
