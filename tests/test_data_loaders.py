"""TrainDataset / EvalDataset over a tiny on-disk VOC-layout folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cosa.data import EvalDataset, TrainDataset, open_dataset, palette_image, voc_palette
from cosa.errors import ConfigError, DataError

NAMES = ("2007_000001", "2007_000002", "2007_000003")


def _write_sample(root: Path, name: str, size: tuple[int, int], class_id: int, seed: int) -> None:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[2:10, 3:12] = class_id
    palette_image(mask, voc_palette()).save(root / "SegmentationClass" / f"{name}.png")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for k, (name, size) in enumerate(zip(NAMES, [(40, 30), (24, 52), (70, 33)], strict=True)):
        _write_sample(root, name, size, class_id=k + 1, seed=k)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(NAMES) + "\n")
    return root


def test_train_items(voc: Path) -> None:
    index = open_dataset(voc, "train")
    dataset = TrainDataset(index, crop_size=32, scale_range=(0.5, 2.0), seed=0)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"weak", "strong", "label", "img_box", "index"}
    assert item["weak"].shape == item["strong"].shape == (3, 32, 32)
    assert item["weak"].dtype == torch.float32
    assert item["label"].dtype == torch.float32 and item["label"].shape == (20,)
    assert item["label"].nonzero().flatten().tolist() == [1]  # class id 2
    assert item["img_box"].dtype == torch.int64 and item["index"] == 1
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["weak"].shape == (3, 3, 32, 32) and batch["img_box"].shape == (3, 4)
    assert batch["index"].tolist() == [0, 1, 2]


def test_views_are_a_function_of_seed_epoch_and_index(voc: Path) -> None:
    index = open_dataset(voc, "train")
    dataset = TrainDataset(index, 32, (0.5, 2.0), seed=5)
    first = dataset[2]
    resumed = TrainDataset(index, 32, (0.5, 2.0), seed=5)  # a restarted run
    assert torch.equal(first["weak"], resumed[2]["weak"])
    assert torch.equal(first["strong"], resumed[2]["strong"])
    assert torch.equal(first["img_box"], resumed[2]["img_box"])
    dataset.set_epoch(3)
    third_epoch = dataset[2]
    assert not torch.equal(first["weak"], third_epoch["weak"])
    assert torch.equal(resumed[(3, 2)]["weak"], third_epoch["weak"])  # sampler-style (epoch, i)
    other_seed = TrainDataset(index, 32, (0.5, 2.0), seed=6)
    assert not torch.equal(first["weak"], other_seed[2]["weak"])


@pytest.mark.parametrize(
    ("crop", "scales", "seed", "word"),
    [
        (8, (0.5, 2.0), 0, "crop_size"),
        (32, (2.0, 0.5), 0, "scale"),
        (32, (0.0, 1.0), 0, "scale"),
        (32, (0.5, 2.0), -1, "seed"),
    ],
)
def test_train_dataset_rejects_bad_settings(voc: Path, crop, scales, seed, word) -> None:
    with pytest.raises(ConfigError, match=word):
        TrainDataset(open_dataset(voc, "train"), crop, scales, seed)


def test_eval_items(voc: Path) -> None:
    dataset = EvalDataset(open_dataset(voc, "train"))
    item = dataset[2]
    assert item["name"] == "2007_000003"
    assert item["image"].dtype == np.uint8 and item["image"].shape == (33, 70, 3)
    assert item["mask"].dtype == np.uint8 and item["mask"].shape == (33, 70)
    assert set(np.unique(item["mask"]).tolist()) == {0, 3}
    assert item["label"].dtype == np.float32 and item["label"].nonzero()[0].tolist() == [2]
    stored = np.asarray(Image.open(voc / "JPEGImages" / "2007_000003.jpg"))
    np.testing.assert_array_equal(item["image"], stored)


def test_images_are_rgb_and_upright(voc: Path) -> None:
    # A grey JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view").
    stored = Image.new("L", (52, 24), 0)
    stored.paste(255, (0, 0, 10, 24))  # bright band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(voc / "JPEGImages" / "2007_000002.jpg", exif=exif)
    item = EvalDataset(open_dataset(voc, "train"))[1]  # its mask is 24 wide, 52 tall
    assert item["image"].shape == (52, 24, 3)
    assert item["image"][:8].mean() > 200 and item["image"][-8:].mean() < 50  # band now on top
    train = TrainDataset(open_dataset(voc, "train"), 32, (1.0, 1.0), seed=0)[1]
    assert train["weak"].shape == (3, 32, 32)


def test_eval_rejects_a_mask_of_another_size(voc: Path) -> None:
    palette_image(np.zeros((5, 5), np.uint8), voc_palette()).save(
        voc / "SegmentationClass" / "2007_000001.png"
    )
    with pytest.raises(DataError, match=r"2007_000001\.png is 5x5 but image .* is 40x30"):
        EvalDataset(open_dataset(voc, "train"))[0]


def test_unreadable_image(voc: Path) -> None:
    (voc / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot be read"):
        EvalDataset(open_dataset(voc, "train"))[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_mask_turns_as_the_decoder_turns_the_image(tmp_path: Path, orientation: int) -> None:
    from cosa.images import load_image_and_orientation, orient_mask

    ids = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)  # every pixel distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(ids).save(tmp_path / "a.png", exif=exif)
    image, found = load_image_and_orientation(tmp_path / "a.png")
    assert found == orientation
    turned = orient_mask(ids, orientation)
    np.testing.assert_array_equal(turned, image[..., 0])
    np.testing.assert_array_equal(orient_mask(turned, orientation, undo=True), ids)


@pytest.mark.parametrize("orientation", [3, 6, 2])
def test_image_and_mask_turn_together(voc: Path, orientation: int) -> None:
    """A mask drawn on the stored pixels keeps covering the same object once the image is shown
    upright: a 180 degree tag (same size) and a 90 degree one (swapped size) alike."""
    from cosa.data.check import check_dataset

    stored = np.zeros((30, 40, 3), np.uint8)
    stored[0:10, 0:8] = 255  # a bright object in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(voc / "JPEGImages" / "2007_000001.png", exif=exif)
    (voc / "JPEGImages" / "2007_000001.jpg").unlink()
    (voc / "JPEGImages" / "2007_000001.png").rename(voc / "JPEGImages" / "2007_000001.jpg")
    mask = np.zeros((30, 40), np.uint8)
    mask[0:10, 0:8] = 1
    palette_image(mask, voc_palette()).save(voc / "SegmentationClass" / "2007_000001.png")
    index = open_dataset(voc, "train")
    item = EvalDataset(index)[0]
    bright = item["image"][..., 0] > 128
    assert bright.sum() == 80 and np.array_equal(bright, item["mask"] == 1)
    full = TrainDataset(index, 48, (1.0, 1.0), seed=0, with_masks=True)[0]
    h0, h1, w0, w1 = full["img_box"].tolist()
    weak_bright = full["weak"][0, h0:h1, w0:w1] > 0.0  # normalised: 0 -> -2.1, 255 -> 2.2
    labelled = full["mask"][h0:h1, w0:w1] == 1  # the view may blur the object's edge
    assert (weak_bright & labelled).sum() / (weak_bright | labelled).sum() > 0.8
    warnings = [p.message for p in check_dataset(voc, ["train"]).warnings]
    turned_in_place = orientation != 6  # the size cannot tell which grid the mask is on
    assert any("stored orientation" in m for m in warnings) == turned_in_place
