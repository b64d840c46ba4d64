"""open_dataset on tiny VOC / VOC train_aug / COCO / synthetic folders built here; its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cosa.data import (
    COCO_CLASSES,
    VOC_CLASSES,
    EvalDataset,
    detect_layout,
    labels_from_mask,
    open_dataset,
    palette_image,
    read_mask,
    voc_palette,
)
from cosa.errors import DataError


def _image(path: Path, size: tuple[int, int] = (40, 32), colour: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 30, 200)).save(path)


def _mask(path: Path, ids: list[int], size: tuple[int, int] = (40, 32)) -> None:
    """A mask of vertical stripes, one per id, with a 255 column between them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for k, class_id in enumerate(ids):
        mask[:, 2 + 6 * k : 6 + 6 * k] = class_id
        mask[:, 6 + 6 * k] = 255
    palette_image(mask, voc_palette()).save(path)


def _list(root: Path, split: str, lines: list[str]) -> None:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _onehot(num: int, ids: list[int]) -> np.ndarray:
    vector = np.zeros(num, dtype=np.float32)
    vector[[i - 1 for i in ids]] = 1.0
    return vector


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """VOC 2012 without SBD: train (2 images) and val (1 image), masks in SegmentationClass/."""
    root = tmp_path / "VOC2012"
    for name, ids in {"2007_000001": [1, 15], "2007_000002": [7], "2008_000003": [20]}.items():
        _image(root / "JPEGImages" / f"{name}.jpg")
        _mask(root / "SegmentationClass" / f"{name}.png", ids)
    _list(root, "train", ["2007_000001", "2007_000002"])
    _list(root, "val", ["2008_000003"])
    return root


def test_voc_labels_derived_from_masks(voc: Path) -> None:
    index = open_dataset(voc, "train")
    assert index.kind == "voc" and index.split == "train" and index.root == voc
    assert index.class_names == VOC_CLASSES and index.num_classes == 20
    assert index.palette[1] == (128, 0, 0) and len(index.palette) == 21
    assert [s.name for s in index.samples] == ["2007_000001", "2007_000002"]
    first = index.samples[0]
    assert first.image_path == voc / "JPEGImages" / "2007_000001.jpg"
    assert first.mask_path == voc / "SegmentationClass" / "2007_000001.png"
    np.testing.assert_array_equal(first.label, _onehot(20, [1, 15]))
    assert first.label.dtype == np.float32 and not first.label.flags.writeable
    assert index.has_masks and len(index) == 2


@pytest.fixture
def voc_aug(voc: Path) -> Path:
    """Adds SBD: SegmentationClassAug/ for two names (one only there) and a DeepLab-style list."""
    _image(voc / "JPEGImages" / "2009_000004.jpg")
    _mask(voc / "SegmentationClassAug" / "2009_000004.png", [12])
    _mask(voc / "SegmentationClassAug" / "2007_000001.png", [1, 15, 3])  # Aug mask wins
    _list(
        voc,
        "train_aug",
        [
            "/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png",
            "/JPEGImages/2007_000002.jpg /SegmentationClassAug/2007_000002.png",
            "/JPEGImages/2009_000004.jpg /SegmentationClassAug/2009_000004.png",
        ],
    )
    return voc


def test_voc_train_aug_without_label_file(voc_aug: Path) -> None:
    index = open_dataset(voc_aug, "train_aug")
    by_name = {s.name: s for s in index.samples}
    assert list(by_name) == ["2007_000001", "2007_000002", "2009_000004"]
    assert by_name["2007_000001"].mask_path == voc_aug / "SegmentationClassAug" / "2007_000001.png"
    assert by_name["2007_000002"].mask_path == voc_aug / "SegmentationClass" / "2007_000002.png"
    np.testing.assert_array_equal(by_name["2007_000001"].label, _onehot(20, [1, 3, 15]))
    np.testing.assert_array_equal(by_name["2009_000004"].label, _onehot(20, [12]))


def test_voc_train_aug_labels_come_from_the_label_file(voc_aug: Path) -> None:
    # The file deliberately disagrees with the masks, to show which source is used.
    table = {
        name: _onehot(20, [5])
        for name in ("2007_000001", "2007_000002", "2009_000004", "2008_000003", "2010_000005")
    }
    np.save(voc_aug / "cls_labels_onehot.npy", table, allow_pickle=True)
    _image(voc_aug / "JPEGImages" / "2010_000005.jpg")  # listed, labelled, but without any mask
    _list(voc_aug, "train_aug", ["2007_000001", "2009_000004", "2010_000005"])
    index = open_dataset(voc_aug, "train_aug")
    for sample in index.samples:
        np.testing.assert_array_equal(sample.label, _onehot(20, [5]))
    assert index.samples[2].mask_path is None and not index.has_masks
    evaluation = EvalDataset(index)  # an image without a mask is scored on its tags only
    assert evaluation[2]["mask"] is None and evaluation[0]["mask"].shape == (32, 40)


def test_coco_layout(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    names = {"COCO_train2014_000000000009": [1, 80], "COCO_val2014_000000000042": [18]}
    for name, ids in names.items():
        subset = name.split("_")[1]
        _image(root / "JPEGImages" / subset / f"{name}.jpg")
        _mask(root / "SegmentationClass" / subset / f"{name}.png", ids)
    _list(root, "train", ["COCO_train2014_000000000009"])
    _list(root, "val_part", ["COCO_val2014_000000000042", "COCO_train2014_000000000009"])
    assert detect_layout(root) == "coco"
    index = open_dataset(root, "val_part")
    assert index.kind == "coco" and len(index.class_names) == 81
    assert index.class_names == COCO_CLASSES and index.class_names[1] == "person"
    first, second = index.samples
    assert first.image_path == root / "JPEGImages/val2014/COCO_val2014_000000000042.jpg"
    assert second.mask_path == root / "SegmentationClass/train2014/COCO_train2014_000000000009.png"
    np.testing.assert_array_equal(first.label, _onehot(80, [18]))
    np.testing.assert_array_equal(second.label, _onehot(80, [1, 80]))

    np.save(root / "cls_labels_onehot.npy", {n: _onehot(80, [2]) for n in names}, allow_pickle=True)
    np.testing.assert_array_equal(open_dataset(root, "train").samples[0].label, _onehot(80, [2]))

    _list(root, "bad", ["000000000009"])
    with pytest.raises(DataError, match="COCO_val2014_"):
        open_dataset(root, "bad")


def test_synth_layout_uses_its_class_file(voc: Path) -> None:
    classes = {"names": ["background", "a", "b"], "palette": [[0, 0, 0], [1, 2, 3], [4, 5, 6]]}
    (voc / "classes.json").write_text(json.dumps(classes))
    _mask(voc / "SegmentationClass" / "2007_000001.png", [2])
    _mask(voc / "SegmentationClass" / "2007_000002.png", [1, 2])
    index = open_dataset(voc, "train")
    assert index.kind == "synth" and index.class_names == ("background", "a", "b")
    assert index.palette == ((0, 0, 0), (1, 2, 3), (4, 5, 6))
    np.testing.assert_array_equal(index.samples[1].label, [1.0, 1.0])
    # val's mask holds id 20: more than this class list has
    with pytest.raises(DataError, match=r"2008_000003\.png.*id\(s\) \[20\]"):
        open_dataset(voc, "val")


@pytest.mark.parametrize(
    "body",
    [
        '{"names": ["cat", "dog"], "palette": [[0,0,0],[1,1,1]]}',
        '{"names": ["background", "a"], "palette": [[0,0,0]]}',
        '{"names": ["background", "a"], "palette": [[0,0,0],[1,1,300]]}',
        "not json",
    ],
)
def test_bad_class_file(voc: Path, body: str) -> None:
    (voc / "classes.json").write_text(body)
    with pytest.raises(DataError, match="classes.json"):
        open_dataset(voc, "train")


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is not a dataset folder.*cosa data synth"):
        open_dataset(tmp_path, "train")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nowhere", "train")


def test_unknown_layout_points_at_the_nested_folder(voc: Path) -> None:
    with pytest.raises(DataError, match="did you mean .*VOC2012"):
        open_dataset(voc.parent, "train")


def test_missing_split_lists_the_available_ones(voc: Path) -> None:
    message = r"train_aug\.txt does not exist \(splits found: train, val\)"
    with pytest.raises(DataError, match=message):
        open_dataset(voc, "train_aug")


def test_listed_image_missing(voc: Path) -> None:
    _list(voc, "train", ["2007_000001", "2099_000000"])
    with pytest.raises(DataError, match=r"JPEGImages/2099_000000\.jpg is listed in .*train\.txt"):
        open_dataset(voc, "train")


def test_label_vector_of_wrong_length(voc: Path) -> None:
    np.save(
        voc / "cls_labels_onehot.npy",
        {"2007_000001": np.ones(80, np.float32), "2007_000002": np.ones(20, np.float32)},
    )
    with pytest.raises(DataError, match="2007_000001 has 80 entries .* 20 foreground classes"):
        open_dataset(voc, "train")


def test_name_missing_from_label_file(voc: Path) -> None:
    np.save(voc / "cls_labels_onehot.npy", {"2007_000001": np.ones(20, np.float32)})
    with pytest.raises(DataError, match="2007_000002 is missing from .*cls_labels_onehot.npy"):
        open_dataset(voc, "train")


def test_label_file_that_is_not_a_dict(voc: Path) -> None:
    np.save(voc / "cls_labels_onehot.npy", np.zeros((2, 20), np.float32))
    with pytest.raises(DataError, match="expected a dict"):
        open_dataset(voc, "train")


def test_no_label_and_no_mask(voc: Path) -> None:
    (voc / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(DataError, match="2007_000002 .* has no image-level label"):
        open_dataset(voc, "train")


def test_duplicate_and_empty_lists(voc: Path) -> None:
    _list(voc, "train", ["2007_000001", "2007_000001"])
    with pytest.raises(DataError, match=r"train\.txt:2: '2007_000001' is listed twice"):
        open_dataset(voc, "train")
    _list(voc, "train", [])
    with pytest.raises(DataError, match="is empty"):
        open_dataset(voc, "train")


def test_labels_from_mask_ignores_background_and_ignore() -> None:
    mask = np.array([[0, 255, 3], [3, 1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(labels_from_mask(mask, 4), [1.0, 0.0, 1.0, 0.0])
    assert labels_from_mask(np.zeros((2, 2), np.uint8), 4).dtype == np.float32
    with pytest.raises(DataError, match=r"id\(s\) \[5\]"):
        labels_from_mask(np.array([[5]], dtype=np.uint8), 4)


def test_read_mask_rejects_colour_masks(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(path)
    with pytest.raises(DataError, match="mode 'RGB'"):
        read_mask(path)
    Image.new("L", (4, 4), 7).save(path)
    assert read_mask(path).tolist() == [[7] * 4] * 4


def test_voc_palette_values() -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[15].tolist() == [192, 128, 128]  # VOC "person"
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette}) == 256
