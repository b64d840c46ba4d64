"""Resuming and launching on other hardware than the run was saved on: GradScaler states, CUDA
RNG states of GPUs that are gone, `--nproc` with too few GPUs. The GPUs are faked (none here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cosa.checkpoint import restore_scaler
from cosa.errors import ConfigError
from cosa.train import launch as launch_module
from cosa.train.distributed import check_process_count, resolve_device
from cosa.train.rng import restore_rng_state, rng_state


def test_an_enabled_scaler_keeps_its_fresh_state_when_the_checkpoint_has_none() -> None:
    # A CPU or bf16 run saves a disabled scaler's empty state; FP16 resumes must not fail on it.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    with pytest.raises(RuntimeError, match="empty"):  # what loading it unconditionally did
        scaler.load_state_dict(torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert restore_scaler(scaler, {}) is False
    assert restore_scaler(scaler, None) is False
    assert scaler.get_scale() == 1024.0


def test_a_saved_scaler_state_is_restored() -> None:
    saved = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7, enabled=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    assert restore_scaler(scaler, saved.state_dict()) is True
    assert scaler.get_scale() == 256.0 and scaler.get_growth_interval() == 7


class FakeGpus:
    """`count` GPUs, each with a generator state that `set_rng_state` overwrites."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.count = count
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        # torch.cuda.set_rng_state_all calls the module-level name in torch.cuda.random.
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    def set_rng_state(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        index = int(device)
        if index >= self.count:
            raise IndexError(f"device {index} out of range ({self.count} GPUs)")
        self.states[index] = state


def _saved_with_gpus(count: int) -> dict:
    state = rng_state()  # no CUDA here: add what a machine with `count` GPUs saves
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
    return state


def test_cuda_rng_states_of_more_gpus_than_visible_restore_the_visible_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = FakeGpus(monkeypatch, count=2)
    with caplog.at_level(logging.WARNING, logger="cosa.train.rng"):
        restore_rng_state(_saved_with_gpus(4))
    assert sorted(gpus.states) == [0, 1]
    assert [int(gpus.states[i][0]) for i in (0, 1)] == [0, 1]
    assert any("states of 4 GPU(s) and 2 are visible" in r.getMessage() for r in caplog.records)


def test_cuda_rng_states_of_as_many_gpus_restore_silently(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = FakeGpus(monkeypatch, count=2)
    with caplog.at_level(logging.WARNING, logger="cosa.train.rng"):
        restore_rng_state(_saved_with_gpus(2))
    assert sorted(gpus.states) == [0, 1] and not caplog.records


def test_nproc_above_the_gpu_count_is_a_clear_error_before_any_process_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeGpus(monkeypatch, count=2)

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("processes were started")

    monkeypatch.setattr(launch_module.mp, "start_processes", no_spawn)
    with pytest.raises(ConfigError, match=r"--nproc 4 runs one process per GPU but 2 GPU\(s\)"):
        launch_module.launch(object(), tmp_path, device="auto", nproc=4)  # type: ignore[arg-type]
    check_process_count(2, "cuda")  # as many as there are: fine
    check_process_count(8, "cpu")  # gloo on the CPU: any number


def test_a_rank_without_its_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun with more processes per node than GPUs: "invalid device ordinal" before.
    FakeGpus(monkeypatch, count=2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="process 2 of this node needs GPU 2 but 2 GPU"):
        resolve_device("cuda", local_rank=2)


@pytest.mark.gpu
def test_real_cuda_rng_and_scaler_restore() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from cosa.train.rng import restore_cuda_rng_states

    torch.cuda.manual_seed_all(5)
    states = torch.cuda.get_rng_state_all()
    expected = torch.rand(3, device="cuda")
    restore_cuda_rng_states(states + [states[0]] * 3)  # saved with 3 more GPUs visible
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, enabled=True)
    assert restore_scaler(scaler, torch.amp.GradScaler("cuda", enabled=False).state_dict()) is False
    assert scaler.get_scale() == 1024.0


def test_an_unknown_device_name_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown device 'cdua'; choose one of auto, cpu, cuda"):
        resolve_device("cdua")


def test_cpu_ranks_of_one_machine_split_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cosa.train.distributed import share_cores

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    try:
        share_cores(torch.device("cpu"), 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        torch.set_num_threads(before)
        share_cores(torch.device("cpu"), 1)  # one rank keeps every core
        assert torch.get_num_threads() == before
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        share_cores(torch.device("cpu"), 2)  # the user's (or torchrun's) setting wins
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
