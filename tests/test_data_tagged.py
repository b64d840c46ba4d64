"""The tagged-folder layout (a user's photos + labels.csv/jsonl) and `cosa data check`.

Every format of issue 13 item 1 and every problem of item 3, each asserted with its file, line and
message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from cosa.data import EvalDataset, open_dataset
from cosa.data.check import check_dataset
from cosa.data.datasets import detect_layout
from cosa.data.tagged import assign_splits, read_tagged_folder
from cosa.errors import ConfigError, DataError
from cosa.images import palette_image


def _image(
    path: Path, size: tuple[int, int] = (40, 30), exif_orientation: int | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (120, 60, 30))
    if exif_orientation is None:
        img.save(path)
        return
    exif = Image.Exif()
    exif[0x0112] = exif_orientation  # Orientation
    img.save(path, exif=exif)


def _mask(path: Path, ids: list[int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for k, class_id in enumerate(ids):
        mask[:, 2 + 6 * k : 6 + 6 * k] = class_id
    palette_image(mask, np.zeros((256, 3), np.uint8)).save(path)


def _folder(root: Path, labels: str, name: str = "labels.csv", images: tuple = ()) -> Path:
    for image in images:
        _image(root / "images" / image)
    (root / name).write_bytes(labels.encode("utf-8"))
    return root


def _problems(root: Path, **kwargs: object) -> list[str]:
    return [f"{p.severity} {p}" for p in check_dataset(root, **kwargs).problems]


def _assert_reported(problems: list[str], expected: list[str]) -> None:
    """Every expected "severity file[:line]: message" starts one of the reported problems."""
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)


# -------------------------------------------------------------------------------------- formats


def test_long_csv_with_bom_crlf_spaces_and_nested_images(tmp_path: Path) -> None:
    root = _folder(
        tmp_path,
        "\ufeffimage,tags,split\r\n"
        "sub/a.JPG, cat ; dog ,train\r\nb.png,,val\r\nc.webp,dog,train\r\n",
        images=("sub/a.JPG", "b.png", "c.webp"),
    )
    assert detect_layout(root) == "tagged"
    train = open_dataset(root, "train")
    assert train.kind == "tagged"
    assert train.class_names == ("background", "cat", "dog")  # sorted union of the tags
    assert [s.name for s in train.samples] == ["sub/a.JPG", "c.webp"]
    np.testing.assert_array_equal(train.samples[0].label, [1.0, 1.0])
    np.testing.assert_array_equal(train.samples[1].label, [0.0, 1.0])
    val = open_dataset(root, "val")
    np.testing.assert_array_equal(val.samples[0].label, [0.0, 0.0])  # background only, allowed
    assert check_dataset(root).errors == []


def test_wide_csv_and_jsonl_give_the_same_labels(tmp_path: Path) -> None:
    wide = _folder(
        tmp_path / "wide",
        "image,split,dog,cat\na.jpg,train,1,1\nb.jpg,val,0,0\nc.jpg,train,1,0\n",
        images=("a.jpg", "b.jpg", "c.jpg"),
    )
    lines = [
        {"image": "a.jpg", "tags": ["dog", "cat"], "split": "train"},
        {"image": "b.jpg", "tags": [], "split": "val", "note": "ignored"},
        {"image": "c.jpg", "tags": ["dog"], "split": "train"},
    ]
    jsonl = _folder(
        tmp_path / "jsonl",
        "\n".join(json.dumps(x) for x in lines) + "\n",
        "labels.jsonl",
        images=("a.jpg", "b.jpg", "c.jpg"),
    )
    for root in (wide, jsonl):
        index = open_dataset(root, "train")
        assert index.class_names == ("background", "cat", "dog")
        assert [s.label.tolist() for s in index.samples] == [[1.0, 1.0], [0.0, 1.0]]


def test_classes_txt_fixes_the_ids_and_a_model_list_wins(tmp_path: Path) -> None:
    root = _folder(
        tmp_path, "image,tags\na.jpg,zebra\nb.jpg,ant;zebra\n", images=("a.jpg", "b.jpg")
    )
    (root / "classes.txt").write_text("zebra\nant\n")
    folder = read_tagged_folder(root)
    assert folder.class_names == ("background", "zebra", "ant")
    assert folder.class_source == "classes.txt"
    # A checkpoint's own list must agree with classes.txt: ids never change after training.
    other = read_tagged_folder(root, class_names=("background", "ant", "zebra"))
    assert any("class ids must not change" in p.message for p in other.problems)


def test_masks_for_a_subset_and_exif_orientation(tmp_path: Path) -> None:
    root = tmp_path
    _image(root / "images" / "upright.jpg", (40, 30))
    _image(root / "images" / "phone.jpg", (40, 30), exif_orientation=6)  # displayed 30 x 40
    (root / "labels.csv").write_text("image,tags,split\nupright.jpg,a,val\nphone.jpg,a;b,val\n")
    _mask(root / "masks" / "phone.png", [1, 2], size=(30, 40))  # at the displayed size
    index = open_dataset(root, "val")
    assert index.samples[0].mask_path is None
    assert index.samples[1].mask_path == root / "masks" / "phone.png"
    item = EvalDataset(index)[1]
    assert item["image"].shape == (40, 30, 3) and item["mask"].shape == (40, 30)
    assert check_dataset(root).errors == []


def test_derived_split_is_seeded_stratified_and_order_free() -> None:
    images = [(f"dog{i}.jpg", ["dog"]) for i in range(20)]
    images += [(f"cat{i}.jpg", ["cat", "dog"]) for i in range(10)]  # cat is their rarest tag
    images += [(f"bg{i}.jpg", []) for i in range(10)]
    splits = assign_splits(images, 0.1, seed=0)
    val = {name for name, split in splits.items() if split == "val"}
    assert len(val) == 4  # round(0.1 * 20) + round(0.1 * 10) + round(0.1 * 10)
    assert sum(v.startswith("dog") for v in val) == 2
    assert sum(v.startswith("cat") for v in val) == 1 and sum(v.startswith("bg") for v in val) == 1
    assert assign_splits(list(reversed(images)), 0.1, seed=0) == splits
    assert assign_splits(images, 0.1, seed=1) != splits
    assert set(assign_splits(images, 0.0, seed=0).values()) == {"train"}


def test_derived_split_through_open_dataset(tmp_path: Path) -> None:
    names = [f"{i:02d}.jpg" for i in range(20)]
    rows = "".join(f"{n},{'cat' if i % 2 else 'dog'}\n" for i, n in enumerate(names))
    root = _folder(tmp_path, "image,tags\n" + rows, images=tuple(names))
    train, val = open_dataset(root, "train"), open_dataset(root, "val", val_fraction=0.1)
    assert len(train) == 18 and len(val) == 2
    assert {s.name for s in train.samples}.isdisjoint(s.name for s in val.samples)
    assert len(open_dataset(root, "val", val_fraction=0.3)) == 6
    with pytest.raises(ConfigError, match="val_fraction"):
        open_dataset(root, "val", val_fraction=1.0)
    with pytest.raises(DataError, match="splits are train, val, test, not 'train_aug'"):
        open_dataset(root, "train_aug")


# ------------------------------------------------------------------------------------- problems


def test_every_labels_problem_names_file_line_and_fix(tmp_path: Path) -> None:
    root = _folder(
        tmp_path,
        "image,tags,split\n"
        "a.jpg,dgo,train\n"  # 2: unknown tag -> did you mean 'dog'
        "missing.jpg,dog,train\n"  # 3: listed but missing
        "a.jpg,dog,train\n"  # 4: duplicate row
        "b.jpg,dog,\n"  # 5: split column without a value
        "c.jpg,background,val\n"  # 6: background is implicit
        "../x.jpg,dog,train\n",  # 7: outside images/
        images=("a.jpg", "b.jpg", "c.jpg", "unlisted.jpg"),
    )
    (root / "classes.txt").write_text("dog\ncat\n")
    problems = _problems(root)
    labels = root / "labels.csv"
    expected = [
        f"error {labels}:2: tag 'dgo' is not a class (did you mean 'dog'?)",
        f"error {labels}:3: image missing.jpg is listed but images/missing.jpg does not exist",
        f"error {labels}:4: a.jpg is listed twice (first on line 2)",
        f"error {labels}:5: split is empty; write train, val or test",
        f"error {labels}:6: tag 'background' is implicit (id 0)",
        f"error {labels}:7: image '../x.jpg' is not a path inside images/",
        f"warning {root / 'images' / 'unlisted.jpg'}: is not listed in labels.csv",
    ]
    _assert_reported(problems, expected)
    with pytest.raises(DataError, match=r"has \d+ data errors, the first: .*labels.csv:2: tag"):
        open_dataset(root, "train")


def test_bad_files_are_errors(tmp_path: Path) -> None:
    root = _folder(
        tmp_path,
        "image,tags\nempty.jpg,a\nbroken.png,a\nsized.jpg,a\nids.jpg,a\nok.jpg,a;b\n",
        images=("sized.jpg", "ids.jpg", "ok.jpg"),
    )
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _mask(root / "masks" / "sized.png", [1], size=(20, 20))
    _mask(root / "masks" / "ids.png", [1, 7])
    _mask(root / "masks" / "orphan.png", [1])
    problems = _problems(root, val_fraction=0.0)
    expected = [
        f"error {root / 'images' / 'empty.jpg'}: empty file (0 bytes)",
        f"error {root / 'images' / 'broken.png'}: truncated or corrupt image data",
        f"error {root / 'masks' / 'sized.png'}: is 20x20 but its image",
        f"error {root / 'masks' / 'ids.png'}: mask holds class id(s) [7]",
        f"warning {root / 'masks' / 'orphan.png'}: belongs to no listed image",
        f"warning {root / 'labels.csv'}: class 'b' has 1 train image(s)",
    ]
    _assert_reported(problems, expected)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("labels.csv", "name,tags\na.jpg,x\n", "the header ['name', 'tags'] has no 'image' column"),
        ("labels.csv", "image,tags\na.jpg,x,extra\n", "has 3 fields, the header has 2"),
        ("labels.csv", "image,dog\na.jpg,yes\n", "column 'dog' holds 'yes'; wide-form"),
        ("labels.csv", "image,tags\n", "lists no images"),
        ("labels.jsonl", '{"image": "a.jpg", "tags": "dog"}\n', "needs 'tags' as a list"),
        ("labels.jsonl", "{not json\n", "is not valid JSON"),
    ],
)
def test_malformed_labels_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    root = _folder(tmp_path, content, name, images=("a.jpg",))
    assert any(message in p for p in _problems(root)), _problems(root)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    root = tmp_path
    _image(root / "images" / "a.jpg")
    (root / "labels.csv").write_bytes(b"image,tags\na.jpg,caf\xe9\n")
    assert any(f"{root / 'labels.csv'}:2: is not UTF-8" in p for p in _problems(root))


def test_no_labels_file_and_two_labels_files(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.jpg")
    assert any("labels.csv: does not exist" in p for p in _problems(tmp_path))
    (tmp_path / "labels.csv").write_text("image,tags\na.jpg,x\n")
    (tmp_path / "labels.jsonl").write_text('{"image": "a.jpg", "tags": ["x"]}\n')
    assert any("holds both labels.csv and labels.jsonl" in p for p in _problems(tmp_path))


def test_vocabulary_problems(tmp_path: Path) -> None:
    root = _folder(tmp_path, "image,tags\na.jpg,Dog\nb.jpg,dog\n", images=("a.jpg", "b.jpg"))
    assert any("tags ['Dog', 'dog'] differ only in case" in p for p in _problems(root))
    (root / "classes.txt").write_text("dog\nDog\ndog\n")
    assert any("classes.txt:3: class 'dog' is listed twice" in p for p in _problems(root))


# ------------------------------------------------------------------------------------------ CLI


def test_data_check_cli_exit_codes_and_json(tmp_path: Path) -> None:
    root = _folder(
        tmp_path, "image,tags,split\na.jpg,cat,train\nb.jpg,,val\n", images=("a.jpg", "b.jpg")
    )
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(root), "--json"])
    assert ok.exit_code == 0, ok.output  # a warning (1 cat image) only
    report = json.loads(ok.stdout)
    assert report["layout"] == "tagged" and report["errors"] == 0 and report["warnings"] == 1
    assert report["splits"]["train"] == {
        "images": 1,
        "with_masks": 0,
        "without_tags": 0,
        "per_class": {"cat": 1},
    }
    assert report["splits"]["val"]["without_tags"] == 1
    (root / "labels.csv").write_text("image,tags,split\na.jpg,cat,train\nmissing.jpg,cat,val\n")
    bad = runner.invoke(app, ["data", "check", str(root)])
    assert bad.exit_code == 2
    assert f"error: {root / 'labels.csv'}:3: image missing.jpg is listed" in bad.output
    assert "1 errors, 2 warnings" in bad.output  # b.jpg is no longer listed


def test_data_check_on_the_synthetic_layout(tmp_path: Path) -> None:
    from cosa.data import write_synthetic_dataset

    root = tmp_path / "synth"
    write_synthetic_dataset(root, 6, 2, 2, seed=3)
    report = check_dataset(root)
    assert report.layout == "synth" and report.errors == []
    assert set(report.splits) == {"train", "val", "test"} and report.images_checked == 10
    assert report.splits["val"].with_masks == 2
    (root / "JPEGImages" / report_first_image(root)).write_bytes(b"garbage")
    assert any("not an image" in p for p in _problems(root))


def report_first_image(root: Path) -> str:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0] + ".jpg"


def test_train_refuses_bad_data_before_writing_anything(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "mine",
        "image,tags,split\na.jpg,dog,train\nb.jpg,dgo,val\n",
        images=("a.jpg", "b.jpg"),
    )
    (root / "classes.txt").write_text("dog\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(run)])
    assert result.exit_code == 2
    assert f"{root / 'labels.csv'}:3: tag 'dgo' is not a class (did you mean 'dog'?)" in (
        " ".join(result.output.split())
    )
    assert not run.exists()
