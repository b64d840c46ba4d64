"""CPL dual-threshold rule, SPL masking/temperature, box rasterisation: hand-computed cases."""

from __future__ import annotations

import math

import torch

from cosa.pseudo import IGNORE_INDEX, box_mask, cam_pseudo_label, seg_pseudo_label


def test_box_mask_is_half_open() -> None:
    mask = box_mask(torch.tensor([[1, 3, 0, 2], [0, 4, 0, 4]]), 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 0:2] = True
    assert mask.dtype == torch.bool and mask.shape == (2, 4, 4)
    assert torch.equal(mask[0], expected)
    assert bool(mask[1].all())


def _tiny_cam() -> torch.Tensor:
    """(1, 2, 2, 3) CAM; pixel maxima 0.9 (cls 2), 0.61 (cls 1), 0.6, 0.5, 0.3, 0.1."""
    cam = torch.zeros(1, 2, 2, 3)
    cam[0, 0] = torch.tensor([[0.2, 0.61, 0.6], [0.5, 0.3, 0.05]])
    cam[0, 1] = torch.tensor([[0.9, 0.1, 0.0], [0.4, 0.0, 0.1]])
    return cam


def test_cpl_each_branch_by_hand() -> None:
    full = torch.tensor([[0, 2, 0, 3]])
    label = cam_pseudo_label(_tiny_cam(), full, low=0.3, high=0.6)
    # > high -> argmax + 1; (low, high] -> 255 (0.6 itself included); <= low -> 0 (0.3 included).
    expected = torch.tensor([[[2, 1, 255], [255, 0, 0]]])
    assert label.dtype == torch.int64
    assert torch.equal(label, expected)


def test_cpl_outside_box_is_ignored() -> None:
    label = cam_pseudo_label(_tiny_cam(), torch.tensor([[0, 1, 1, 3]]), low=0.3, high=0.6)
    expected = torch.tensor([[[255, 1, 255], [255, 255, 255]]])
    assert torch.equal(label, expected)


def test_cpl_accepts_tensor_thresholds() -> None:
    cam = _tiny_cam().repeat(2, 1, 1, 1)
    box = torch.tensor([[0, 2, 0, 3], [0, 2, 0, 3]])
    scalar = cam_pseudo_label(cam, box, torch.tensor(0.3), torch.tensor(0.6))
    assert torch.equal(scalar, cam_pseudo_label(cam, box, 0.3, 0.6))
    per_image = cam_pseudo_label(cam, box, torch.tensor([0.3, 0.55]), torch.tensor([0.6, 0.95]))
    assert torch.equal(per_image[0], scalar[0])
    # Image 1: high 0.95 -> 0.9 falls in the band; low 0.55 -> 0.5 becomes background.
    assert torch.equal(per_image[1], torch.tensor([[255, 255, 255], [0, 0, 0]]))


def test_spl_masks_absent_classes_and_sums_to_one() -> None:
    seg = torch.zeros(1, 3, 1, 2)
    seg[0, :, 0, 0] = torch.tensor([0.0, 1.0, 5.0])  # the absent class 2 has the top logit
    seg[0, :, 0, 1] = torch.tensor([2.0, 0.0, 9.0])
    q = seg_pseudo_label(seg, torch.tensor([[1.0, 0.0]]), temperature=1.0)
    assert torch.all(q[0, 2] == 0.0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(1, 1, 2))
    e = math.e
    torch.testing.assert_close(q[0, :2, 0, 0], torch.tensor([1 / (1 + e), e / (1 + e)]))
    assert IGNORE_INDEX == 255


def test_spl_low_temperature_is_almost_one_hot() -> None:
    seg = torch.tensor([[0.3, 0.0], [0.2, 0.1], [0.0, 0.4]])[None, :, :, None]  # (1, 3, 2, 1)
    q = seg_pseudo_label(seg, torch.tensor([[1.0, 1.0]]), temperature=0.01)
    assert torch.equal(q.argmax(dim=1), torch.tensor([[[0], [2]]]))
    assert float(q.amax(dim=1).min()) > 0.999
