"""DeferredScalars: per-step records read back one step late, in order, as floats."""

import pytest
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scalars_come_back_as_the_same_floats() -> None:
    records = DeferredScalars()
    loss = torch.tensor(0.75, device="cuda") * 2
    records.push({"loss": loss, "tau": torch.tensor(0.5, device="cuda", dtype=torch.bfloat16)})
    assert records.push({"loss": loss + 1}) == {"loss": 1.5, "tau": 0.5}
    assert records.flush() == {"loss": 2.5}
