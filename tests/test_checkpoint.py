"""Checkpoint format: atomic writes, round trip, clear errors for bad files."""

import dataclasses
from pathlib import Path

import pytest
import torch

from cosa.checkpoint import CHECKPOINT_VERSION, Checkpoint, load_checkpoint, save_checkpoint
from cosa.config import preset
from cosa.errors import CheckpointError


def _ckpt() -> Checkpoint:
    return Checkpoint(
        config=preset("demo"),
        class_names=["background", "a"],
        palette=[[0, 0, 0], [1, 2, 3]],
        iteration=7,
        online={"w": torch.arange(3.0)},
        teacher={"w": torch.ones(3)},
        thresholds={"main": {"low": torch.tensor(0.2)}},
    )


def test_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "c" / "last.pt"
    save_checkpoint(_ckpt(), path)
    save_checkpoint(_ckpt(), path)  # overwrite in place
    loaded = load_checkpoint(path)
    assert loaded.iteration == 7 and loaded.config == preset("demo")
    assert loaded.class_names == ["background", "a"] and loaded.num_foreground == 1
    assert torch.equal(loaded.online["w"], torch.arange(3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_bad_files_give_actionable_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a cosa checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")
    save_checkpoint(_ckpt(), tmp_path / "ok.pt")
    raw = torch.load(tmp_path / "ok.pt", weights_only=False)
    raw["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "future.pt")
    truncated = (tmp_path / "ok.pt").read_bytes()[:200]
    (tmp_path / "cut.pt").write_bytes(truncated)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A disk that fills up mid-write (torch.save) or a rename refused at the end (os.replace):
    the checkpoint a resume would read is the previous one, whole."""
    path = tmp_path / "last.pt"
    save_checkpoint(_ckpt(), path)
    before = path.read_bytes()
    real_save = torch.save

    def half_written(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # type: ignore[attr-defined]  # what a full disk leaves behind
        raise OSError(28, "No space left on device")

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    newer = dataclasses.replace(_ckpt(), iteration=8)
    monkeypatch.setattr(failing, half_written if failing == "torch.save" else refused)
    with pytest.raises(OSError):
        save_checkpoint(newer, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).iteration == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
