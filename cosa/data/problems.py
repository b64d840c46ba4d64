"""Problems found in a dataset folder: what, where (file and line) and how to fix it.

Readers collect problems instead of stopping at the first one, so `cosa data check` can list every
problem of a folder at once; `cosa train` refuses to start while any of them is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cosa.errors import DataError

Severity = Literal["error", "warning"]

SUMMARY_EXAMPLES = 3  # errors quoted in a `DataError` raised for a whole folder


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset folder.

    Attributes:
        severity: "error" (training refuses to start) or "warning" (reported, training goes on).
        file: the file at fault (the labels file for a bad row, the image for a bad image).
        line: 1-based line in `file`, or None when the problem is not about one line.
        message: what is wrong and how to fix it, without the location.
    """

    severity: Severity
    file: Path
    line: int | None
    message: str

    @property
    def where(self) -> str:
        """`file:line`, or `file` when there is no line."""
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "file": str(self.file),
            "line": self.line,
            "message": self.message,
        }


def error(file: Path, line: int | None, message: str) -> Problem:
    return Problem("error", file, line, message)


def warning(file: Path, line: int | None, message: str) -> Problem:
    return Problem("warning", file, line, message)


def errors_of(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def raise_on_errors(problems: Iterable[Problem], root: Path) -> None:
    """Raise one `DataError` quoting the first errors of `problems`, if there are any.

    Raises:
        DataError: at least one problem is an error; the message counts them, quotes the first
            few with their file and line, and names `cosa data check` for the full list.
    """
    found = errors_of(problems)
    if not found:
        return
    quoted = "; ".join(str(p) for p in found[:SUMMARY_EXAMPLES])
    if len(found) == 1:
        raise DataError(quoted)
    first = "the first" if len(found) > SUMMARY_EXAMPLES else "they are"
    raise DataError(
        f"{root} has {len(found)} data errors, {first}: {quoted}; run `cosa data check {root}` "
        "for the full list"
    )
