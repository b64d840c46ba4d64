"""The run folder's text records: `metrics.jsonl` and the progress bar.

`metrics.jsonl` holds one JSON object per line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
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
