"""Classification, balanced cam2seg CE and seg2cam BCE on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from cosa.losses import balanced_cross_entropy, cam2seg_loss, classification_loss, seg2cam_loss

LN2 = math.log(2.0)
LN43 = math.log(4.0 / 3.0)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, 1, 4) logits, labels [0, 0, 1, 255]. Pixel CEs: ln 2, ln 4/3, ln 4/3, (ignored)."""
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 7.0], [0.0, 0.0, math.log(3.0), -7.0]])
    return logits[None, :, None, :], torch.tensor([[[0, 0, 1, 255]]])


def test_balanced_ce_by_hand() -> None:
    logits, target = _tiny()
    ce_bg = (LN2 + LN43) / 2
    ce_fg = LN43
    assert float(balanced_cross_entropy(logits, target)) == pytest.approx(
        0.5 * ce_bg + 0.5 * ce_fg, rel=1e-5
    )
    assert float(balanced_cross_entropy(logits, target, alpha=0.8)) == pytest.approx(
        0.2 * ce_bg + 0.8 * ce_fg, rel=1e-5
    )


def test_balanced_ce_weighted_means_per_part() -> None:
    logits, target = _tiny()
    weights = torch.tensor([[[1.0, 3.0, 2.0, 5.0]]])  # the ignored pixel's weight is irrelevant
    expected = 0.5 * (1 * LN2 + 3 * LN43) / 4 + 0.5 * (2 * LN43) / 2
    value = balanced_cross_entropy(logits, target, weights=weights)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_balanced_ce_empty_part_and_all_ignored() -> None:
    logits, _ = _tiny()
    only_bg = torch.tensor([[[0, 0, 255, 255]]])
    value = balanced_cross_entropy(logits, only_bg)
    assert float(value) == pytest.approx(0.5 * (LN2 + LN43) / 2, rel=1e-5)
    nothing = torch.full((1, 1, 4), 255)
    assert float(balanced_cross_entropy(logits, nothing)) == 0.0


def test_balanced_ce_is_zero_on_a_perfect_prediction() -> None:
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2) * 50.0
    assert float(balanced_cross_entropy(logits.float(), target)) < 1e-6


def test_cam2seg_mixes_main_and_aux() -> None:
    logits, target = _tiny()
    aux = torch.tensor([[[1, 0, 1, 1]]])
    main_value = balanced_cross_entropy(logits, target)
    aux_value = balanced_cross_entropy(logits, aux)
    # aux: bg pixel 1 (ln 4/3); fg pixels 0, 2, 3: ln 2, ln 4/3, log(1 + e^14).
    expected_aux = 0.5 * LN43 + 0.5 * (LN2 + LN43 + math.log1p(math.exp(14.0))) / 3
    assert float(aux_value) == pytest.approx(expected_aux, rel=1e-5)
    mixed = cam2seg_loss(logits, target, aux, mix=0.25)
    assert float(mixed) == pytest.approx(0.75 * float(main_value) + 0.25 * float(aux_value))
    weighted = cam2seg_loss(
        logits, target, aux, main_weights=torch.ones(1, 1, 4), aux_weights=torch.ones(1, 1, 4)
    )
    assert float(weighted) == pytest.approx(float(cam2seg_loss(logits, target, aux)), rel=1e-6)


def test_seg2cam_floor_is_log2() -> None:
    cam = torch.zeros(2, 3, 4, 4)
    q = torch.zeros(2, 4, 16, 16)
    q[:, 0] = 1.0  # all background -> all-zero CAM targets
    assert float(seg2cam_loss(cam, q)) == pytest.approx(LN2, rel=1e-6)
    # Negative logits are clipped by the ReLU: still log 2, not lower.
    assert float(seg2cam_loss(cam - 5.0, q)) == pytest.approx(LN2, rel=1e-6)


def test_seg2cam_by_hand_with_downsampled_targets() -> None:
    cam = torch.zeros(1, 2, 2, 2)
    cam[0, 0] = 20.0  # class 1 logits high everywhere
    q = torch.zeros(1, 3, 8, 8)
    q[0, 1] = 1.0  # class 1 everywhere: target 1 for channel 0, 0 for channel 1
    value = seg2cam_loss(cam, q)
    # Channel 0: BCE(20, 1) ~ 2e-9; channel 1: BCE(0, 0) = ln 2. Mean over (b, i) of (1/C) sum_c.
    assert float(value) == pytest.approx(LN2 / 2, rel=1e-5)


def test_seg2cam_gradient_pushes_cam_toward_the_target() -> None:
    cam = torch.ones(1, 2, 2, 2, requires_grad=True)
    q = torch.zeros(1, 3, 4, 4)
    q[0, 1] = 1.0
    seg2cam_loss(cam, q).backward()
    assert torch.all(cam.grad[0, 0] < 0) and torch.all(cam.grad[0, 1] > 0)


def test_classification_loss_by_hand() -> None:
    assert float(classification_loss(torch.zeros(3, 4), torch.ones(3, 4))) == pytest.approx(LN2)
    logits = torch.tensor([[math.log(3.0), 0.0]])  # sigmoid = 3/4 and 1/2
    labels = torch.tensor([[1, 0]])
    expected = (LN43 + LN2) / 2
    assert float(classification_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
