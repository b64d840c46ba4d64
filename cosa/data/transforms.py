"""Training views of METHOD.md section 2, with PIL and torchvision ops (no mmcv).

One sample gives a weak and a strong view of the same geometry:

1. rescale by r ~ U(scale_range) (PIL bilinear; new size = int(r * size), as the reference);
2. horizontal flip with p = 0.5;
3. crop `crop_size` x `crop_size` from the image padded with black (0, 0, 0) at a random offset
   where it is smaller than the crop; `img_box = [h0, h1, w0, w1]` is the valid (non-pad) region
   of the crop, end-exclusive;
4. Gaussian blur with p = 0.5, radius ~ U(0.1, 2.0) -> the weak view;
5. the strong view = the weak view through ONE photometric op drawn uniformly from `STRONG_OPS`
   with magnitude m ~ randint[1, 9] (of 10): Solarize threshold min(floor(256 m / 10), 255),
   enhance factor 1.8 m / 10 + 0.1 (Color, Contrast, Brightness, Sharpness), Posterize keeps
   4 - floor(4 m / 10) bits. Only photometric ops, so the views stay pixel-aligned;
6. ImageNet normalisation.

Random draws happen in `sample_view_params`, always the same number in the same order, and
`apply_view_params` is a pure function of the image and those parameters (testable, reproducible).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

STRONG_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "posterize",
)
MAGNITUDE_RANGE = (1, 9)  # m ~ randint[1, 9] of 10
FLIP_PROB = 0.5
BLUR_PROB = 0.5
BLUR_RADIUS = (0.1, 2.0)

Rng = random.Random | np.random.Generator


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one training sample.

    Attributes:
        scale: rescale ratio r.
        size: (height, width) after rescaling.
        flip: horizontal flip after rescaling.
        pad_top, pad_left: offset of the rescaled image in the black canvas of
            max(crop, size) per side (0 on a side where the image is at least the crop).
        crop_top, crop_left: the crop's corner in that canvas.
        blur_radius: Gaussian blur radius of the weak view, None = no blur.
        strong_op: one of STRONG_OPS; magnitude: m in 1..9.
    """

    scale: float
    size: tuple[int, int]
    flip: bool
    pad_top: int
    pad_left: int
    crop_top: int
    crop_left: int
    blur_radius: float | None
    strong_op: str
    magnitude: int


@dataclass(frozen=True)
class TrainViews:
    """The two aligned views of one sample.

    Attributes:
        weak: float32 (3, crop, crop), ImageNet-normalised; input of the assignment network.
        strong: float32 (3, crop, crop), same geometry, photometrically changed; online network.
        img_box: int64 (4,) [h0, h1, w0, w1], the non-padded region of the crop (end-exclusive).
    """

    weak: torch.Tensor
    strong: torch.Tensor
    img_box: torch.Tensor


class _Draw:
    """The three draws the pipeline needs, from either kind of generator."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def integer(self, low: int, high: int) -> int:
        """Uniform on low..high inclusive."""
        if isinstance(self.rng, np.random.Generator):
            return int(self.rng.integers(low, high + 1))
        return self.rng.randint(low, high)

    def chance(self, p: float) -> bool:
        return float(self.rng.random()) < p


def sample_view_params(
    height: int, width: int, crop_size: int, scale_range: tuple[float, float], rng: Rng
) -> ViewParams:
    """Draw the random choices for an image of `height` x `width` (see the module docstring)."""
    draw = _Draw(rng)
    scale = draw.uniform(*scale_range)
    new_h, new_w = max(1, int(scale * height)), max(1, int(scale * width))
    flip = draw.chance(FLIP_PROB)
    canvas_h, canvas_w = max(crop_size, new_h), max(crop_size, new_w)
    pad_top = draw.integer(0, canvas_h - new_h)
    pad_left = draw.integer(0, canvas_w - new_w)
    crop_top = draw.integer(0, canvas_h - crop_size)
    crop_left = draw.integer(0, canvas_w - crop_size)
    blur = draw.chance(BLUR_PROB)
    radius = draw.uniform(*BLUR_RADIUS)  # drawn either way: a fixed number of draws per sample
    op = STRONG_OPS[draw.integer(0, len(STRONG_OPS) - 1)]
    magnitude = draw.integer(*MAGNITUDE_RANGE)
    return ViewParams(
        scale=scale,
        size=(new_h, new_w),
        flip=flip,
        pad_top=pad_top,
        pad_left=pad_left,
        crop_top=crop_top,
        crop_left=crop_left,
        blur_radius=radius if blur else None,
        strong_op=op,
        magnitude=magnitude,
    )


def crop_box(params: ViewParams, crop_size: int) -> tuple[int, int, int, int]:
    """[h0, h1, w0, w1]: where the rescaled image lands in the crop (end-exclusive)."""
    new_h, new_w = params.size
    off_h, off_w = params.pad_top - params.crop_top, params.pad_left - params.crop_left
    return (
        max(off_h, 0),
        min(crop_size, off_h + new_h),
        max(off_w, 0),
        min(crop_size, off_w + new_w),
    )


def weak_view(
    image: Image.Image, crop_size: int, params: ViewParams
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Steps 1-4: rescale, flip, pad/crop, blur.

    Args:
        image: RGB PIL image.
        crop_size: output side in pixels.
        params: from `sample_view_params` for this image's size.

    Returns:
        (weak RGB PIL image crop_size x crop_size, img_box [h0, h1, w0, w1]).
    """
    new_h, new_w = params.size
    img = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    h0, h1, w0, w1 = crop_box(params, crop_size)
    off_h, off_w = params.pad_top - params.crop_top, params.pad_left - params.crop_left
    canvas = Image.new("RGB", (crop_size, crop_size), (0, 0, 0))
    canvas.paste(img.crop((w0 - off_w, h0 - off_h, w1 - off_w, h1 - off_h)), (w0, h0))
    if params.blur_radius is not None:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
    return canvas, (h0, h1, w0, w1)


def apply_strong_op(image: Image.Image, op: str, magnitude: int) -> Image.Image:
    """One photometric op of METHOD.md section 2 (pixel positions never change).

    Args:
        image: RGB PIL image.
        op: one of STRONG_OPS.
        magnitude: m in 1..9 (of 10).

    Raises:
        ValueError: unknown op (a programming error; ops come from STRONG_OPS).
    """
    factor = 1.8 * magnitude / 10 + 0.1
    if op == "identity":
        return image.copy()
    if op == "autocontrast":
        return ImageOps.autocontrast(image)
    if op == "equalize":
        return ImageOps.equalize(image)
    if op == "solarize":  # inverts pixels >= threshold, as mmcv.solarize
        return ImageOps.solarize(image, threshold=min(int(256 * magnitude / 10), 255))
    if op == "posterize":
        return ImageOps.posterize(image, 4 - int(4 * magnitude / 10))
    enhancers = {
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "brightness": ImageEnhance.Brightness,
        "sharpness": ImageEnhance.Sharpness,
    }
    if op not in enhancers:
        raise ValueError(f"unknown strong op {op!r}; choose one of {STRONG_OPS}")
    return enhancers[op](image).enhance(factor)


def normalize(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor, ImageNet-normalised."""
    x = TF.pil_to_tensor(image).float().div_(255.0)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo `normalize`: (..., 3, H, W) ImageNet-normalised -> float32 RGB 0-255, clamped.

    Round and cast with `.round().to(torch.uint8)` for display; losses that want 0-255 colours
    (the CRF energy) can use the float values directly.
    """
    mean, std = _mean_std(x.device)
    return ((x.float() * std + mean) * 255.0).clamp_(0.0, 255.0)


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (3, 1, 1) float32 tensors on `device`, made once per device: a
    fresh host-to-device copy every training step would stall the host until the GPU caught up.
    Made outside inference mode so that autograd may save them whatever mode the first call ran
    in."""
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def apply_view_params(image: Image.Image, crop_size: int, params: ViewParams) -> TrainViews:
    """Build both views from fixed parameters (deterministic)."""
    weak, box = weak_view(image, crop_size, params)
    strong = apply_strong_op(weak, params.strong_op, params.magnitude)
    return TrainViews(
        weak=normalize(weak),
        strong=normalize(strong),
        img_box=torch.tensor(box, dtype=torch.int64),
    )


def mask_view(mask: np.ndarray, crop_size: int, params: ViewParams) -> torch.Tensor:
    """The ground-truth mask under the same geometry as the views (fully supervised training only).

    Args:
        mask: uint8 (H, W) class ids, 255 = ignore.
        crop_size: side of the views.
        params: the `ViewParams` the views were built with.

    Returns:
        int64 (crop, crop); nearest-neighbour resampling; padding is 255 (ignored).
    """
    new_h, new_w = params.size
    img = Image.fromarray(mask).resize((new_w, new_h), Image.Resampling.NEAREST)
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    h0, h1, w0, w1 = crop_box(params, crop_size)
    off_h, off_w = params.pad_top - params.crop_top, params.pad_left - params.crop_left
    canvas = Image.new("L", (crop_size, crop_size), 255)
    canvas.paste(img.crop((w0 - off_w, h0 - off_h, w1 - off_w, h1 - off_h)), (w0, h0))
    return torch.from_numpy(np.asarray(canvas, dtype=np.int64).copy())


def make_train_views(
    image: Image.Image, crop_size: int, scale_range: tuple[float, float], rng: Rng
) -> TrainViews:
    """The weak and strong training views of `image` (METHOD.md section 2).

    Args:
        image: RGB PIL image of any size.
        crop_size: side of both views in pixels (448 in the paper).
        scale_range: (low, high) of the random rescale ratio ((0.5, 2.0) in the paper).
        rng: `random.Random` or `numpy.random.Generator`; the only source of randomness.

    Returns:
        `TrainViews`: weak and strong float32 (3, crop, crop) ImageNet-normalised, img_box
        int64 (4,).
    """
    params = sample_view_params(image.height, image.width, crop_size, scale_range, rng)
    return apply_view_params(image, crop_size, params)
