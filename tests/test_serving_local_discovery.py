"""`cosa.serving.discovery.discover_inputs`: files, folders, globs -> images and output stems."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cosa.serving.discovery import discover_inputs


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # content does not matter to discovery
    return path


def stems(found) -> list[str]:  # noqa: ANN001 - Discovery
    return [str(i.stem) for i in found.items]


def test_folder_is_searched_recursively_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for rel in ["b.jpg", "a.PNG", "sub/z.tif", "sub/deeper/y.TIFF", "c.webp", "d.bmp", "e.JPEG"]:
        touch(root / rel)
    touch(root / "notes.txt")
    touch(root / "sub" / "labels.json")
    found = discover_inputs([str(root)])
    # A folder's files (sorted by name) come before its sub-folders (sorted by name).
    assert stems(found) == ["a", "b", "c", "d", "e", "sub/z", "sub/deeper/y"]
    assert [i.index for i in found.items] == list(range(7))
    assert found.rejected == []
    assert found.warnings == [
        f"{root}: ignored 2 file(s) without an image suffix (.bmp .jpeg .jpg .png .tif .tiff .webp)"
    ]
    assert discover_inputs([str(root)]).items == found.items  # deterministic


def test_explicit_files_keep_only_their_stem(tmp_path: Path) -> None:
    a = touch(tmp_path / "x" / "y" / "photo 1.JPG")
    b = touch(tmp_path / "été 猫.png")
    found = discover_inputs([str(a), str(b)])
    assert stems(found) == ["photo 1", "été 猫"]
    assert [i.path for i in found.items] == [a, b]


def test_glob_stems_are_relative_to_the_glob_base(tmp_path: Path) -> None:
    touch(tmp_path / "data" / "s1" / "a.jpg")
    touch(tmp_path / "data" / "s2" / "deep" / "b.jpg")
    touch(tmp_path / "data" / "s2" / "c.png")
    found = discover_inputs([str(tmp_path / "data" / "**" / "*.jpg")])
    assert stems(found) == ["s1/a", "s2/deep/b"]
    found = discover_inputs([str(tmp_path / "data" / "*")])  # folders matched: searched
    assert stems(found) == ["s1/a", "s2/c", "s2/deep/b"]


def test_name_with_brackets_is_a_path_not_a_glob(tmp_path: Path) -> None:
    path = touch(tmp_path / "shot[1].jpg")
    assert [i.path for i in discover_inputs([str(path)]).items] == [path]


def test_missing_input_glob_without_match_and_non_image_file_are_rejected(tmp_path: Path) -> None:
    txt = touch(tmp_path / "readme.txt")
    found = discover_inputs([str(tmp_path / "nope.jpg"), str(tmp_path / "*.gif"), str(txt)])
    assert found.items == []
    assert [(r.path, r.error) for r in found.rejected] == [
        (str(tmp_path / "nope.jpg"), "no such file or folder"),
        (str(tmp_path / "*.gif"), "the pattern matched no files"),
        (str(txt), "not an image suffix '.txt' (supported: .bmp .jpeg .jpg .png .tif .tiff .webp)"),
    ]


def test_folder_named_like_an_image_is_searched_with_a_warning(tmp_path: Path) -> None:
    touch(tmp_path / "in" / "album.jpg" / "inner.png")
    (tmp_path / "in" / "empty.png").mkdir()
    found = discover_inputs([str(tmp_path / "in")])
    assert stems(found) == ["album.jpg/inner"]
    assert sorted(found.warnings) == [
        f"{tmp_path / 'in' / 'album.jpg'}: a folder named like an image; searched as a folder",
        f"{tmp_path / 'in' / 'empty.png'}: a folder named like an image; searched as a folder",
    ]
    found = discover_inputs([str(tmp_path / "in" / "*.png")])  # glob matching a folder
    assert found.items == [] and "named like an image" in found.warnings[0]


def test_dangling_symlinks_are_kept_for_the_decoder_to_report(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    found = discover_inputs([str(tmp_path / "in")])
    assert stems(found) == ["gone"]


def test_duplicates_are_segmented_once(tmp_path: Path) -> None:
    a = touch(tmp_path / "in" / "a.jpg")
    found = discover_inputs([str(a), str(tmp_path / "in"), f"{tmp_path}/in/./a.jpg"])
    assert stems(found) == ["a"]
    assert found.warnings == [f"{a}: given more than once; segmented once"] * 2


def test_output_name_clash_is_refused_not_overwritten(tmp_path: Path) -> None:
    touch(tmp_path / "in" / "a.jpg")
    touch(tmp_path / "in" / "a.png")
    touch(tmp_path / "other" / "a.JPG")
    found = discover_inputs([str(tmp_path / "in"), str(tmp_path / "other")])
    assert stems(found) == ["a"]
    assert [r.path for r in found.rejected] == [
        str(tmp_path / "in" / "a.png"),
        str(tmp_path / "other" / "a.JPG"),
    ]
    assert all("would overwrite" in r.error for r in found.rejected)


def test_output_folder_inside_the_input_is_not_searched(tmp_path: Path) -> None:
    touch(tmp_path / "in" / "a.jpg")
    touch(tmp_path / "in" / "masks" / "a.png")  # a previous run's output
    found = discover_inputs([str(tmp_path / "in")], exclude=tmp_path / "in" / "masks")
    assert stems(found) == ["a"]


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    touch(tmp_path / "in" / "real" / "a.jpg")
    os.symlink(tmp_path / "in" / "real", tmp_path / "in" / "link")
    os.symlink(tmp_path / "in", tmp_path / "in" / "real" / "loop")  # a cycle
    found = discover_inputs([str(tmp_path / "in")])
    # "link" sorts first; "real" is the same folder (seen), "loop" leads back to the root (seen).
    assert stems(found) == ["link/a"]


def test_unlistable_folder_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "in" / "ok.jpg")
    touch(tmp_path / "in" / "locked" / "x.jpg")
    locked = tmp_path / "in" / "locked"
    real_scandir = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - os.walk's own call; root ignores chmod 000
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover_inputs([str(tmp_path / "in")])
    assert stems(found) == ["ok"]
    assert [(r.path, r.error) for r in found.rejected] == [
        (str(locked), "cannot list folder (Permission denied)")
    ]
