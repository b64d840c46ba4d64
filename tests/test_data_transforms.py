"""Training views (METHOD.md section 2): shapes, img_box, view alignment, ops, determinism."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from cosa.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRONG_OPS,
    apply_strong_op,
    apply_view_params,
    denormalize,
    make_train_views,
    normalize,
    sample_view_params,
)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    return denormalize(x).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_shapes_and_dtypes() -> None:
    views = make_train_views(_noise_image(50, 37), 64, (0.5, 2.0), np.random.default_rng(0))
    assert views.weak.shape == views.strong.shape == (3, 64, 64)
    assert views.weak.dtype == views.strong.dtype == torch.float32
    assert views.img_box.dtype == torch.int64 and views.img_box.shape == (4,)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", [(30, 20), (90, 50), (70, 140)])
def test_img_box_marks_exactly_the_non_padded_region(size: tuple[int, int]) -> None:
    white = Image.new("RGB", size, (255, 255, 255))
    for seed in range(25):
        params = sample_view_params(size[1], size[0], 64, (0.5, 2.0), np.random.default_rng(seed))
        params = dataclasses.replace(params, blur_radius=None, strong_op="identity")
        views = apply_view_params(white, 64, params)
        h0, h1, w0, w1 = views.img_box.tolist()
        assert 0 <= h0 < h1 <= 64 and 0 <= w0 < w1 <= 64
        assert (h1 - h0, w1 - w0) == (min(64, params.size[0]), min(64, params.size[1]))
        weak = _to_uint8(views.weak)
        inside = np.zeros((64, 64), dtype=bool)
        inside[h0:h1, w0:w1] = True
        assert (weak[inside] == 255).all()
        assert (weak[~inside] == 0).all()  # black padding


def test_padding_happens_only_when_the_image_is_smaller_than_the_crop() -> None:
    big = Image.new("RGB", (200, 180), (255, 255, 255))
    for seed in range(10):
        views = make_train_views(big, 64, (1.0, 1.5), random.Random(seed))
        assert views.img_box.tolist() == [0, 64, 0, 64]


def test_geometry_follows_scale_flip_and_crop() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[10:14, 8:12] = 255  # a 4x4 marker centred at (12, 10)
    pil = Image.fromarray(image)
    checked = 0
    for seed in range(30):
        params = sample_view_params(40, 60, 48, (0.8, 1.6), np.random.default_rng(seed))
        params = dataclasses.replace(params, blur_radius=None, strong_op="identity")
        weak = _to_uint8(apply_view_params(pil, 48, params).weak).max(axis=2)
        scale_y, scale_x = params.size[0] / 40, params.size[1] / 60
        cy, cx = 12 * scale_y, 10 * scale_x
        if params.flip:
            cx = params.size[1] - cx
        cy += params.pad_top - params.crop_top
        cx += params.pad_left - params.crop_left
        if not (4 <= cy <= 44 and 4 <= cx <= 44):
            continue  # the marker was cropped away
        ys, xs = np.nonzero(weak > 100)
        assert abs(ys.mean() + 0.5 - cy) < 1.0 and abs(xs.mean() + 0.5 - cx) < 1.0
        checked += 1
    assert checked >= 10


def test_identity_op_keeps_the_views_equal() -> None:
    params = sample_view_params(37, 50, 64, (0.5, 2.0), np.random.default_rng(1))
    views = apply_view_params(
        _noise_image(50, 37), 64, dataclasses.replace(params, strong_op="identity")
    )
    assert torch.equal(views.weak, views.strong)


@pytest.mark.parametrize("op", STRONG_OPS)
def test_strong_view_is_a_pixelwise_function_of_the_weak_view(op: str) -> None:
    # Pixels with the same weak colour get the same strong colour: nothing moved. Sharpness is a
    # 3x3 filter, so it is checked on flat areas instead, where it must leave pixels unchanged.
    image = Image.fromarray(
        np.kron(
            np.random.default_rng(2).integers(0, 256, (8, 10, 3), dtype=np.uint8),
            np.ones((6, 6, 1), dtype=np.uint8),
        )
    )
    params = sample_view_params(48, 60, 64, (0.9, 1.1), np.random.default_rng(3))
    params = dataclasses.replace(params, blur_radius=None, strong_op=op, magnitude=7)
    views = apply_view_params(image, 64, params)
    weak, strong = _to_uint8(views.weak), _to_uint8(views.strong)
    if op == "sharpness":
        flat = np.ones((64, 64), dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                flat[1:-1, 1:-1] &= (np.roll(weak, (dy, dx), (0, 1)) == weak).all(2)[1:-1, 1:-1]
        assert flat.sum() > 1000
        np.testing.assert_array_equal(strong[flat], weak[flat])
        return
    mapping: dict[tuple, tuple] = {}
    for w, s in zip(weak.reshape(-1, 3), strong.reshape(-1, 3), strict=True):
        assert mapping.setdefault(tuple(w), tuple(s)) == tuple(s)
    assert strong.tolist() == np.asarray(apply_strong_op(Image.fromarray(weak), op, 7)).tolist()


def test_strong_op_magnitudes() -> None:
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (2, 1))[..., None].repeat(3, 2))
    solar = np.asarray(apply_strong_op(ramp, "solarize", 5))[0, :, 0]
    assert solar[127] == 127 and solar[128] == 255 - 128  # threshold min(256 * 5 / 10, 255) = 128
    solar9 = np.asarray(apply_strong_op(ramp, "solarize", 9))[0, :, 0]
    assert solar9[229] == 229 and solar9[230] == 25  # threshold 230
    poster = np.asarray(apply_strong_op(ramp, "posterize", 9))
    assert set(np.unique(poster).tolist()) == {0, 128}  # 4 - floor(3.6) = 1 bit
    assert len(np.unique(np.asarray(apply_strong_op(ramp, "posterize", 2)))) == 16  # 4 bits
    same = np.asarray(apply_strong_op(ramp, "brightness", 5))  # factor 1.8 * 0.5 + 0.1 = 1.0
    assert same.tolist() == np.asarray(ramp).tolist()
    dim = np.asarray(apply_strong_op(ramp, "brightness", 1))[0, 200, 0]  # factor 0.28
    assert dim == round(200 * 0.28)
    with pytest.raises(ValueError, match="unknown strong op"):
        apply_strong_op(ramp, "rotate", 3)


def test_blur_only_changes_the_weak_view_by_smoothing() -> None:
    image = _noise_image(64, 64)
    params = sample_view_params(64, 64, 64, (1.0, 1.0), np.random.default_rng(0))
    sharp = dataclasses.replace(params, blur_radius=None, strong_op="identity", flip=False)
    blurred = dataclasses.replace(sharp, blur_radius=1.5)
    a, b = (apply_view_params(image, 64, p).weak for p in (sharp, blurred))
    assert b.std() < 0.6 * a.std()  # noise is smoothed
    assert abs(a.mean() - b.mean()) < 0.05  # but not moved or darkened


def test_random_choices_follow_the_method() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_view_params(300, 400, 448, (0.5, 2.0), rng) for _ in range(3000)]
    assert all(0.5 <= d.scale <= 2.0 for d in draws)
    assert np.mean([d.flip for d in draws]) == pytest.approx(0.5, abs=0.04)
    blurred = [d.blur_radius for d in draws if d.blur_radius is not None]
    assert len(blurred) / len(draws) == pytest.approx(0.5, abs=0.04)
    assert min(blurred) >= 0.1 and max(blurred) <= 2.0
    ops = Counter(d.strong_op for d in draws)
    assert set(ops) == set(STRONG_OPS) and min(ops.values()) > 250  # uniform over nine
    assert {d.magnitude for d in draws} == set(range(1, 10))


@pytest.mark.parametrize("make_rng", [np.random.default_rng, random.Random])
def test_same_seed_same_views(make_rng) -> None:
    image = _noise_image(80, 45)
    first = make_train_views(image, 48, (0.5, 2.0), make_rng(7))
    again = make_train_views(image, 48, (0.5, 2.0), make_rng(7))
    other = make_train_views(image, 48, (0.5, 2.0), make_rng(8))
    assert torch.equal(first.weak, again.weak) and torch.equal(first.strong, again.strong)
    assert torch.equal(first.img_box, again.img_box)
    assert not torch.equal(first.weak, other.weak)


def test_denormalize_inverts_normalize() -> None:
    image = _noise_image(9, 7)
    x = normalize(image)
    assert x.shape == (3, 7, 9) and x.dtype == torch.float32
    back = denormalize(x)
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy(), np.asarray(image), atol=1e-3)
    batch = denormalize(torch.stack([x, x]))  # (B, 3, H, W) works too
    assert batch.shape == (2, 3, 7, 9)
    assert denormalize(torch.full((3, 1, 1), 100.0)).max() == 255.0  # clamped


def test_denormalize_is_differentiable_after_a_call_in_inference_mode() -> None:
    """The cached mean/std made under inference mode must not poison later autograd use."""
    with torch.inference_mode():
        denormalize(torch.zeros(1, 3, 2, 2))
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    denormalize(x).sum().backward()
    # d/dx of (x * std + mean) * 255 is 255 * std per channel.
    expected = 255.0 * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_denormalize_does_not_synchronise_on_cuda() -> None:
    """Run every training step (the CRF energy's colours): a host-to-device copy there stalls the
    host once per step (counted by benchmarks/cuda_syncs.py)."""
    x = torch.zeros(2, 3, 4, 4, device="cuda")
    denormalize(x)  # the first call on a device makes the constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        denormalize(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
