"""The synthetic benchmark: determinism, file formats, labels, co-occurrence, safe writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cosa.data.synth as synth
from cosa.data import labels_from_mask, open_dataset, voc_palette, write_synthetic_dataset
from cosa.errors import DataError

SIZES = {"n_train": 5, "n_val": 3, "n_test": 2}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "set"
    return root, write_synthetic_dataset(root, seed=3, **SIZES)


def test_same_seed_gives_identical_bytes(generated, tmp_path: Path) -> None:
    root, _ = generated
    again = tmp_path / "again"
    write_synthetic_dataset(again, seed=3, **SIZES)
    first, second = _hashes(root), _hashes(again)
    assert len(first) == 2 * 10 + 3 + 3  # jpg + png per image, 3 lists, npy + classes + manifest
    assert first == second


def test_images_do_not_depend_on_how_many_are_generated(generated, tmp_path: Path) -> None:
    root, _ = generated
    fewer = tmp_path / "fewer"
    write_synthetic_dataset(fewer, n_train=2, n_val=1, seed=3)
    for name in ("train_000001", "val_000000"):
        for rel in (f"JPEGImages/{name}.jpg", f"SegmentationClass/{name}.png"):
            assert (fewer / rel).read_bytes() == (root / rel).read_bytes()
    other_seed = tmp_path / "other"
    write_synthetic_dataset(other_seed, n_train=1, n_val=0, seed=4)
    jpg = "JPEGImages/train_000000.jpg"
    assert (other_seed / jpg).read_bytes() != (root / jpg).read_bytes()


def test_layout_lists_and_classes(generated) -> None:
    root, summary = generated
    lists = root / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text().split() == [f"train_{i:06d}" for i in range(5)]
    assert len((lists / "val.txt").read_text().split()) == 3
    assert len((lists / "test.txt").read_text().split()) == 2
    classes = json.loads((root / "classes.json").read_text())
    assert classes["names"][0] == "background"
    assert len(classes["names"]) >= 9  # >= 8 foreground classes
    assert tuple(classes["names"]) == summary.class_names
    assert classes["palette"] == voc_palette(len(classes["names"])).tolist()


def test_masks_are_voc_palette_pngs_with_valid_ids(generated) -> None:
    root, _ = generated
    num_names = len(json.loads((root / "classes.json").read_text())["names"])
    seen: set[int] = set()
    for png in sorted((root / "SegmentationClass").glob("*.png")):
        with Image.open(png) as img:
            assert img.mode == "P"
            palette = np.asarray(img.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
            mask = np.asarray(img)
        assert np.array_equal(palette, voc_palette(256))
        ids = set(np.unique(mask).tolist())
        assert 255 in ids and 0 in ids
        assert max(ids - {255}) < num_names
        seen |= ids
        image = Image.open(root / "JPEGImages" / f"{png.stem}.jpg")
        assert image.mode == "RGB" and image.size == (mask.shape[1], mask.shape[0])
    assert len(seen - {0, 255}) >= 4  # several classes across ten images


def test_boundary_band_separates_every_class_boundary(generated) -> None:
    root, _ = generated
    for png in sorted((root / "SegmentationClass").glob("*.png"))[:4]:
        mask = np.asarray(Image.open(png))
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any()  # two different ids never touch without ignore between
        band = (mask == 255).mean()
        assert 0.0 < band < 0.1


def test_sizes_vary_and_are_not_square(generated) -> None:
    root, _ = generated
    sizes = [Image.open(p).size for p in (root / "JPEGImages").glob("*.jpg")]
    for width, height in sizes:
        low, high = synth.SIZE_RANGE
        assert low <= width <= high and low <= height <= high
        assert abs(width - height) >= synth.MIN_ASPECT_GAP
    assert len(set(sizes)) == len(sizes)


def test_label_vectors_match_masks(generated) -> None:
    root, _ = generated
    table = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
    assert len(table) == 10
    for name, label in table.items():
        assert label.dtype == np.float32 and label.shape == (len(synth.CLASS_SPECS),)
        mask = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
        np.testing.assert_array_equal(label, labels_from_mask(mask, len(synth.CLASS_SPECS)))
        assert label.sum() >= 1


def test_opens_as_synth_dataset(generated) -> None:
    root, _ = generated
    index = open_dataset(root, "val")
    assert index.kind == "synth" and index.num_classes == len(synth.CLASS_SPECS)
    assert [s.name for s in index.samples] == [f"val_{i:06d}" for i in range(3)]
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in index.samples)


def test_manifest_stats_match_a_remeasurement(generated) -> None:
    root, summary = generated
    manifest = json.loads((root / "synth.json").read_text())
    table = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
    stats = synth.measure_cooccurrence(table, manifest["contexts"])
    assert stats.images == 10
    assert stats.pair_rates == summary.stats.pair_rates
    assert stats.context_rates == summary.stats.context_rates
    assert manifest["stats"]["mean_classes"] == pytest.approx(summary.stats.mean_classes)
    assert 0.05 < summary.stats.mean_foreground < 0.6
    assert str(summary).startswith("10 images (train 5, val 3, test 2), 10 classes, seed 3: ")


def test_planned_cooccurrence_rates_match_the_documented_constants() -> None:
    labels, contexts = {}, {}
    for i in range(4000):
        plan = synth.plan_scene(np.random.default_rng(i))
        vector = np.zeros(len(synth.CLASS_SPECS), dtype=np.float32)
        vector[[o.class_id - 1 for o in plan.objects]] = 1.0
        labels[str(i)], contexts[str(i)] = vector, plan.context
        assert 1 <= len(plan.objects) <= 4
    stats = synth.measure_cooccurrence(labels, contexts)
    for (a, b), rate in synth.PAIR_RATES.items():
        assert stats.pair_rates[f"{a}+{b}"] == pytest.approx(rate, abs=0.05)
    for name, (_, rate) in synth.CONTEXT_RATES.items():
        assert stats.context_rates[name] == pytest.approx(rate, abs=0.05)
    # Co-occurrence is frequent enough to matter: about a third of the images hold a pair.
    assert stats.pair_image_fraction == pytest.approx(0.32, abs=0.04)


def test_rendering_keeps_every_planned_class() -> None:
    # Placement never drops an object entirely, so image labels (and hence the co-occurrence
    # rates of a generated set) equal the planned ones.
    for index in range(12):
        rng = synth.image_rng(0, "train", index)
        plan = synth.plan_scene(rng)
        _, mask = synth.render_scene(plan, synth.CLASS_SPECS, rng)
        planned = sorted({o.class_id for o in plan.objects})
        assert sorted(set(np.unique(mask).tolist()) - {0, 255}) == planned


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a cosa synthetic dataset"):
        write_synthetic_dataset(target, n_train=1, n_val=0)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_replaces_an_older_synthetic_dataset_and_fills_an_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "set"
    target.mkdir()
    write_synthetic_dataset(target, n_train=2, n_val=1, seed=0)
    write_synthetic_dataset(target, n_train=1, n_val=0, seed=1)
    assert (target / "ImageSets/Segmentation/train.txt").read_text() == "train_000000\n"
    assert not (target / "ImageSets/Segmentation/val.txt").exists()
    assert not (target / "JPEGImages/train_000001.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp folders left


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synth.render_image

    def failing(seed: int, split: str, index: int):
        if index == 1:
            raise KeyboardInterrupt
        return real(seed, split, index)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path / "set", n_train=3, n_val=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"n_train": 0, "n_val": 1}, "n_train"),
        ({"n_train": 1, "n_val": -1}, "n_val"),
        ({"n_train": 1, "n_val": 0, "seed": -2}, "seed"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(DataError, match=word):
        write_synthetic_dataset(tmp_path / "set", **kwargs)
    assert not (tmp_path / "set").exists()
