"""Batched EM mixture and the dynamic threshold queue."""

from __future__ import annotations

import io

import pytest
import torch

from cosa.errors import CheckpointError, ConfigError
from cosa.pseudo import DynamicThresholds, fit_gaussian_mixture_1d, queue_values

MODES = (0.1, 0.5, 0.9)
SIDE = 8  # 8 x 8 values per queued image


def _mixture(counts: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Three well separated modes (sd 0.03) at MODES, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    parts = [
        mode + 0.03 * torch.randn(count, generator=generator)
        for mode, count in zip(MODES, counts, strict=True)
    ]
    values = torch.cat(parts).clamp(0.0, 1.0)
    return values[torch.randperm(values.numel(), generator=generator)]


def _maps(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, SIDE, SIDE)


def test_fit_recovers_a_known_mixture() -> None:
    values = _mixture((3000, 1000, 2000))
    fit = fit_gaussian_mixture_1d(values, k=3, iters=20)
    torch.testing.assert_close(fit.means, torch.tensor(MODES), atol=0.01, rtol=0)
    torch.testing.assert_close(fit.variances.sqrt(), torch.full((3,), 0.03), atol=0.005, rtol=0)
    torch.testing.assert_close(fit.weights, torch.tensor([0.5, 1 / 6, 1 / 3]), atol=0.01, rtol=0)
    # Every value goes to the mode it was drawn from (modes are > 10 sd apart).
    nearest = (values[:, None] - torch.tensor(MODES)).abs().argmin(dim=1)
    assert torch.equal(fit.assignment, nearest)


def test_fit_ignores_masked_values() -> None:
    values = _mixture((500, 500, 500))
    outliers = torch.full((300,), -5.0)
    data = torch.cat([values, outliers])
    mask = data > -1.0
    fit = fit_gaussian_mixture_1d(data, k=3, iters=20, mask=mask)
    torch.testing.assert_close(fit.means, torch.tensor(MODES), atol=0.01, rtol=0)
    assert torch.all(fit.assignment[-300:] == -1)
    assert torch.all(fit.assignment[:-300] >= 0)


def test_fit_with_nothing_valid_is_finite() -> None:
    fit = fit_gaussian_mixture_1d(torch.rand(50), mask=torch.zeros(50, dtype=torch.bool))
    assert torch.all(torch.isfinite(fit.means)) and torch.all(torch.isfinite(fit.variances))
    assert torch.all(fit.assignment == -1)


def test_fit_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="k >= 1"):
        fit_gaussian_mixture_1d(torch.rand(10), k=0)
    with pytest.raises(ConfigError, match="mask shape"):
        fit_gaussian_mixture_1d(torch.rand(10), mask=torch.ones(9, dtype=torch.bool))


def test_fit_agrees_with_scikit_learn() -> None:
    from sklearn import mixture  # a dev dependency: this comparison must run in CI

    values = _mixture((2000, 700, 1300), seed=3)
    ours = fit_gaussian_mixture_1d(values, k=3, iters=50)
    data = values.double().numpy()[:, None]
    reference = mixture.GaussianMixture(
        3,
        means_init=[[data.min()], [float(torch.median(values))], [data.max()]],
        weights_init=[1 / 3] * 3,
        max_iter=200,
        tol=1e-8,
    ).fit(data)
    order = reference.means_[:, 0].argsort()
    torch.testing.assert_close(
        ours.means.double(), torch.from_numpy(reference.means_[order, 0]), atol=2e-3, rtol=0
    )


def test_thresholds_move_toward_the_gaps() -> None:
    thresholds = DynamicThresholds(
        0.05, 0.95, queue_images=40, values_per_image=SIDE * SIDE, ema=0.5, min_value=0.05
    )
    for step in range(30):
        low, high = thresholds.update(_maps(_mixture((128, 64, 128), seed=step)))
    # The low mode ends near 0.1 + 3 sd and the high mode starts near 0.9 - 3 sd; the middle
    # mode (0.5) takes the values in between.
    assert 0.15 < float(low) < 0.35
    assert 0.65 < float(high) < 0.85
    assert low.shape == () and low.dtype == torch.float32


def test_one_update_is_an_ema_step_toward_the_fitted_candidates() -> None:
    thresholds = DynamicThresholds(
        0.25, 0.70, queue_images=4, values_per_image=SIDE * SIDE, ema=0.99, em_iters=10
    )
    maps = _maps(_mixture((100, 56, 100)))  # 4 images: fills the whole queue
    low, high = thresholds.update(maps)
    values = maps.flatten()
    fit = fit_gaussian_mixture_1d(values, k=3, iters=10, mask=values > 0.05)
    candidate_low = values[fit.assignment == 0].max()
    candidate_high = values[fit.assignment == 2].min()
    torch.testing.assert_close(low, 0.99 * torch.tensor(0.25) + 0.01 * candidate_low)
    torch.testing.assert_close(high, 0.99 * torch.tensor(0.70) + 0.01 * candidate_high)


def test_degenerate_data_keeps_the_thresholds() -> None:
    thresholds = DynamicThresholds(0.25, 0.70, queue_images=2, values_per_image=SIDE * SIDE)
    low, high = thresholds.update(torch.full((2, SIDE, SIDE), 0.01))  # all <= min_value
    assert float(low) == pytest.approx(0.25) and float(high) == pytest.approx(0.70)
    low, high = thresholds.update(torch.full((2, SIDE, SIDE), 0.4))  # constant
    assert float(low) == pytest.approx(0.25) and float(high) == pytest.approx(0.70)
    # Masked-out pixels are stored as 0 and dropped as well.
    valid = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    low, high = thresholds.update(torch.rand(2, SIDE, SIDE), valid=valid)
    assert float(low) == pytest.approx(0.25) and float(high) == pytest.approx(0.70)
    assert torch.equal(thresholds.state_dict()["queue"], torch.zeros(2, SIDE * SIDE))


def test_queue_is_a_ring_buffer() -> None:
    thresholds = DynamicThresholds(0.25, 0.70, queue_images=3, values_per_image=4)
    first = torch.full((2, 2, 2), 0.3)
    second = torch.full((2, 2, 2), 0.6)
    thresholds.update(first)
    thresholds.update(second)  # rows 2 and 0 (wrapped)
    state = thresholds.state_dict()
    torch.testing.assert_close(state["queue"][:, 0], torch.tensor([0.6, 0.3, 0.6]))
    assert state["pointer"] == 1


def test_state_dict_round_trip_gives_identical_next_update() -> None:
    kwargs = dict(queue_images=6, values_per_image=SIDE * SIDE, ema=0.9, seed=5)
    original = DynamicThresholds(0.25, 0.70, **kwargs)
    for step in range(3):
        original.update(_maps(_mixture((96, 64, 96), seed=step))[:2])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = DynamicThresholds(0.3, 0.6, **{**kwargs, "seed": 99})
    restored.load_state_dict(torch.load(buffer))
    nxt = _maps(_mixture((96, 64, 96), seed=10))[:2]
    a_low, a_high = original.update(nxt)
    b_low, b_high = restored.update(nxt)
    assert torch.equal(a_low, b_low) and torch.equal(a_high, b_high)
    assert torch.equal(original.state_dict()["queue"], restored.state_dict()["queue"])


def test_errors_name_the_fix() -> None:
    thresholds = DynamicThresholds(0.25, 0.70, queue_images=2, values_per_image=16)
    with pytest.raises(ConfigError, match="pool them"):
        thresholds.update(torch.rand(2, 3, 3))
    with pytest.raises(CheckpointError, match="same thresholds"):
        thresholds.load_state_dict(
            {
                "queue": torch.zeros(3, 16),
                "pointer": 0,
                "low": torch.tensor(0.2),
                "high": torch.tensor(0.7),
            }
        )
    with pytest.raises(CheckpointError, match="lacks"):
        thresholds.load_state_dict({"queue": torch.zeros(2, 16)})
    with pytest.raises(ConfigError, match="low < high"):
        DynamicThresholds(0.7, 0.25, queue_images=2, values_per_image=16)


def _device_roundtrip(device: str) -> None:
    thresholds = DynamicThresholds(
        0.25, 0.70, queue_images=4, values_per_image=SIDE * SIDE, device=device
    )
    low, high = thresholds.update(_maps(_mixture((96, 64, 96))).to(device)[:2])
    assert low.device.type == device and high.device.type == device
    assert thresholds.state_dict()["queue"].device.type == device


def test_runs_on_the_input_device_cpu() -> None:
    _device_roundtrip("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_input_device_cuda_and_matches_cpu() -> None:
    _device_roundtrip("cuda")
    maps = _maps(_mixture((128, 64, 128)))
    cpu = DynamicThresholds(0.25, 0.70, queue_images=8, values_per_image=SIDE * SIDE)
    gpu = DynamicThresholds(0.25, 0.70, queue_images=8, values_per_image=SIDE * SIDE, device="cuda")
    c_low, c_high = cpu.update(maps)
    g_low, g_high = gpu.update(maps.cuda())
    torch.testing.assert_close(g_low.cpu(), c_low, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_high.cpu(), c_high, atol=1e-5, rtol=0)


def test_queue_values_pool_the_max_cam_and_mark_the_box() -> None:
    cam = torch.zeros(1, 2, 32, 32)
    cam[0, 0, :, :16] = 0.8
    cam[0, 1, :, 16:] = 0.4
    max_cam, valid = queue_values(cam, torch.tensor([[0, 32, 0, 16]]), stride=16)
    torch.testing.assert_close(max_cam, torch.tensor([[[0.8, 0.4], [0.8, 0.4]]]))
    assert valid.tolist() == [[[True, False], [True, False]]]
    thresholds = DynamicThresholds(0.25, 0.70, queue_images=2, values_per_image=4)
    thresholds.update(max_cam, valid)
    assert thresholds.state_dict()["queue"][0].tolist() == pytest.approx(
        [0.8, 0.0, 0.8, 0.0], abs=1e-5
    )
    with pytest.raises(ConfigError, match="thresholds.stride"):
        queue_values(cam, torch.tensor([[0, 32, 0, 16]]), stride=0)
