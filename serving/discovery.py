"""Expand `cosa segment INPUT...` (files, folders, globs) into images and their output names.

Rules:
- A file is taken as given (its suffix must be an image suffix, any case); its output stem is its
  own stem, e.g. `shots/a.JPG` -> `a`.
- A folder is searched recursively (symlinked folders followed once); files whose suffix is not
  an image suffix are ignored (counted in a warning); output stems keep the path relative to the
  folder, e.g. `imgs/` holding `x/y/b.png` -> `x/y/b`.
- A glob (`*`, `?`, `[`, `**` for any depth) expands like `glob.glob(recursive=True)`; each match
  is then a file or a folder as above; output stems are relative to the glob's first folder
  without wildcards, e.g. `data/**/*.jpg` matching `data/s/c.jpg` -> `s/c`. An INPUT that exists
  as a path is never read as a glob, so names containing `[` work.
- A folder named like an image (`x.jpg/`) is searched as a folder, with a warning that says so.
- Order is deterministic: INPUTs in the order given; in a folder, its files sorted by name, then
  its sub-folders sorted by name.
- The same file reached twice (same absolute path) is kept once, with a warning.
- Two different files with the same output stem (`a.jpg` and `a.png`; or two folders both holding
  `a.jpg`) would overwrite each other's mask: the later one is refused, never silently overwritten.
- The `exclude` folder (the output folder) is never searched, so masks are not re-read as inputs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cosa.images import SUPPORTED_SUFFIXES, is_image_name

__all__ = ["Discovery", "InputItem", "Rejected", "discover_inputs"]

_GLOB_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class InputItem:
    """One image to segment.

    Attributes:
        path: the file as found (not resolved: error messages show the user's own spelling).
        stem: output path relative to `--out`, without suffix, '/'-separated, e.g. "x/y/b".
        index: position in discovery order (stable, used to sort reports).
    """

    path: Path
    stem: PurePosixPath
    index: int


@dataclass(frozen=True)
class Rejected:
    """An INPUT, or a file found under one, that cannot be segmented, with the reason."""

    path: str
    error: str


@dataclass
class Discovery:
    """The result of `discover_inputs`: images in order, refused inputs, and warnings."""

    items: list[InputItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def discover_inputs(inputs: Sequence[str], exclude: Path | None = None) -> Discovery:
    """Expand INPUT arguments into images with unique output stems (see the module docstring).

    Args:
        inputs: files, folders and globs as typed by the user.
        exclude: a folder never searched (the output folder).

    Returns:
        A `Discovery`. Problems are data, not exceptions: a missing INPUT, a glob without matches,
        a file with another suffix, an unreadable folder or an output-name clash each become a
        `Rejected` entry; the caller reports them and goes on with the rest.
    """
    walker = _Walker(exclude=_real(exclude) if exclude is not None else None)
    for raw in inputs:
        walker.add_input(raw)
    return walker.result


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _glob_base(pattern: str) -> Path:
    """The leading folders of `pattern` without wildcards (`data/**/*.jpg` -> `data`)."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


class _Walker:
    """Accumulates items in order; owns the dedup and clash bookkeeping."""

    def __init__(self, exclude: str | None) -> None:
        self.result = Discovery()
        self._exclude = exclude
        self._seen_paths: set[str] = set()
        self._stems: dict[PurePosixPath, Path] = {}

    def add_input(self, raw: str) -> None:
        path = Path(raw)
        if os.path.lexists(path):
            self._add_path(path, base=None)
            return
        if _GLOB_MAGIC & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                self._reject(raw, "the pattern matched no files")
                return
            base = _glob_base(raw)
            for match in matches:
                self._add_path(Path(match), base=base)
            return
        self._reject(raw, "no such file or folder")

    def _add_path(self, path: Path, base: Path | None) -> None:
        """A file or folder named by the user or matched by a glob (`base`: glob base folder)."""
        if path.is_dir():  # follows symlinks; a dangling link is handled as a file below
            if base is not None and is_image_name(path.name):
                self.result.warnings.append(
                    f"{path}: a folder named like an image; searched as a folder"
                )
            self._walk(path, base=base if base is not None else path)
            return
        if not is_image_name(path.name):
            if base is None:
                suffixes = " ".join(sorted(SUPPORTED_SUFFIXES))
                self._reject(
                    str(path), f"not an image suffix {path.suffix!r} (supported: {suffixes})"
                )
            return  # a glob such as `data/*` also matches non-images; they are not inputs
        stem_path = path.relative_to(base) if base is not None else Path(path.name)
        self._add_file(path, stem_path)

    def _walk(self, root: Path, base: Path) -> None:
        """Search `root` recursively; output stems are relative to `base` (root or glob base)."""
        if self._exclude is not None and _real(root) == self._exclude:
            self.result.warnings.append(f"{root}: is the output folder; not searched for inputs")
            return
        visited: set[str] = set()
        ignored = 0

        def on_error(exc: OSError) -> None:
            self._reject(str(exc.filename or root), f"cannot list folder ({exc.strerror or exc})")

        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
            real = _real(Path(dirpath))
            if real in visited or (self._exclude is not None and real == self._exclude):
                dirnames.clear()  # a symlink cycle, or the output folder inside the input folder
                continue
            visited.add(real)
            dirnames.sort()
            for name in dirnames:
                if is_image_name(name):
                    folder = Path(dirpath) / name
                    self.result.warnings.append(
                        f"{folder}: a folder named like an image; searched as a folder"
                    )
            for name in sorted(filenames):
                if not is_image_name(name):
                    ignored += 1
                    continue
                file = Path(dirpath) / name
                self._add_file(file, file.relative_to(base))
        if ignored:
            self.result.warnings.append(
                f"{root}: ignored {ignored} file(s) without an image suffix "
                f"({' '.join(sorted(SUPPORTED_SUFFIXES))})"
            )

    def _add_file(self, path: Path, relative: Path) -> None:
        key = os.path.abspath(path)
        if key in self._seen_paths:
            self.result.warnings.append(f"{path}: given more than once; segmented once")
            return
        self._seen_paths.add(key)
        stem = PurePosixPath(*relative.parent.parts, relative.stem)
        other = self._stems.get(stem)
        if other is not None:
            self._reject(
                str(path),
                f"its mask would overwrite the one of {other} (same output name {stem}); rename "
                "one or segment them into different --out folders",
            )
            return
        self._stems[stem] = path
        self.result.items.append(InputItem(path=path, stem=stem, index=len(self.result.items)))

    def _reject(self, path: str, error: str) -> None:
        self.result.rejected.append(Rejected(path=path, error=error))
