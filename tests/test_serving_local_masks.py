"""Mask files (palette PNG, npy, overlay) and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from cosa.errors import ConfigError
from cosa.files import atomic_path, write_bytes_atomic
from cosa.serving.masks import (
    blend_overlay,
    colorize,
    mask_path,
    overlay_path,
    palette_lut,
    write_mask,
    write_overlay,
)

PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (10, 20, 250))


def test_output_names() -> None:
    stem = PurePosixPath("x/y/b c")
    assert mask_path(Path("out"), stem, "png") == Path("out/x/y/b c.png")
    assert mask_path(Path("out"), stem, "npy") == Path("out/x/y/b c.npy")
    assert overlay_path(Path("out"), stem) == Path("out/x/y/b c.overlay.jpg")
    # A stem containing dots keeps them: "a.b" -> a.b.png, never a.png.
    assert mask_path(Path("o"), PurePosixPath("a.b"), "png") == Path("o/a.b.png")


def test_palette_png_round_trip(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [3, 3, 0]], dtype=np.int32)
    path = tmp_path / "sub" / "m.png"
    write_mask(mask, path, "png", palette_lut(PALETTE))
    img = Image.open(path)
    assert img.mode == "P" and img.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(img), mask)
    assert img.getpalette()[:12] == [c for rgb in PALETTE for c in rgb]
    np.testing.assert_array_equal(np.asarray(img.convert("RGB"))[1, 0], PALETTE[3])


def test_npy_keeps_int32_ids(tmp_path: Path) -> None:
    mask = np.array([[0, 300], [2, 1]], dtype=np.int64)  # ids > 255 are fine in npy
    write_mask(mask, tmp_path / "m.npy", "npy", palette_lut(PALETTE))
    got = np.load(tmp_path / "m.npy")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, mask)


def test_png_refuses_ids_above_255(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit 0-255"):
        write_mask(np.array([[256]]), tmp_path / "m.png", "png", palette_lut(PALETTE))
    assert list(tmp_path.iterdir()) == []


def test_palette_lut_limits() -> None:
    lut = palette_lut(PALETTE)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[3].tolist() == [10, 20, 250] and lut[4:].max() == 0
    with pytest.raises(ConfigError, match="at most 256"):
        palette_lut([(0, 0, 0)] * 257)
    with pytest.raises(ConfigError, match="0-255"):
        palette_lut([(0, 0, 300)])


def test_overlay_tints_foreground_and_keeps_background() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1], [3, 0]])
    got = blend_overlay(image, mask, palette_lut(PALETTE), alpha=0.5)
    assert got.dtype == np.uint8
    assert got[0, 0].tolist() == [100, 100, 100] and got[1, 1].tolist() == [100, 100, 100]
    assert got[0, 1].tolist() == [114, 50, 50]
    assert got[1, 0].tolist() == [55, 60, 175]
    np.testing.assert_array_equal(colorize(mask, palette_lut(PALETTE))[1, 0], PALETTE[3])


def test_write_overlay(tmp_path: Path) -> None:
    image = np.full((8, 6, 3), 100, dtype=np.uint8)
    mask = np.zeros((8, 6), dtype=np.int32)
    write_overlay(image, mask, tmp_path / "o.overlay.jpg", palette_lut(PALETTE))
    got = np.asarray(Image.open(tmp_path / "o.overlay.jpg"))
    assert got.shape == (8, 6, 3) and abs(int(got.mean()) - 100) <= 2


def test_atomic_path_success_failure_and_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "f.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
        assert not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"data"  # old file intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.png"]  # no temp left


def test_atomic_path_refuses_an_empty_result(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="empty file"), atomic_path(tmp_path / "v.mp4"):
        pass  # a writer that silently wrote nothing
    assert list(tmp_path.iterdir()) == []


def test_write_bytes_atomic(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "m.png"
    write_bytes_atomic(target, b"first")
    write_bytes_atomic(target, b"second")  # replaces
    assert target.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(OSError, match="empty file"):
        write_bytes_atomic(target, b"")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["m.png"]  # no temp left


def test_interrupted_mask_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mask, lut = np.zeros((2, 2), np.int32), palette_lut(PALETTE)

    def encoder_dies(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", encoder_dies)
        with pytest.raises(KeyboardInterrupt):
            write_mask(mask, tmp_path / "m.png", "png", lut)
    assert list(tmp_path.iterdir()) == []

    def rename_dies(src: object, dst: object) -> None:
        assert Path(str(src)).read_bytes().startswith(b"\x89PNG")  # written in full, not moved
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", rename_dies)
    with pytest.raises(KeyboardInterrupt):
        write_mask(mask, tmp_path / "m.png", "png", lut)
    assert list(tmp_path.iterdir()) == []
