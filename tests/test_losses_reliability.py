"""RAW: labels and perplexity weights on hand-made CAM pixels."""

from __future__ import annotations

import math

import pytest
import torch

from cosa.errors import ConfigError
from cosa.losses import reliability_pseudo_label

LOW, HIGH = 0.3, 0.7  # tau = 0.5
FULL_BOX = torch.tensor([[0, 1, 0, 4]])


def _cam(*pixels: tuple[float, float, float]) -> torch.Tensor:
    """(1, 3, 1, N) CAM from N (class1, class2, class3) triples."""
    return torch.tensor(pixels).T[None, :, None, :]


def test_certain_pixel_has_weight_one_and_tied_pixel_one_over_k() -> None:
    cam = _cam((1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.0, 0.0, 0.0), (0.0, 0.5, 0.9))
    labels = torch.tensor([[1.0, 1.0, 0.0]])  # class 3 absent
    label, weight = reliability_pseudo_label(cam, labels, FULL_BOX, LOW, HIGH, temperature=0.01)
    assert label.dtype == torch.int64 and weight.dtype == torch.float32
    # Pixel 0: class 1 at 1.0 vs background 0.5, T = 0.01 -> one-hot, PP -> 1.
    assert int(label[0, 0, 0]) == 1 and float(weight[0, 0, 0]) > 0.999
    # Pixel 1: background and both present classes tie at tau -> uniform over K = 3 -> w = 1/3.
    assert float(weight[0, 0, 1]) == pytest.approx(1 / 3, rel=1e-5)
    # Pixel 2: all CAMs 0 -> background, certain.
    assert int(label[0, 0, 2]) == 0 and float(weight[0, 0, 2]) > 0.999
    # Pixel 3: the absent class 3 (0.9) neither wins nor adds perplexity; class 2 ties with tau.
    assert int(label[0, 0, 3]) in (0, 2)
    assert float(weight[0, 0, 3]) == pytest.approx(0.5, rel=1e-5)


def test_weight_by_hand_at_the_default_temperature() -> None:
    cam = _cam((0.6, 0.0, 0.0))
    label, weight = reliability_pseudo_label(
        cam, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0, 1, 0, 1]]), LOW, HIGH, beta=2.0
    )
    # q = softmax([0.5, 0.6] / 0.1) = softmax([5, 6]).
    q1 = 1.0 / (1.0 + math.exp(-1.0))
    entropy = -(q1 * math.log(q1) + (1 - q1) * math.log(1 - q1))
    assert int(label) == 1
    assert float(weight) == pytest.approx(math.exp(-2.0 * entropy), rel=1e-5)


def test_outside_box_and_optional_band_are_ignored() -> None:
    cam = _cam((0.9, 0.0, 0.0), (0.6, 0.0, 0.0), (0.1, 0.0, 0.0), (0.9, 0.0, 0.0))
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    box = torch.tensor([[0, 1, 0, 3]])  # last column outside
    label, weight = reliability_pseudo_label(cam, labels, box, LOW, HIGH)
    assert label.tolist() == [[[1, 1, 0, 255]]]
    assert float(weight[0, 0, 3]) == 0.0 and bool(torch.all(weight[0, 0, :3] > 0))
    banded, band_weight = reliability_pseudo_label(
        cam, labels, box, LOW, HIGH, keep_ignore_band=True
    )
    assert banded.tolist() == [[[1, 255, 0, 255]]]  # 0.6 lies in (0.3, 0.7]
    assert float(band_weight[0, 0, 1]) == 0.0


def test_tensor_thresholds_and_no_gradient() -> None:
    cam = torch.rand(2, 3, 4, 4, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    box = torch.tensor([[0, 4, 0, 4], [0, 4, 0, 4]])
    a = reliability_pseudo_label(cam, labels, box, torch.tensor(LOW), torch.tensor(HIGH))
    b = reliability_pseudo_label(cam, labels, box, LOW, HIGH)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert not a[1].requires_grad
    # Labels only ever name present classes (or background).
    assert set(a[0][0].unique().tolist()) <= {0, 1, 3}
    assert set(a[0][1].unique().tolist()) <= {0, 2}
    # Perplexity bounds: 1 <= PP <= K_i, so 1/K_i <= w <= 1.
    assert float(a[1].min()) >= 1 / 3 - 1e-6 and float(a[1].max()) <= 1.0


def test_bad_temperature_raises() -> None:
    with pytest.raises(ConfigError, match="reliability.temperature"):
        reliability_pseudo_label(
            torch.rand(1, 1, 2, 2),
            torch.ones(1, 1),
            torch.tensor([[0, 2, 0, 2]]),
            LOW,
            HIGH,
            temperature=0.0,
        )
