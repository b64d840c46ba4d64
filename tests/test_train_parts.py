"""LR schedule and the resumable sampler."""

import pytest
import torch

from cosa.train.sampler import ResumableSampler
from cosa.train.schedule import lr_multiplier


def test_lr_warmup_then_poly() -> None:
    assert lr_multiplier(0, 1500, 32000, 0.9) == pytest.approx(1e-6 * 1.0, rel=1e-3)
    # The reference's warm-up is linear alone: the poly decay starts after it.
    assert lr_multiplier(750, 1500, 32000, 0.9) == pytest.approx(0.5, rel=1e-5)
    assert lr_multiplier(1499, 1500, 32000, 0.9) == pytest.approx(1499 / 1500, rel=1e-5)
    assert lr_multiplier(1500, 1500, 32000, 0.9) == pytest.approx((1 - 1500 / 32000) ** 0.9)
    assert lr_multiplier(32000, 1500, 32000, 0.9) == 0.0


def _take(sampler: ResumableSampler, n: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_resumes_exactly_and_shards_ranks() -> None:
    full = _take(ResumableSampler(10, 2, 0, 1, seed=5), 20)  # 5 iterations per epoch, 2 epochs
    resumed = _take(ResumableSampler(10, 2, 0, 1, seed=5, start_iteration=3), 14)
    assert resumed == full[6:]
    assert sorted(i for e, i in full[:10]) == list(range(10)) and full[10][0] == 1
    rank0 = _take(ResumableSampler(10, 2, 0, 2, seed=5), 4)
    rank1 = _take(ResumableSampler(10, 2, 1, 2, seed=5), 4)
    assert not {i for _, i in rank0} & {i for _, i in rank1}


def test_sampler_rejects_tiny_dataset() -> None:
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableSampler(3, 2, 0, 2, seed=0)


def test_supervised_loss_on_a_crop_whose_pixels_are_all_ignored_is_finite() -> None:
    from cosa.train.supervised import pixel_cross_entropy

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = pixel_cross_entropy(logits, ignored)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(logits.grad == 0)
    target = ignored.clone()
    target[0, 0, 0] = 2  # one labelled pixel: its own CE, as F.cross_entropy gives
    expected = torch.nn.functional.cross_entropy(logits[:1, :, 0, 0], torch.tensor([2]))
    torch.testing.assert_close(pixel_cross_entropy(logits, target), expected)
