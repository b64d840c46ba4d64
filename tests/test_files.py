"""`cosa.files`: staged folders, stale temporaries, durable writes; and the writers moved onto
them (the Triton environment install, checkpoints) keep the previous version on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosa import files
from cosa.files import (
    atomic_path,
    remove_stale_temporaries,
    staged_folder,
    stale_temporaries,
    write_bytes_atomic,
)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_staged_folder_replaces_the_folder_or_leaves_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as staged:
        assert staged.parent == tmp_path and staged.name.startswith(".out.")
        (staged / "a.txt").write_text("one")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
    with pytest.raises(RuntimeError), staged_folder(out) as staged:
        (staged / "b.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert _tree(out) == {"a.txt": "one"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_folder(out) as staged:
        (staged / "b.txt").write_text("two")
    assert _tree(out) == {"b.txt": "two"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writer_leaves_temporaries_that_are_found_and_swept(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from cosa.files import atomic_path, "
        "new_staging_folder\n"
        "folder = Path(sys.argv[1]); new_staging_folder(folder / 'export')\n"
        "with atomic_path(folder / 'last.pt') as tmp:\n"
        "    tmp.write_bytes(b'half'); os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=120)
    assert done.returncode == 9
    (tmp_path / "last.pt").write_bytes(b"complete")
    (tmp_path / ".keep").write_text("")  # hidden, but not ours
    (tmp_path / ".last.pt.tmp").write_text("")  # someone else's name
    stale = stale_temporaries(tmp_path)
    assert len(stale) == 2 and {p.suffix for p in stale} == {".pt", ".partial"}
    assert remove_stale_temporaries(tmp_path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", ".last.pt.tmp", "last.pt"]
    assert stale_temporaries(tmp_path / "missing") == []


def test_durable_writes_reach_the_disk_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: synced.append("replace") or real_replace(a, b))
    with atomic_path(tmp_path / "a.pt", durable=True) as tmp:
        tmp.write_bytes(b"x")
    assert synced == ["fsync", "replace", "fsync"]  # file, rename, then the folder entry
    synced.clear()
    write_bytes_atomic(tmp_path / "b.bin", b"y", durable=True)
    assert synced == ["fsync", "replace", "fsync"]
    synced.clear()
    write_bytes_atomic(tmp_path / "c.bin", b"z")
    assert synced == ["replace"]  # masks and pictures: no fsync per file


def test_triton_environment_install_swaps_its_folder_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the old environment was deleted before the rename; a failed rename lost it.
    from cosa.errors import MissingDependencyError
    from cosa.serving import triton_server

    target = tmp_path / "env"
    outcome = {"files": {"numpy/__init__.py": "v1"}, "returncode": 0}

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        into = Path(cmd[cmd.index("--target") + 1])
        for name, text in outcome["files"].items():  # type: ignore[union-attr]
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            (into / name).write_text(text)
        return subprocess.CompletedProcess(cmd, outcome["returncode"], "", "pip: no space left")

    monkeypatch.setattr(triton_server.subprocess, "run", fake_pip)
    triton_server._pip_install_into(target, ["numpy<2"])
    assert _tree(target) == {"numpy/__init__.py": "v1"}

    outcome["returncode"] = 1  # pip fails halfway
    outcome["files"] = {"numpy/__init__.py": "v2-half"}
    with pytest.raises(MissingDependencyError, match="no space left"):
        triton_server._pip_install_into(target, ["numpy<2"])
    assert _tree(target) == {"numpy/__init__.py": "v1"}

    outcome["returncode"] = 0  # pip succeeds, the swap fails
    real_replace, real_rename = os.replace, os.rename

    def failing_swap(src: object, dst: object) -> None:
        # Moving the new install in fails; putting the previous one back (".old-") works.
        if Path(str(dst)) == target and ".old-" not in Path(str(src)).name:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_swap)
    monkeypatch.setattr(os, "rename", failing_swap)
    with pytest.raises(OSError, match="No space left"):
        triton_server._pip_install_into(target, ["numpy<2"])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _tree(target) == {"numpy/__init__.py": "v1"}  # the previous install, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]  # nothing staged is left

    outcome["files"] = {"numpy/__init__.py": "v2"}
    triton_server._pip_install_into(target, ["numpy<2"])
    assert _tree(target) == {"numpy/__init__.py": "v2"}
    assert files.stale_temporaries(tmp_path) == []
