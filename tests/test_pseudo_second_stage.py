"""`cosa pseudo`: pseudo-masks as a tagged folder, the second stage trained on it, interruption."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import tiny_config
from typer.testing import CliRunner

from cli import app
from cosa.data import open_dataset, read_mask, read_rgb, write_synthetic_dataset
from cosa.data.check import check_dataset
from cosa.errors import CheckpointError, ConfigError
from cosa.pseudo.second_stage import pseudo_mask, write_pseudo_dataset
from cosa.train.launch import launch


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic set (8 train, 2 val, 2 test) and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("pseudo")
    data = root / "data"
    write_synthetic_dataset(data, 8, 2, 2, seed=1)
    launch(tiny_config(data), root / "run", device="cpu", progress=False)
    return data, root / "run" / "checkpoints" / "last.pt"


def test_pseudo_mask_keeps_tagged_classes_and_ignores_doubt() -> None:
    logits = np.zeros((3, 1, 4), dtype=np.float32)  # K = 3: background, a, b; 4 pixels
    logits[:, 0, 0] = [0.0, 8.0, 0.0]  # sure of a
    logits[:, 0, 1] = [0.0, 0.0, 8.0]  # sure of b, which the image is not tagged with
    logits[:, 0, 2] = [8.0, 0.0, 0.0]  # sure of background
    logits[:, 0, 3] = [0.2, 0.0, 0.0]  # a near tie between background and a
    mask = pseudo_mask(2 * logits, np.array([1, 0]), passes=2, min_confidence=0.6)
    # b is not tagged: its pixel goes to the best allowed class (a tie of background and a at
    # 0.0 -> probability 0.5 < 0.6 -> ignored).
    assert mask.tolist() == [[1, 255, 0, 255]]
    assert pseudo_mask(logits, np.array([1, 0]), passes=1, min_confidence=0.0).tolist() == [
        [1, 0, 0, 0]
    ]


def test_pseudo_folder_trains_a_second_stage(stage_one: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoint = stage_one
    out = tmp_path / "labels"
    result = CliRunner().invoke(
        app,
        [
            "pseudo",
            str(checkpoint),
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 12 and summary["pseudo_masks"] == 8 and summary["written"] == 8
    assert summary["scored"] == 8 and 0.0 <= summary["miou"] <= 1.0
    assert 0.0 < summary["coverage"] <= 1.0
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [r["split"] for r in rows] == ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    names = json.loads((data / "classes.json").read_text())["names"]
    assert (out / "classes.txt").read_text().splitlines() == names[1:]
    train = open_dataset(out, "train")
    assert train.class_names == tuple(names)
    for sample in train.samples:
        mask = read_mask(sample.mask_path)
        assert mask.shape == np.asarray(read_rgb(sample.image_path)).shape[:2]
        allowed = {0, 255} | {1 + int(i) for i in np.flatnonzero(sample.label)}
        assert set(np.unique(mask).tolist()) <= allowed
    val = open_dataset(out, "val")  # ground truth carried over: equal to the source's masks
    source_val = open_dataset(data, "val")
    for ours, theirs in zip(val.samples, source_val.samples, strict=True):
        np.testing.assert_array_equal(read_mask(ours.mask_path), read_mask(theirs.mask_path))
    assert os.path.samefile(
        train.samples[0].image_path, data / "JPEGImages" / train.samples[0].name
    )
    assert check_dataset(out).errors == []

    stage_two = launch(
        tiny_config(
            out,
            **{
                "train.supervision": "full",
                "train.max_iters": 2,
                "model.init_checkpoint": str(checkpoint),
            },
        ),
        tmp_path / "stage2",
        device="cpu",
        progress=False,
    )
    assert stage_two.iterations == 2 and stage_two.selection_metric == "miou"
    assert stage_two.test is not None and stage_two.test["split"] == "test"


def test_interrupted_run_leaves_whole_masks_and_resumes(
    stage_one: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, checkpoint = stage_one
    out = tmp_path / "labels"
    real_replace = os.replace
    calls = {"n": 0}

    def replace_then_die(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the third mask is fully written to its temporary file, then...
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr("cosa.files.os.replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_pseudo_dataset(checkpoint, data, out, device="cpu", progress=False)
    monkeypatch.setattr("cosa.files.os.replace", real_replace)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        p.name for p in (out / "masks").glob("*.png")
    )  # no temporary file left beside the masks
    assert len(list((out / "masks").iterdir())) == 2 and not (out / "labels.csv").exists()
    with pytest.raises(ConfigError, match="is not empty; pass --skip-existing"):
        write_pseudo_dataset(checkpoint, data, out, device="cpu", progress=False)
    resumed = write_pseudo_dataset(
        checkpoint, data, out, skip_existing=True, device="cpu", progress=False
    )
    assert (resumed.skipped, resumed.written, resumed.scored) == (2, 6, 8)
    assert (out / "labels.csv").is_file() and not list(out.rglob(".*"))
    fresh = write_pseudo_dataset(checkpoint, data, tmp_path / "fresh", device="cpu", progress=False)
    for mask in (out / "masks").glob("*.png"):
        np.testing.assert_array_equal(
            read_mask(mask), read_mask(tmp_path / "fresh" / "masks" / mask.name)
        )
    assert fresh.miou == pytest.approx(resumed.miou)


def test_init_checkpoint_starts_both_networks_from_its_teacher(
    stage_one: tuple[Path, Path], tmp_path: Path
) -> None:
    from cosa.checkpoint import load_checkpoint
    from cosa.train.distributed import setup_distributed
    from cosa.train.trainer import Trainer

    data, checkpoint = stage_one
    cfg = tiny_config(data, **{"model.init_checkpoint": str(checkpoint)})
    trainer = Trainer(cfg, tmp_path / "run", setup_distributed("cpu"), resume=False)
    teacher = load_checkpoint(checkpoint).teacher
    for net in (trainer.state.student, trainer.state.teacher):
        state = net.state_dict()
        assert state.keys() == teacher.keys()
        assert all(torch.equal(state[k], teacher[k]) for k in teacher)
    other = tmp_path / "other"  # a tagged folder with one class, "x"
    (other / "images").mkdir(parents=True)
    for image in sorted((data / "JPEGImages").glob("*.jpg"))[:2]:
        shutil.copy(image, other / "images" / image.name)
    names = sorted(p.name for p in (other / "images").iterdir())
    (other / "labels.csv").write_text(f"image,tags,split\n{names[0]},x,train\n{names[1]},x,val\n")
    with pytest.raises(CheckpointError, match="predicts .* but the data has \\['x'\\]"):
        Trainer(
            tiny_config(
                other, **{"model.init_checkpoint": str(checkpoint), "data.test_split": None}
            ),
            tmp_path / "run2",
            setup_distributed("cpu"),
            resume=False,
        )
