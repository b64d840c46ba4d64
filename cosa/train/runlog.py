"""The run folder's text records: `metrics.jsonl` and the progress bar.

`metrics.jsonl` holds one JSON object per line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cosa.files import write_text_atomic


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`.

    Flushed per record so a killed run keeps it.

    On resume, records of iterations beyond the resumed iteration (written after the checkpoint the
    run resumes from) are dropped first, so the file never holds two different histories of one
    iteration.
    """

    def __init__(self, path: Path, resume_iteration: int | None = None) -> None:
        self.path = path
        if resume_iteration is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and _record_iteration(line) <= resume_iteration
            ]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self._fh = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _record_iteration(line: str) -> int:
    try:
        return int(json.loads(line).get("iter", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 0


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` (a truncated last line from a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class DeferredScalars:
    """Per-step scalars (losses, thresholds) read back one step late.

    Reading a device scalar with `float()` waits for the device to finish the step, so a
    per-step log would keep the host from queueing the next step. Here each step's tensor
    scalars are stacked on their device and copied to the host without blocking (with an event
    on CUDA); they become floats when the next step is pushed, by which time the copy is done, or
    at `flush()`. The host thus runs at most one step ahead, and the wall time between steps
    still measures the device's throughput.
    """

    def __init__(self) -> None:
        self._pending: tuple[dict[str, Any], torch.Tensor | None, Any] | None = None

    def push(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Queue one step's record; return the previous step's with floats (None for the first).

        Args:
            record: name -> 0-d tensor (any device and float dtype; read back later) or a plain
                value (kept as it is). Key order is kept.
        """
        ready = self.flush()
        tensors = [v.detach().float().reshape(()) for v in record.values() if torch.is_tensor(v)]
        host, event = None, None
        if tensors:
            values = torch.stack(tensors)
            if values.is_cuda:
                host = values.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = values
        self._pending = (dict(record), host, event)
        return ready

    def flush(self) -> dict[str, Any] | None:
        """The queued record with floats (waits for its copy), or None when nothing is queued."""
        if self._pending is None:
            return None
        record, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        floats = iter(host.tolist() if host is not None else [])
        return {k: next(floats) if torch.is_tensor(v) else v for k, v in record.items()}
