"""The run-duration estimate: its arithmetic, and that timing the parts leaves the run untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosa.config import apply_overrides
from cosa.data import write_synthetic_dataset
from cosa.train.estimate import (
    DurationEstimate,
    estimate_duration,
    evaluated_images,
    remaining_steps,
)
from tests.train_fixtures import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("estimate") / "data"
    write_synthetic_dataset(root, 8, 2, 2, seed=1)
    return root


def _values(thresholds: dict[str, float | torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in thresholds.items()}


def test_remaining_steps_split_warmup_and_full_steps(data: Path) -> None:
    # warmup_iters=120: steps 1..121 have warmup_factor 0 (step index 0..120).
    cfg = apply_overrides(tiny_config(data), {"train.max_iters": 800, "loss.warmup_iters": 120})
    assert remaining_steps(cfg, 0) == (121, 679)
    assert remaining_steps(cfg, 100) == (21, 679)
    assert remaining_steps(cfg, 121) == (0, 679)
    assert remaining_steps(cfg, 500) == (0, 300)
    short = apply_overrides(cfg, {"train.max_iters": 50})
    assert remaining_steps(short, 0) == (50, 0)
    full = apply_overrides(cfg, {"train.supervision": "full"})
    assert remaining_steps(full, 10) == (790, 0)


def test_evaluated_images_count_every_evaluation_and_the_test_split(data: Path) -> None:
    cfg = apply_overrides(
        tiny_config(data),
        {"train.max_iters": 800, "train.eval_every": 200, "train.eval_max_images": 0},
    )
    # evaluations at 200, 400, 600, 800 on 60 val images, then 100 test images
    assert evaluated_images(cfg, 0, val_images=60, test_images=100) == 4 * 60 + 100
    assert evaluated_images(cfg, 400, val_images=60, test_images=100) == 2 * 60 + 100
    odd = apply_overrides(cfg, {"train.max_iters": 900, "train.eval_max_images": 10})
    # 200, 400, 600, 800 and the last step (900), 10 images each
    assert evaluated_images(odd, 0, val_images=60, test_images=0) == 5 * 10


def test_duration_adds_up_and_reads_in_minutes() -> None:
    estimate = DurationEstimate(
        warmup_steps=121,
        full_steps=679,
        warmup_s_per_it=0.5,
        full_s_per_it=1.0,
        evaluated_images=340,
        s_per_eval_image=0.5,
    )
    assert estimate.seconds == pytest.approx(60.5 + 679 + 170)
    assert estimate.describe() == (
        "expected: about 15 min on this machine (121 warm-up steps at 0.50 s, "
        "679 full steps at 1.00 s, 340 image evaluations at 0.50 s)"
    )
    assert estimate.to_json()["seconds"] == pytest.approx(909.5)


def test_estimating_leaves_the_run_untouched(data: Path, tmp_path: Path) -> None:
    from cosa.train.distributed import setup_distributed
    from cosa.train.trainer import Trainer

    cfg = tiny_config(data, **{"train.max_iters": 6, "loss.warmup_iters": 2})
    trainer = Trainer(cfg, tmp_path / "run", setup_distributed("cpu"), resume=False)
    state = trainer.state
    before = {k: v.clone() for k, v in state.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    thresholds_before = _values(state.thresholds.current())
    batch = next(trainer.batches)
    generator_before = torch.get_rng_state()
    calls: list[int] = []

    estimate = estimate_duration(
        state,
        trainer.objective,
        trainer.cfg,
        trainer.ctx,
        trainer.amp_dtype,
        batch,
        evaluate_one_image=lambda: calls.append(1),
        val_images=2,
        test_images=2,
    )

    assert (estimate.warmup_steps, estimate.full_steps) == (3, 3)
    assert estimate.warmup_s_per_it > 0 and estimate.full_s_per_it > 0
    assert calls == [1, 1]  # timed twice, the second call counts
    assert estimate.evaluated_images == 3 * 2 + 2  # val at 2, 4, 6; test once
    assert state.iteration == 0
    assert not state.optimizer.state  # AdamW never stepped the real parameters
    for key, value in state.student.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in state.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert _values(state.thresholds.current()) == thresholds_before
    assert torch.equal(torch.get_rng_state(), generator_before)


def test_a_run_prints_its_estimate_and_trains_as_without_it(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cosa.train.trainer as trainer_module
    from cosa.checkpoint import load_checkpoint
    from cosa.train.runlog import read_metrics
    from cosa.train.trainer import train

    monkeypatch.setattr(trainer_module, "MIN_STEPS_TO_ESTIMATE", 1)
    # Two warm-up steps and a full one, one evaluation (at the end), no pictures.
    cfg = tiny_config(
        data,
        **{
            "train.max_iters": 3,
            "train.eval_every": 3,
            "train.checkpoint_every": 3,
            "train.vis_images": 0,
        },
    )
    train(cfg, tmp_path / "estimated", device="cpu", progress=True)
    captured = capsys.readouterr()
    assert "expected: about" in captured.err and "expected" not in captured.out
    records = read_metrics(tmp_path / "estimated" / "metrics.jsonl")
    estimates = [r for r in records if r["kind"] == "estimate"]
    assert len(estimates) == 1 and estimates[0]["iter"] == 0
    assert (estimates[0]["warmup_steps"], estimates[0]["full_steps"]) == (2, 1)

    train(cfg, tmp_path / "plain", device="cpu", progress=False)
    estimated = load_checkpoint(tmp_path / "estimated" / "checkpoints" / "last.pt")
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    for weights, reference in (
        (estimated.online, plain.online),
        (estimated.teacher, plain.teacher),
    ):
        for key, value in reference.items():
            assert torch.equal(weights[key], value), key
