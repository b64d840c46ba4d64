"""End-to-end training on a tiny synthetic set.

Run folder, exact resume after kill -9, DDP on gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_config
from typer.testing import CliRunner

from cli import app
from cosa.checkpoint import load_checkpoint
from cosa.data import write_synthetic_dataset
from cosa.files import stale_temporaries
from cosa.train.launch import launch


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, 8, 2, 2, seed=1)
    return root


def _cfg(data: Path, **extra: object):
    return tiny_config(data, **extra)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_folder_and_exact_resume_after_kill(tiny_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    result = launch(_cfg(tiny_data), straight, device="cpu", progress=False)
    assert result.iterations == 4 and result.best_checkpoint is not None
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    for key in (
        "loss/cls",
        "loss/cls_aux",
        "loss/seg",
        "loss/cam",
        "loss/reg",
        "loss/csp",
        "tau_low",
        "tau_high",
        "lr/group0",
        "sec_per_it",
    ):
        assert key in steps[-1], key
    assert steps[0]["loss/seg"] == 0.0 and steps[-1]["loss/seg"] > 0.0  # warm-up switch
    assert sum(r["kind"] == "eval" for r in records) == 2
    for name in ("config.yaml", "curves.png", "vis/iter_000002.png", "vis/iter_000004.png"):
        assert (straight / name).is_file(), name
    final = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert final.thresholds is not None and "main" in final.thresholds

    # The same run, killed with SIGKILL once a checkpoint exists, then resumed: identical weights.
    killed = tmp_path / "killed"
    script = (
        "import sys, pickle; from cosa.train.launch import launch; "
        "cfg = pickle.loads(bytes.fromhex(sys.argv[1])); "
        "launch(cfg, __import__('pathlib').Path(sys.argv[2]), device='cpu', progress=False)"
    )
    import pickle

    proc = subprocess.Popen(
        [sys.executable, "-c", script, pickle.dumps(_cfg(tiny_data)).hex(), str(killed)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(last).iteration  # loadable whatever the moment of the kill
    assert 1 <= stopped_at <= 4
    resumed = launch(_cfg(tiny_data), killed, device="cpu", resume=True, progress=False)
    assert resumed.iterations == 4
    assert stale_temporaries(killed / "checkpoints") == []  # a killed save's temp file is swept
    again = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert _same_state(final.online, again.online)
    assert _same_state(final.teacher, again.teacher)
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if r["kind"] == "step"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tiny_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_data, **{"train.max_iters": 3, "train.eval_every": 3})
    summary = launch(cfg, tmp_path / "ddp", device="cpu", nproc=2, progress=False)
    assert summary["world_size"] == 2
    assert summary["ddp_max_param_divergence"] == 0.0
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt").iteration == 3


def test_cli_errors_are_one_line_exit_2(tiny_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--resume"])
    assert res.exit_code == 2 and "no checkpoint" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--set", "loss.seg_wieght=1"])
    assert res.exit_code == 2 and "did you mean 'seg_weight'" in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path)])
    assert res.exit_code == 2 and str(tmp_path) in res.output


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step log is read back one step late; it still catches a NaN loss before the
    checkpoint of that step is written, and names the step."""
    from cosa.train.trainer import Trainer

    step = Trainer._step

    def nan_at_three(self: Trainer, batch: dict) -> dict:
        record = step(self, batch)
        if self.iteration == 3:
            record["loss/total"] = record["loss/total"] * float("nan")
        return record

    monkeypatch.setattr(Trainer, "_step", nan_at_three)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="loss became nan at iteration 3"):
        launch(_cfg(tiny_data, **{"train.eval_every": 100}), out, device="cpu", progress=False)
    assert load_checkpoint(out / "checkpoints" / "last.pt").iteration == 2
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in steps if r["kind"] == "step"] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_cuda_with_autocast_and_logs_every_step(tiny_data: Path, tmp_path: Path) -> None:
    result = launch(_cfg(tiny_data), tmp_path / "run", device="cuda", progress=False)
    assert result.iterations == 4
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    assert all(isinstance(r["loss/total"], float) and r["loss/total"] > 0 for r in steps)
    assert steps[-1]["loss/seg"] > 0 and 0 < steps[-1]["tau_low"] < steps[-1]["tau_high"] < 1
