"""The file-system ground floor: atomic files and atomic folder swaps, for everything that writes.

Atomic files: write to a temporary file in the target's folder, then `os.replace`. A reader (or a
later `--skip-existing` run) sees either no file or the complete one, never an empty or
half-written file: `os.replace` within one folder is atomic on POSIX and Windows. The temporary
name is hidden (leading dot), keeps the target's suffix (OpenCV and Pillow pick the container from
it), and is removed when writing fails or is interrupted; a process killed outright leaves it
behind, and `remove_stale_temporaries` sweeps such leftovers. `durable=True` also flushes the file
to the disk before the rename (checkpoints: survive a power cut, not only a crash).

Folders: `staged_folder(out)` yields a hidden sibling to fill, then swaps it in with
`replace_folder`; on error it is deleted and `out` is untouched. New files and folders get the
usual permissions (0o666 / 0o777 minus the umask), unlike `tempfile`'s owner-only ones.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "new_staging_folder",
    "remove_stale_temporaries",
    "replace_folder",
    "staged_folder",
    "stale_temporaries",
    "write_bytes_atomic",
    "write_text_atomic",
]

# `.<stem>.<8 hex>.tmp<suffix>` for files, `.<name>.<8 hex>.partial` for staged folders.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.(tmp(\.[^.]+)?|partial)$")


@contextmanager
def atomic_path(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path`, on error delete it.

    The temporary file is created empty (mode 0o666 minus the umask, like any new file, unlike
    `tempfile.mkstemp`'s 0o600) so that its name is reserved; the caller overwrites it.

    Args:
        path: the final file. Its folder is created if missing.
        durable: fsync the file before the rename (and the folder after it).

    Yields:
        The temporary path, in the same folder, with the same suffix.

    Raises:
        OSError: the folder cannot be created or written (the caller names the file in its error).
    """
    tmp, fd = _create_temporary(path)
    os.close(fd)
    try:
        yield tmp
        if tmp.stat().st_size == 0:
            # Every format written here has a non-empty encoding; an empty file means the writer
            # silently failed (e.g. an OpenCV VideoWriter that wrote nothing).
            raise OSError(f"writing {path} produced an empty file")
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def write_bytes_atomic(
    path: Path, data: bytes | bytearray | memoryview, *, durable: bool = False
) -> None:
    """Write already-encoded `data` to `path` atomically, with one file creation.

    The same guarantees as `atomic_path`, for content encoded in memory: the temporary file is
    created, written and closed through one descriptor, then renamed over `path`.

    Raises:
        OSError: the folder cannot be created or written, or `data` is empty.
    """
    if not data:
        raise OSError(f"writing {path} produced an empty file")
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def write_text_atomic(path: Path, text: str, *, durable: bool = False) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files and staged folders this module left in `folder` (a killed writer's)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `stale_temporaries(folder)`; only call it when no writer is running there.

    Returns:
        What was removed.
    """
    stale = stale_temporaries(folder)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """Create a new hidden file beside `path` (its folder made if missing); return it and an
    open write descriptor. The name is `.<stem>.<random>.tmp<suffix>`, drawn until unused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another writer drew the same token: draw again
            continue


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a new hidden folder beside `out`; on success swap it in (`replace_folder`), on error
    delete it, leaving `out` as it was.

    Raises:
        OSError: the parent folder cannot be created or written.
    """
    staged = new_staging_folder(out)
    try:
        yield staged
        replace_folder(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def new_staging_folder(out: Path) -> Path:
    """Create a new, empty hidden folder `.<name>.<random>.partial` beside `out` (same file
    system, so it can be renamed over `out`), with the umask's permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staged = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
        try:
            staged.mkdir()
            return staged
        except FileExistsError:  # drawn by another writer: draw again
            continue


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
