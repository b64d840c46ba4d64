"""Exceptions raised by the library. Each message says what was wrong and how to fix it.

`cli.py` maps every `CosaError` to a one-line message and its `exit_code` (2: usage or
configuration); nothing in the library exits.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """ " (did you mean 'x'?)" for the closest of `choices` to `word`, or "" when none is close.

    `cutoff` is difflib's similarity ratio in [0, 1]; file paths share long prefixes and suffixes,
    so callers matching paths ask for more than names do.
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CosaError(Exception):
    """Base class of every error a user can fix (bad input, configuration, files)."""

    exit_code = 2


class ConfigError(CosaError):
    """Unknown or invalid configuration key/value."""


class DataError(CosaError):
    """A dataset folder or file is missing, malformed or inconsistent."""


class CheckpointError(CosaError):
    """A checkpoint is missing, corrupt, from another format version, or does not fit the data."""


class PretrainedWeightsError(CosaError):
    """A pretrained weight file is missing or does not match the requested backbone."""


class ExportError(CosaError):
    """Exporting or verifying an artifact failed."""


class MissingDependencyError(CosaError):
    """An optional runtime (TensorRT, CUDA, tritonserver, ...) is not available on this machine."""


class ServingError(CosaError):
    """Triton repository, server or client problem (server down, model not ready, spec mismatch)."""


class InputError(CosaError):
    """A user input (image, video, folder) cannot be read."""


class DistributedError(CosaError):
    """A multi-node training run stopped: a rank failed, was killed or lost its node. Every rank
    stops with it; `--resume` on every node continues. Exit code 1: the command itself was right."""

    exit_code = 1


class EngineError(ExportError, ServingError):
    """A TensorRT engine does not load or run (built by another TensorRT or GPU, corrupt, or an
    input outside its profile). Both an export and a serving problem: the same engine session
    runs at export verification and at serving time."""
