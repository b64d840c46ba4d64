"""File-system helpers shared by everything that writes a whole folder (datasets, exports)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def replace_folder(staged: Path, out: Path) -> None:
    """Move the finished folder `staged` to `out` (same file system), replacing what `out` held.

    A missing or empty `out` is replaced by one rename(2). A non-empty one is moved aside first,
    then deleted once `staged` is in place, and put back if that rename fails: `out` always holds
    either the old folder or the new one, never a mix of both.
    """
    if not (out.is_dir() and any(out.iterdir())):
        os.replace(staged, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
