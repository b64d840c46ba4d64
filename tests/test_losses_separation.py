"""CSP: pixel-to-prototype InfoNCE over the classes that coexist in each image."""

from __future__ import annotations

import math

import pytest
import torch

from cosa.errors import ConfigError
from cosa.losses import contrastive_separation_loss, labels_at_cell_centres

T = 0.1


def _features(label: torch.Tensor, dim: int = 4) -> torch.Tensor:
    """(B, D, h, w) features: pixel of class k -> unit vector e_k."""
    onehot = torch.nn.functional.one_hot(label.clamp(max=dim - 1), dim).float()
    return onehot.permute(0, 3, 1, 2).contiguous()


def _two_class_label() -> torch.Tensor:
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[:, :, 2:] = 2  # background and class 2 (class 1 absent)
    return label


def test_matching_student_has_low_loss_and_swapped_high_by_hand() -> None:
    label = _two_class_label()
    teacher = _features(label)
    matched = contrastive_separation_loss(
        teacher.clone(), teacher, label, num_classes=3, temperature=T
    )
    # Own prototype: cos 1; the other present class: cos 0. Absent class 1 and class 3 are not
    # negatives (otherwise the denominator would gain exp(0) terms).
    assert float(matched) == pytest.approx(math.log1p(math.exp(-1 / T)), abs=2e-6)
    swapped = _features(torch.where(label == 0, torch.full_like(label, 2), torch.zeros_like(label)))
    value = contrastive_separation_loss(swapped, teacher, label, num_classes=3, temperature=T)
    assert float(value) == pytest.approx(math.log1p(math.exp(1 / T)), rel=1e-4)
    assert float(matched) < float(value)


def test_gradient_reaches_only_the_student() -> None:
    label = _two_class_label()
    student = torch.randn(1, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 4, 4, 4, requires_grad=True)
    contrastive_separation_loss(student, teacher, label, num_classes=3).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher.grad is None


def test_single_class_images_give_an_attached_zero() -> None:
    label = torch.zeros(2, 4, 4, dtype=torch.long)
    label[1] = 255
    label[1, 0, 0] = 1  # image 1: one class plus ignore
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    value = contrastive_separation_loss(student, torch.randn(2, 4, 4, 4), label, num_classes=2)
    assert float(value.detach()) == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


def test_weights_ignore_and_per_image_classes() -> None:
    label = _two_class_label().repeat(2, 1, 1)
    label[1] = torch.where(label[1] == 2, torch.ones_like(label[1]), label[1])  # image 1: bg, 1
    teacher = _features(label)
    student = teacher.clone()
    student[0, :, :, 2:] = _features(torch.zeros(1, 4, 2, dtype=torch.long))[0]  # image 0 wrong
    weights = torch.ones(2, 4, 4)
    weights[0] = 0.0  # drop image 0 entirely -> only the perfect image 1 counts
    value = contrastive_separation_loss(student, teacher, label, num_classes=3, weights=weights)
    assert float(value) == pytest.approx(math.log1p(math.exp(-1 / T)), abs=2e-6)
    # Ignored (255) pixels do not count either.
    ignored = label.clone()
    ignored[0, :, 2:] = 255
    value = contrastive_separation_loss(student, teacher, ignored, num_classes=3)
    # Image 0 is left with one class: no negative, so it is skipped as a whole.
    assert float(value) == pytest.approx(math.log1p(math.exp(-1 / T)), abs=2e-6)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ConfigError, match="one grid"):
        contrastive_separation_loss(
            torch.rand(1, 4, 4, 4),
            torch.rand(1, 4, 2, 2),
            torch.zeros(1, 4, 4, dtype=torch.long),
            num_classes=2,
        )


def test_csp_labels_come_from_the_centre_of_each_16_pixel_cell() -> None:
    """A 32x32 map (2x2 cells) whose only class-1 pixels are the cells' top-left corners and
    whose class-2 pixels are the centre of the top-right and bottom-left cells."""
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[0, ::16, ::16] = 1  # (0, 0), (0, 16), (16, 0), (16, 16): what nearest would read
    label[0, 8, 24] = 2
    label[0, 24, 8] = 2
    label[0, 24, 24] = 255
    assert labels_at_cell_centres(label, (2, 2)).tolist() == [[[0, 2], [2, 255]]]
    nearest = torch.nn.functional.interpolate(label[:, None].float(), size=(2, 2), mode="nearest")
    assert nearest.long()[:, 0].tolist() == [[[1, 1], [1, 1]]]  # the corner-sampling it replaces
    # A non-multiple size: 10 pixels on 3 cells, centres at floor(1.67), floor(5), floor(8.33).
    row = torch.arange(10).repeat(10, 1)[None]  # (1, 10, 10): label = column index
    assert labels_at_cell_centres(row, (3, 3))[0, 0].tolist() == [1, 5, 8]
