"""End-to-end training on a tiny synthetic set.

Run folder, exact resume after kill -9, DDP on gloo.
"""

from __future__ import annotations

import json
import os
import pickle
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
from cosa.config import CosaConfig
from cosa.data import write_synthetic_dataset
from cosa.files import stale_temporaries
from cosa.train.launch import launch


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    # No test split: no run here reads the test report, which scores every test image at full
    # size at the end of each run (the CLI journey checks it).
    write_synthetic_dataset(root, 8, 2, 0, seed=1)
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

    # The same run, killed with SIGKILL halfway through writing iteration 3's checkpoint: the
    # run has not finished, last.pt still holds iteration 2 and the atomic writer's half-written
    # temporary file is left beside it. Resuming sweeps that file and ends with the same weights.
    killed = tmp_path / "killed"
    stale = _kill_while_saving(tmp_path, _cfg(tiny_data), killed, iteration=3, nproc=1)
    assert stale_temporaries(killed / "checkpoints") == [stale] and stale.stat().st_size > 0
    assert load_checkpoint(killed / "checkpoints" / "last.pt").iteration == 2
    assert not (killed / "curves.png").exists()  # written when a run ends
    resumed = launch(_cfg(tiny_data), killed, device="cpu", resume=True, progress=False)
    assert resumed.iterations == 4
    assert stale_temporaries(killed / "checkpoints") == []  # the killed save's file is swept
    assert stale_temporaries(killed) == [] and stale_temporaries(killed / "vis") == []
    again = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert _same_state(final.online, again.online)
    assert _same_state(final.teacher, again.teacher)
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if r["kind"] == "step"] == [1, 2, 3, 4]


BLOCKED_SAVE = """
import io, os, pickle, sys, threading
from pathlib import Path

import torch

from cosa.files import write_text_atomic
from cosa.train.launch import launch

save = torch.save


def save_half_then_block(payload, file, *args, **kwargs):
    # Half of the chosen iteration's checkpoint is written; say where, then wait to be killed.
    if isinstance(payload, dict) and payload.get("iteration") == int(os.environ["BLOCK_AT"]):
        encoded = io.BytesIO()
        save(payload, encoded, *args, **kwargs)
        file.write(encoded.getvalue()[: len(encoded.getvalue()) // 2])
        file.flush()
        write_text_atomic(Path(os.environ["BLOCKED"]), file.name)  # seen whole or not at all
        threading.Event().wait()
    save(payload, file, *args, **kwargs)


torch.save = save_half_then_block  # spawned ranks import this file as __mp_main__

if __name__ == "__main__":
    cfg = pickle.loads(bytes.fromhex(sys.argv[1]))
    launch(cfg, Path(sys.argv[2]), device="cpu", nproc=int(sys.argv[3]), progress=False)
"""


def _kill_while_saving(
    scratch: Path, cfg: CosaConfig, out: Path, iteration: int, nproc: int
) -> Path:
    """Train `cfg` into `out` in a child process group; SIGKILL it (the launcher and its ranks)
    while it is half-way through writing the checkpoint of `iteration`. No timing: the child
    blocks in that write and the kill waits for it to say so.

    Returns:
        The half-written temporary file the kill left behind.
    """
    script, blocked = scratch / "blocked_save.py", scratch / f"{out.name}.blocked"
    script.write_text(BLOCKED_SAVE)
    proc = subprocess.Popen(
        [sys.executable, str(script), pickle.dumps(cfg).hex(), str(out), str(nproc)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"}
        | {"BLOCK_AT": str(iteration), "BLOCKED": str(blocked)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # only reached when something is broken
        while not blocked.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the save it should be killed in"
        assert blocked.exists(), "the run never reached the save it should be killed in"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Path(blocked.read_text())


@pytest.mark.slow
def test_ddp_kill_and_resume_is_exact_with_shared_thresholds(
    tiny_data: Path, tmp_path: Path
) -> None:
    """Two gloo ranks: one dynamic-threshold state (the ranks' max-CAM rows gathered), losses
    logged as the mean over ranks, and a run killed with SIGKILL then resumed ends with the
    weights and thresholds of the uninterrupted run."""
    cfg = _cfg(tiny_data, **{"train.eval_every": 100, "train.vis_images": 0})
    straight = launch(cfg, tmp_path / "straight", device="cpu", nproc=2, progress=False)
    assert straight.extra["world_size"] == 2 and straight.extra["ddp_max_param_divergence"] == 0.0
    final = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert final.iteration == 4
    log = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in log]
    assert [r["iter"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4]

    killed = tmp_path / "killed"
    stale = _kill_while_saving(tmp_path, cfg, killed, iteration=3, nproc=2)
    assert stale_temporaries(killed / "checkpoints") == [stale]
    assert load_checkpoint(killed / "checkpoints" / "last.pt").iteration == 2
    resumed = launch(cfg, killed, device="cpu", nproc=2, resume=True, progress=False)
    assert resumed.iterations == 4 and resumed.extra["ddp_max_param_divergence"] == 0.0
    again = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert _same_state(final.online, again.online)
    assert _same_state(final.teacher, again.teacher)
    assert final.thresholds is not None and again.thresholds is not None
    for name in ("main", "aux"):
        for key in ("queue", "low", "high"):
            assert torch.equal(final.thresholds[name][key], again.thresholds[name][key]), key


def test_warm_up_as_the_reference(tiny_data: Path, tmp_path: Path) -> None:
    """During the warm-up the decoder gets zero gradients (AdamW decays it and counts its steps)
    and the dynamic thresholds already follow the teacher's CAMs."""
    from cosa.config import preset
    from cosa.train.threshold_pair import ThresholdPair

    settings = {"loss.warmup_iters": 10, "train.max_iters": 3, "thresholds.queue_images": 16}
    settings |= {"train.eval_every": 100, "train.eval_max_images": 1}  # one short evaluation
    cfg = _cfg(tiny_data, **settings, **{"train.vis_images": 0, "loss.reference_warmup": True})
    launch(cfg, tmp_path / "run", device="cpu", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.optimizer is not None and ckpt.thresholds is not None
    groups = {g["name"]: g["params"] for g in ckpt.optimizer["param_groups"]}
    for index in groups["decoder"]:
        state = ckpt.optimizer["state"][index]
        assert float(state["step"]) == 3 and float(state["exp_avg"].abs().max()) == 0.0
    initial = ThresholdPair(cfg, _cpu_context()).state_dict()
    main = ckpt.thresholds["main"]
    assert float(main["low"]) != pytest.approx(float(initial["main"]["low"]), abs=1e-7)
    pushed = cfg.train.batch_size * 3  # rows of real max-CAM values in the 16-row queue
    assert not torch.equal(main["queue"][:pushed], initial["main"]["queue"][:pushed])
    assert torch.equal(main["queue"][pushed:], initial["main"]["queue"][pushed:])
    assert preset("coco").thresholds.queue_images == 400  # the reference's batch x 50
    assert preset("voc").loss.reference_warmup and not preset("demo").loss.reference_warmup


def test_warm_up_without_the_reference_s_extras(tiny_data: Path, tmp_path: Path) -> None:
    """`loss.reference_warmup=false` (the demo's): no decoder step and no threshold update before
    the switch."""
    from cosa.train.threshold_pair import ThresholdPair

    settings = {"loss.warmup_iters": 10, "train.max_iters": 3, "thresholds.queue_images": 16}
    settings |= {"train.eval_every": 100, "train.eval_max_images": 1}  # one short evaluation
    cfg = _cfg(tiny_data, **settings, **{"train.vis_images": 0, "loss.reference_warmup": False})
    launch(cfg, tmp_path / "run", device="cpu", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.optimizer is not None and ckpt.thresholds is not None
    groups = {g["name"]: g["params"] for g in ckpt.optimizer["param_groups"]}
    assert all(index not in ckpt.optimizer["state"] for index in groups["decoder"])
    initial = ThresholdPair(cfg, _cpu_context()).state_dict()
    assert torch.equal(ckpt.thresholds["main"]["queue"], initial["main"]["queue"])


def _cpu_context():
    from cosa.train.distributed import DistContext

    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


NAN_ON_RANK_1 = """
import os, pickle, sys
from pathlib import Path

from cosa.losses import CosaObjective
from cosa.train.launch import launch

objective = CosaObjective.__call__


def nan_on_rank_1(self, student, teacher, batch, thresholds, iteration):
    result = objective(self, student, teacher, batch, thresholds, iteration)
    if os.environ["RANK"] == "1" and iteration == 2:  # 0-based: the log's iteration 3
        result = result._replace(total=result.total * float("nan"))
    return result


CosaObjective.__call__ = nan_on_rank_1  # spawned ranks import this file as __mp_main__

if __name__ == "__main__":
    cfg = pickle.loads(bytes.fromhex(sys.argv[1]))
    launch(cfg, Path(sys.argv[2]), device="cpu", nproc=2, progress=False)
"""


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank_with_one_message(
    tiny_data: Path, tmp_path: Path
) -> None:
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    cfg = _cfg(tiny_data, **{"train.eval_every": 100, "train.vis_images": 0})
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(script), pickle.dumps(cfg).hex(), str(out)],
        capture_output=True,
        text=True,
        timeout=300,  # a rank left waiting in an all-reduce would hang until the group's timeout
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode != 0
    assert done.stderr.count("FloatingPointError: loss became nan at iteration 3") == 1
    assert load_checkpoint(out / "checkpoints" / "last.pt").iteration == 2


def test_cli_errors_are_one_line_exit_2(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--resume"])
    assert res.exit_code == 2 and "no checkpoint" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--set", "loss.seg_wieght=1"])
    assert res.exit_code == 2 and "did you mean 'seg_weight'" in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path)])
    assert res.exit_code == 2 and str(tmp_path) in res.output
    # A bad value fails at resolve time: before training is launched, so before any data is
    # read or a folder made. Launches are counted; a good value (the control) reaches it once.
    import cosa.train.launch

    launched: list[CosaConfig] = []
    monkeypatch.setattr(cosa.train.launch, "launch", lambda cfg, *a, **k: launched.append(cfg))
    for setting in ("separation.temperature=0", "loss.crf_window=2", "pseudo.scales=[0.5, -1]"):
        res = runner.invoke(
            app,
            ["train", "--out", str(tmp_path / "r"), "--data", str(tiny_data)] + ["--set", setting],
        )
        key = setting.split("=")[0]
        assert res.exit_code == 2 and f"{key}=" in res.output and "must be" in res.output
        assert str(tiny_data) not in res.output and not (tmp_path / "r").exists()
        assert launched == []
    good = ["--set", "separation.temperature=0.5"]
    runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--data", str(tiny_data), *good])
    assert len(launched) == 1 and launched[0].separation.temperature == 0.5


def test_pseudo_flip_off_is_honoured_by_every_teacher_pass(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training steps, pictures, CAM quality in training and `cosa eval` all read pseudo.flip."""
    import cosa.evaluation.evaluate
    import cosa.train.pictures
    import cosa.train.step
    from cosa.evaluation.run import evaluate_checkpoint

    flips: list[bool] = []
    for module in (cosa.evaluation.evaluate, cosa.train.pictures, cosa.train.step):
        real = module.teacher_forward

        def spy(*args: object, _real=real, **kwargs: object):  # type: ignore[no-untyped-def]
            flips.append(kwargs["flip"] if "flip" in kwargs else args[4])
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "teacher_forward", spy)
    cfg = _cfg(tiny_data, **{"pseudo.flip": False, "train.max_iters": 2})
    launch(cfg, tmp_path / "run", device="cpu", progress=False)
    training_passes = len(flips)
    evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", tiny_data, device="cpu")
    assert training_passes >= 3 and len(flips) > training_passes and not any(flips)


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step log is read back one step late; it still catches a NaN loss before the
    checkpoint of that step is written, and names the step."""
    import cosa.train.trainer

    step = cosa.train.trainer.train_step

    def nan_at_three(state, *args: object) -> dict:  # type: ignore[no-untyped-def]
        record = step(state, *args)
        if state.iteration == 3:
            record["loss/total"] = record["loss/total"] * float("nan")
        return record

    monkeypatch.setattr(cosa.train.trainer, "train_step", nan_at_three)
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


def test_ddp_step_equals_one_process_with_the_global_batch(tiny_data: Path, tmp_path: Path) -> None:
    """Two gloo ranks with 2 images each against one process with all 4, after one step.

    The reference is the plain single-process step on the same 4 crops, not the trainer's own
    divergence figure. The step is a warm-up step (classification terms, means over images) with
    the reference warm-up on, so the teacher's multi-scale CAMs also feed the dynamic thresholds
    (the ranks gather their max-CAM rows). Those losses are means over images and BatchNorm is
    frozen in training, so a correct DDP gives the one-process gradient exactly; what differs is
    float rounding (the all-reduce adds the two halves' means; the ranks run on 1 thread). After
    the warm-up the swapped and CSP terms divide by the pixels counted over the whole batch,
    which two ranks count apart: there the two set-ups compute different functions, so no
    tolerance could make that comparison a test of DDP.
    """
    import torch.multiprocessing as tmp
    from ddp_step import one_step, rank_step

    from cosa.train.data import open_run_data, training_batches
    from cosa.train.distributed import free_port

    cfg = _cfg(
        tiny_data,
        **{"train.batch_size": 4, "optim.lr_warmup_iters": 0, "loss.reference_warmup": True},
    )
    data = open_run_data(cfg, tmp_path / "run", _cpu_context(), None)
    class_names = list(data.train.class_names)
    batch = next(training_batches(cfg, data.train, _cpu_context(), 0))
    assert batch["weak"].shape[0] == 4
    torch.save(batch, tmp_path / "batch.pt")
    tmp.spawn(
        rank_step,
        args=(2, free_port(), cfg, class_names, tmp_path / "batch.pt", tmp_path / "ddp.pt"),
        nprocs=2,
    )
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single = one_step(cfg, class_names, batch)
    half = one_step(cfg, class_names, {k: v[:2] for k, v in batch.items()})

    grads = single["grads"]
    assert ddp["grads"].keys() == grads.keys() == half["grads"].keys()
    scale = max(float(g.abs().max()) for g in grads.values())
    tolerance = 1e-4 * scale  # float rounding; measured about 7e-6 x scale
    for key, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][key], grad, rtol=0, atol=tolerance, msg=key)
    # The comparison has teeth: rank 0's images alone give another gradient, far outside it.
    assert (
        max(float((half["grads"][k] - g).abs().max()) for k, g in grads.items()) > 100 * tolerance
    )
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # AdamW's first step moves a weight by lr x g / (|g| + eps) (plus the decay): where |g| is
    # above its rounding error that is fixed to within 1e-9; where the gradient is rounding noise
    # itself the move may go either way, by lr at most (measured 4e-6 where lr is 4.6e-5).
    settled = {key: grad.abs() > tolerance for key, grad in grads.items()}
    assert sum(int(s.sum()) for s in settled.values()) > 0.5 * sum(
        g.numel() for g in grads.values()
    )
    for name in ("online", "teacher"):
        for key, value in single[name].items():
            gap = (ddp[name][key] - value).abs()
            if key not in grads:  # buffers
                assert float(gap.max()) <= 1e-6, key
                continue
            assert float(gap.max()) <= 1.01 * single["lr"][key], key
            if settled[key].any():
                assert float(gap[settled[key]].max()) <= 1e-6, key
    # The thresholds' EM runs on CAMs from convolutions over 2 and 4 images, which round
    # differently (measured 3e-6 absolute); rank 0's images alone move them far more.
    for head in ("main", "aux"):
        for key, value in single["thresholds"][head].items():
            torch.testing.assert_close(ddp["thresholds"][head][key], value, rtol=1e-4, atol=1e-5)
        queue = single["thresholds"][head]["queue"]
        assert float((half["thresholds"][head]["queue"] - queue).abs().max()) > 1e-2
