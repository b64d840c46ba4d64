"""Local-window bilateral CRF energy: hand value, edge awareness, gates, gradients, magnitude."""

from __future__ import annotations

import math

import pytest
import torch

from cosa.errors import ConfigError
from cosa.losses import crf_energy_loss
from cosa.losses.crf import _filtered_and_gate

SIZE = 96  # most cases; the magnitude check runs at 224
PALETTE = torch.tensor(
    [[30.0, 30.0, 30.0], [200.0, 40.0, 40.0], [40.0, 200.0, 40.0], [40.0, 40.0, 200.0]]
)


def _scene(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A size x size synthetic image of 4 flat regions (+ noise) and its region map."""
    regions = torch.zeros(224, 224, dtype=torch.long)
    regions[:, 112:] = 1
    regions[60:160, 40:100] = 2
    regions[20:80, 140:200] = 3
    regions = torch.nn.functional.interpolate(
        regions[None, None].float(), size=(size, size), mode="nearest"
    )[0, 0].long()
    noise = 5.0 * torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    image = PALETTE[regions].permute(2, 0, 1)[None] + noise
    return image.clamp(0, 255), regions


def _soft(label: torch.Tensor, confidence: float = 0.7) -> torch.Tensor:
    """(1, 4, H, W) probabilities: `confidence` on `label`, the rest spread evenly."""
    probs = torch.full((1, 4, *label.shape), (1.0 - confidence) / 3)
    return probs.scatter(1, label[None, None], confidence)


def _no_ignore(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(1, size, size), torch.zeros(1, size, size, dtype=torch.bool)


def test_hand_value_on_a_constant_image() -> None:
    # 4 x 4 full resolution -> 2 x 2 at half resolution, window 3: every pixel sees the other 3.
    probs = torch.full((1, 2, 4, 4), 0.5)
    image = torch.full((1, 3, 4, 4), 100.0)
    roi, ignore = _no_ignore(4)
    value = crf_energy_loss(probs, image, roi, ignore, sigma_xy=50.0, window=3, dilation=1)
    # gate 0.5, sum_k p_k p_k' = 0.5, spatial sigma 25 at half resolution.
    side, diagonal = math.exp(-1 / 1250), math.exp(-2 / 1250)
    expected = -(4 * 0.5 * 0.5 * (2 * side + diagonal)) / (4 * 8)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_aligned_prediction_is_lower_than_noisy_or_misaligned() -> None:
    image, regions = _scene()
    roi, ignore = _no_ignore()
    aligned = crf_energy_loss(_soft(regions), image, roi, ignore)
    # Noise in 8 x 8 blocks (survives the x0.5 resize), same confidence hence same gate.
    blocks = torch.randint(0, 4, (SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(1))
    noisy = crf_energy_loss(
        _soft(blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)), image, roi, ignore
    )
    shifted = crf_energy_loss(_soft(regions.roll(shifts=(10, 10), dims=(0, 1))), image, roi, ignore)
    assert float(aligned) < float(shifted) < float(noisy) < 0.0
    assert float(aligned) < 1.5 * float(noisy)  # clearly lower, not marginally


def test_magnitude_and_range_at_224() -> None:
    image, regions = _scene(224)
    roi, ignore = _no_ignore(224)
    value = crf_energy_loss(_soft(regions, confidence=0.6), image, roi, ignore)
    assert -1.0 <= float(value) <= -0.1  # O(0.1 - 1), like the reference's logged values
    # All-ignore gate (=1) on a smooth uncertain prediction: still within [-1, 0].
    everything = crf_energy_loss(_soft(regions, 0.6), image, roi, torch.ones_like(ignore))
    assert -1.0 <= float(everything) < float(value)


def test_confident_prediction_closes_the_gate() -> None:
    image, regions = _scene()
    roi, ignore = _no_ignore()
    # Only the few border pixels that the x0.5 resize blends keep an open gate.
    assert abs(float(crf_energy_loss(_soft(regions, 1.0), image, roi, ignore))) < 2e-3
    # ...except where the CPL is ignore: there the gate is 1.
    band = torch.zeros_like(ignore)
    band[:, 40:56] = True
    assert float(crf_energy_loss(_soft(regions, 1.0), image, roi, band)) < -0.01


def test_outside_roi_contributes_nothing() -> None:
    image, regions = _scene()
    probs = _soft(regions, 0.6)
    roi = torch.zeros(1, SIZE, SIZE)
    assert float(crf_energy_loss(probs, image, roi, torch.ones_like(roi, dtype=torch.bool))) == 0


def test_gradient_is_finite_and_only_reaches_the_probabilities() -> None:
    logits = torch.randn(2, 3, 48, 48, requires_grad=True)
    image = (torch.rand(2, 3, 48, 48) * 255).requires_grad_()
    roi = torch.ones(2, 48, 48)
    roi[:, :, 40:] = 0
    ignore = torch.rand(2, 48, 48, generator=torch.Generator().manual_seed(0)) > 0.7
    value = crf_energy_loss(torch.softmax(logits, dim=1), image, roi, ignore)
    value.backward()
    assert torch.isfinite(value) and torch.all(torch.isfinite(logits.grad))
    assert float(logits.grad.abs().sum()) > 0
    assert image.grad is None


def test_bad_window_raises() -> None:
    probs = torch.full((1, 2, 8, 8), 0.5)
    roi, ignore = _no_ignore(8)
    with pytest.raises(ConfigError, match="crf_window"):
        crf_energy_loss(probs, torch.zeros(1, 3, 8, 8), roi, ignore, window=4)


def test_gradient_is_exact_when_the_gate_is_constant() -> None:
    # With every pixel ignored the gate is 1, the energy is the quadratic form p.Kp and the
    # reference gradient 2 g (K * p) is its exact gradient: compare with finite differences.
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 2, 12, 12, generator=generator, dtype=torch.float32)
    image = torch.rand(1, 3, 12, 12, generator=generator) * 255
    roi, ignore = torch.ones(1, 12, 12), torch.ones(1, 12, 12, dtype=torch.bool)
    leaf = probs.clone().requires_grad_()
    crf_energy_loss(leaf, image, roi, ignore, window=3, dilation=1).backward()
    step = 1e-2
    for index in [(0, 0, 0, 0), (0, 1, 5, 7), (0, 0, 11, 3)]:
        plus, minus = probs.clone(), probs.clone()
        plus[index] += step
        minus[index] -= step
        numeric = (
            crf_energy_loss(plus, image, roi, ignore, window=3, dilation=1)
            - crf_energy_loss(minus, image, roi, ignore, window=3, dilation=1)
        ) / (2 * step)
        assert float(leaf.grad[index]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-6)


def test_kernel_weights_below_the_float32_normal_range_are_zeros() -> None:
    # Two flat halves 207 apart in red, 13.8 sigma: the weights across the edge are exp(-95), a
    # denormal number, which would slow every multiply-add it enters. Class 1 is the right half,
    # so its filtered map on the left is made of those weights alone: zero, not denormal.
    size = 64
    image = torch.zeros(1, 3, size, size)
    image[:, 0, :, size // 2 :] = 207.0
    half = size // 2
    probs = torch.zeros(1, 2, half, half)
    probs[:, 0, :, : half // 2] = 1.0
    probs[:, 1, :, half // 2 :] = 1.0
    roi, ignore = torch.ones(1, 1, half, half), torch.zeros(1, size, size, dtype=torch.bool)
    filtered, _ = _filtered_and_gate(probs, roi, image, ignore, 15.0, 100.0, 9, 2)
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((filtered != 0) & (filtered.abs() < tiny)).any())
    assert float(filtered[0, 1, :, : half // 2 - 2].abs().max()) == 0.0  # beyond the edge's blur
    assert float(filtered[0, 0, :, : half // 2].min()) > 1.0  # same-side neighbours still count
