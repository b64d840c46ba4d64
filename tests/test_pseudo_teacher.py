"""teacher_forward on a fake, hand-checkable network (no model needed)."""

from __future__ import annotations

import pytest
import torch

from cosa.errors import ConfigError
from cosa.model.outputs import NetOutput
from cosa.pseudo import TeacherOutput, teacher_forward

SIZE = 32  # crop side; the fake net outputs at its input resolution


class RampNet:
    """Deterministic stand-in for CosaNet. Outputs are at the input's resolution.

    At full size (scale 1): CAM class 0 = column ramp j / (W - 1) (not flip-invariant), class 1 =
    minus that ramp (negative: ReLU must remove it), class 2 = 1 (constant). At any other size:
    every CAM channel is the constant 1 (so its upsampling is exact). Seg channel k = (k + 1) *
    (input width / SIZE), a constant per scale. Features = the input itself.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> NetOutput:
        self.calls.append(tuple(x.shape))
        n, _, height, width = x.shape
        if width == SIZE:
            ramp = torch.linspace(0.0, 1.0, width).expand(n, 1, height, width)
            cam = torch.cat([ramp, -ramp, torch.ones_like(ramp)], dim=1)
        else:
            cam = torch.ones(n, 3, height, width)
        seg = torch.arange(1.0, 5.0)[None, :, None, None] * (width / SIZE)
        seg = seg.expand(n, 4, height, width)
        # Features depend on the image content (flip-sensitive): the input itself.
        return NetOutput(cam.sum((2, 3)), cam.sum((2, 3)), cam, cam.clone(), seg, x.clone())


def _normalised(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min() + 1e-5)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_flip_pair_is_unflipped_and_max_fused(images: torch.Tensor) -> None:
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = teacher_forward(RampNet(), images, labels, scales=(1.0,), flip=True)
    assert isinstance(out, TeacherOutput)
    j = torch.arange(SIZE, dtype=torch.float32)
    # max(ramp, unflipped(ramp of the flipped pass)) = max(j, W-1-j) / (W-1): a V, not the ramp
    # (no un-flip) and not a constant (mean of the pair).
    expected = _normalised(torch.maximum(j, SIZE - 1 - j) / (SIZE - 1))
    torch.testing.assert_close(out.cam[0, 0, 5], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cam[1, 0], out.cam[0, 0])
    # Negative CAM: ReLU then normalisation give exactly 0.
    assert torch.equal(out.cam[:, 1], torch.zeros_like(out.cam[:, 1]))
    # Seg: pair summed, no normalisation: 2 * (k + 1).
    torch.testing.assert_close(out.seg[0, :, 3, 3], torch.tensor([2.0, 4.0, 6.0, 8.0]))


def test_scales_are_summed_and_features_unflipped(images: torch.Tensor) -> None:
    labels = torch.ones(2, 3)
    net = RampNet()
    out = teacher_forward(net, images, labels, scales=(0.5, 1.0), flip=True)
    # One forward per scale, flip pair batched: (2B, 3, 16, 16) then (2B, 3, 32, 32).
    assert net.calls == [(4, 3, 16, 16), (4, 3, SIZE, SIZE)]
    # Seg: 2 * (k + 1) * (0.5 + 1.0).
    torch.testing.assert_close(out.seg[1, :, 0, 0], torch.tensor([3.0, 6.0, 9.0, 12.0]))
    # CAM class 0: V-shape of scale 1 + constant 1 of scale 0.5; the sum keeps the V after the
    # normalisation (a max over scales would give the constant 1 -> all zeros).
    j = torch.arange(SIZE, dtype=torch.float32)
    expected = _normalised(torch.maximum(j, SIZE - 1 - j) / (SIZE - 1) + 1.0)
    torch.testing.assert_close(out.cam[0, 0, 0], expected, atol=1e-5, rtol=0)
    # Features: the scale-1.0 pass, first (unflipped) half.
    assert torch.equal(out.features, images)
    assert out.cam.shape == (2, 3, SIZE, SIZE) and out.seg.shape == (2, 4, SIZE, SIZE)


def test_normalised_range_and_absent_classes_zero(images: torch.Tensor) -> None:
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = teacher_forward(RampNet(), images, labels, scales=(1.0, 0.5), flip=False)
    assert out.cam.min() >= 0.0 and out.cam.max() <= 1.0
    assert out.cam[0, 0].max() == pytest.approx(1.0, abs=1e-4)
    assert out.cam[0, 0].min() == 0.0
    for b, c in [(0, 1), (1, 0), (1, 2)]:  # absent classes
        assert torch.equal(out.cam[b, c], torch.zeros(SIZE, SIZE))
        assert torch.equal(out.aux_cam[b, c], torch.zeros(SIZE, SIZE))
    # No flip, no normalisation: seg = (k + 1) * (1 + 0.5).
    torch.testing.assert_close(out.seg[0, :, 0, 0], torch.tensor([1.5, 3.0, 4.5, 6.0]))


def test_aux_last_scale_only_reproduces_the_reference_quirk(images: torch.Tensor) -> None:
    labels = torch.ones(2, 3)
    summed = teacher_forward(RampNet(), images, labels, (1.0, 0.5), flip=False)
    quirk = teacher_forward(
        RampNet(), images, labels, (1.0, 0.5), flip=False, aux_last_scale_only=True
    )
    torch.testing.assert_close(summed.aux_cam, summed.cam)
    # The last scale (0.5) is a constant map, which normalises to 0.
    assert torch.equal(quirk.aux_cam, torch.zeros_like(quirk.aux_cam))
    torch.testing.assert_close(quirk.cam, summed.cam)


def test_extra_forward_for_features_when_scale_one_missing(images: torch.Tensor) -> None:
    net = RampNet()
    out = teacher_forward(net, images, torch.ones(2, 3), scales=(0.5,), flip=True)
    assert net.calls == [(4, 3, 16, 16), (2, 3, SIZE, SIZE)]
    assert torch.equal(out.features, images)


def test_cls_logits_come_from_the_unflipped_scale_one_pass(images: torch.Tensor) -> None:
    def net(x: torch.Tensor) -> NetOutput:
        # Image logits that tell scales (width factor) and flips (first column) apart.
        return RampNet()(x)._replace(cls_logits=x[..., 0].mean(-1) * x.shape[-1])

    expected = images[..., 0].mean(-1) * SIZE  # (2, 3): the unflipped images at scale 1.0
    for scales in [(0.5, 1.0, 1.5), (0.5,)]:
        out = teacher_forward(net, images, torch.ones(2, 3), scales, flip=True)
        torch.testing.assert_close(out.cls_logits, expected)


def test_runs_without_autograd(images: torch.Tensor) -> None:
    weight = torch.ones(1, requires_grad=True)

    def net(x: torch.Tensor) -> NetOutput:
        out = RampNet()(x)
        return out._replace(cam=out.cam * weight, seg=out.seg * weight)

    out = teacher_forward(net, images, torch.ones(2, 3), (1.0,), flip=True)
    assert not out.cam.requires_grad and not out.seg.requires_grad


def test_bad_scales_raise(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="pseudo.scales"):
        teacher_forward(RampNet(), images, torch.ones(2, 3), scales=(), flip=False)
    with pytest.raises(ConfigError, match="positive"):
        teacher_forward(RampNet(), images, torch.ones(2, 3), scales=(1.0, -0.5), flip=False)


def _patch_grid_net(x: torch.Tensor) -> NetOutput:
    """A network with a stride-16 patch grid that drops a remainder, as a ViT patch embedding does:
    its seg "logits" are the input's first channel averaged over each whole 16 x 16 cell."""
    cells = torch.nn.functional.avg_pool2d(x[:, :1], 16)  # (B, 1, floor(H/16), floor(W/16))
    seg = torch.cat([0.5 - cells, cells - 0.5], dim=1)  # class 1 where a cell is mostly bright
    batch, _, h, w = cells.shape
    zeros = torch.zeros(batch, 1, h, w)
    return NetOutput(torch.zeros(batch, 1), torch.zeros(batch, 1), zeros, zeros, seg, zeros)


@pytest.mark.parametrize("scale", [1.0, 0.5, 1.5])
def test_native_size_passes_keep_a_step_edge_in_place(scale: float) -> None:
    # A 375-row image, bright from row 300 down: the case where round(s * H) is not a multiple of 16
    # and a dropped remainder stretched back over the image moved the edge to row 307 (318 at 0.5).
    image = torch.zeros(1, 3, 375, 500)
    image[:, :, 300:] = 1.0
    seg = teacher_forward(_patch_grid_net, image, torch.ones(1, 1), scales=(scale,), flip=False).seg
    bright = (seg[0, 1] > seg[0, 0]).float().mean(dim=1)  # (375,) share of each row called bright
    edge = int(torch.nonzero(bright > 0.5)[0])
    # Measured: 299, 302, 300 at scales 1.0, 0.5, 1.5 (307 and 318 before the snap to 16).
    assert abs(edge - 300) <= 3
