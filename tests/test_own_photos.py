"""A user's own photos end to end: real photographs (scikit-image's samples), tags written by hand,
no masks. `cosa data check`, `cosa train` (the demo preset, a few iterations on the CPU), `cosa
pseudo` and `cosa segment`, each through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from cosa.data import read_mask
from cosa.data.image_io import read_image_and_mask
from cosa.images import load_image

skimage_data = pytest.importorskip("skimage.data")

# file in skimage's data folder -> (name in images/, tags, split); tagged by looking at each photo.
PHOTOS = {
    "astronaut.png": ("people/astronaut.png", "person", "train"),
    "camera.png": ("people/cameraman.PNG", "person", "train"),  # greyscale
    "chelsea.png": ("animals/chelsea.jpg", "cat", "train"),
    "coffee.png": ("kitchen/coffee.webp", "cup", "train"),
    "rocket.jpg": ("rocket.jpg", "rocket", "train"),
    "motorcycle_left.png": ("motorcycle.tiff", "motorcycle", "train"),
    "grass.png": ("textures/grass.png", "", "train"),  # background only
    "horse.png": ("animals/horse.bmp", "horse", "val"),  # a binary silhouette
    "coins.png": ("coins.jpeg", "", "val"),
}
ROTATED = "animals/chelsea_phone.jpg"  # chelsea stored sideways with an EXIF orientation tag
DEMO_SHORT = [
    "--max-iters", "4",
    "--set", "loss.warmup_iters=2",  # the full CoSA step runs for iterations 3 and 4
    "--set", "loss.warmup_ramp=0",
    "--set", "train.batch_size=2",
    "--set", "train.eval_every=2",
    "--set", "train.vis_images=1",
    "--set", "pseudo.scales=[1.0]",  # one teacher scale (+ flip): half the teacher's cost
    "--set", "data.num_workers=0",
    "--set", "thresholds.queue_images=4",
]  # fmt: skip


MAX_SIDE = 320  # the photos are shrunk to keep the test to seconds; they stay real photographs


def _write_photo(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as img:
        photo = img.convert("RGB") if target.suffix.lower() in (".jpg", ".jpeg") else img.copy()
    photo.thumbnail((MAX_SIDE, MAX_SIDE))
    photo.save(target, format=Image.registered_extensions()[target.suffix.lower()])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own") / "mine"
    data_dir = Path(skimage_data.__file__).parent
    rows = ["image,tags,split"]
    for file, (name, tags, split) in PHOTOS.items():
        _write_photo(data_dir / file, root / "images" / name)
        rows.append(f"{name},{tags},{split}")
    _write_photo(data_dir / "chelsea.png", root / "images" / ROTATED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    with Image.open(root / "images" / ROTATED) as img:
        img.save(root / "images" / ROTATED, exif=exif)
    rows.append(f"{ROTATED},cat,train")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_tagged_photos_train_pseudo_and_segment(photos: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    check = runner.invoke(app, ["data", "check", str(photos), "--json"])
    assert check.exit_code == 0, check.output  # rare-class warnings only
    report = json.loads(check.stdout)
    assert report["classes"] == ["background", "cat", "cup", "horse", "motorcycle", "person",
                                 "rocket"]  # fmt: skip
    assert report["splits"]["train"]["images"] == 8 and report["images_checked"] == 10

    run = tmp_path / "run"
    trained = runner.invoke(
        app, ["train", "--data", str(photos), "--out", str(run), "--device", "cpu", "--json",
              *DEMO_SHORT],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["selection_metric"] == "tag_f1"  # no masks: the run names its criterion
    assert summary["best_checkpoint"] and summary["test"] is None  # no test split in the folder
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [2, 4]
    assert all(r["select_metric"] == "tag_f1" and r["miou"] is None for r in evals)
    assert all(0.0 <= r["tag_f1"] <= 1.0 and r["images"] == 2 for r in evals)
    best = Path(summary["best_checkpoint"])

    evaluated = runner.invoke(
        app, ["eval", str(best), "--data", str(photos), "--device", "cpu", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)
    assert scores["miou"] is None and scores["num_images"] == 2
    assert scores["checkpoint"]["selection_metric"] == "tag_f1"
    assert scores["checkpoint"]["best_iteration"] == scores["checkpoint"]["iteration"]

    labels = tmp_path / "labels"
    pseudo = runner.invoke(
        app, ["pseudo", str(best), "--data", str(photos), "--out", str(labels), "--device",
              "cpu", "--json"],
    )  # fmt: skip
    assert pseudo.exit_code == 0, pseudo.output
    assert json.loads(pseudo.stdout)["pseudo_masks"] == 8
    masks = tmp_path / "masks"
    segmented = runner.invoke(
        app, ["segment", str(photos / "images"), "--out", str(masks), "--model", str(best),
              "--backend", "torch", "--json"],
    )  # fmt: skip
    assert segmented.exit_code == 0, segmented.output
    for name, _, split in [*PHOTOS.values(), (ROTATED, "cat", "train")]:
        shown = load_image(photos / "images" / name).shape[:2]  # the displayed size
        stem = Path(name).with_suffix(".png")
        assert read_mask(masks / stem).shape == shown
        if split == "train":  # written in the file's stored orientation, read back upright
            pair = read_image_and_mask(labels / "images" / name, labels / "masks" / stem)
            assert pair[1].shape == shown
    with Image.open(photos / "images" / ROTATED) as stored:
        assert load_image(photos / "images" / ROTATED).shape[:2] == stored.size  # (H, W) = (w, h)
        assert stored.size[0] != stored.size[1]
    assert np.array_equal(
        np.asarray(Image.open(labels / "images" / ROTATED)),
        np.asarray(Image.open(photos / "images" / ROTATED)),
    )
    shutil.rmtree(run)  # a few hundred MB of checkpoints
