"""What a finished training run produced (`train` and `launch` return it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished run produced. Scores are fractions in [0, 1].

    `best_score` is the selection criterion's value (`selection_metric`: miou, tag_f1, ...) of
    `best_checkpoint` on the selection split, reached at `best_iteration`.
    """

    out: Path
    iterations: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    selection_metric: str
    best_score: float | None
    best_iteration: int | None
    test: dict[str, Any] | None
    seconds_per_iter: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        """The inverse of `to_json` (how a spawned run's rank 0 hands its result back)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        paths = {"out", "last_checkpoint", "best_checkpoint"}
        values = {k: (Path(v) if k in paths and v is not None else v) for k, v in data.items()}
        return cls(
            **{k: v for k, v in values.items() if k in known},
            extra={k: v for k, v in values.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "iterations": self.iterations,
            "last_checkpoint": str(self.last_checkpoint),
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "selection_metric": self.selection_metric,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
            "test": self.test,
            "seconds_per_iter": self.seconds_per_iter,
            **self.extra,
        }
