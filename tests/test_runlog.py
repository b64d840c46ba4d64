"""DeferredScalars: per-step records read back one step late, in order, as floats."""

import torch

from cosa.train.runlog import DeferredScalars


def test_records_come_back_one_step_late_with_floats_and_plain_values_kept() -> None:
    records = DeferredScalars()
    assert records.flush() is None
    first = {
        "loss/total": torch.tensor(1.5),
        "lr": 0.1,
        "tau": torch.tensor(0.25, dtype=torch.bfloat16),
        "iter": 1,
    }
    assert records.push(first) is None
    first["loss/total"] += 1  # the queued record is a snapshot of the step's values
    second = records.push({"loss/total": torch.tensor([2.0]).sum(), "iter": 2})
    assert second == {"loss/total": 1.5, "lr": 0.1, "tau": 0.25, "iter": 1}
    assert list(second) == ["loss/total", "lr", "tau", "iter"]
    assert records.flush() == {"loss/total": 2.0, "iter": 2}
    assert records.flush() is None


def test_a_record_without_tensors() -> None:
    records = DeferredScalars()
    records.push({"iter": 1, "lr": 0.5})
    assert records.flush() == {"iter": 1, "lr": 0.5}
