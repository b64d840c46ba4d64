"""`cosa.serving.segment.segment_inputs`: every bad-input kind of issue 5, outputs, bounds."""

from __future__ import annotations

import json
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_fixtures import (
    PALETTE,
    FakeRunner,
    ParallelRunner,
    TinyArtifacts,
    expected_fake_mask,
    tiny_artifacts,
)

from cosa.errors import ConfigError, InputError, ServingError
from cosa.export.spec import MASK_NAME
from cosa.images import load_image
from cosa.serving import segment as segment_module
from cosa.serving.runners import OnnxRuntimeRunner
from cosa.serving.segment import PipelineLimits, SizeGrouper, segment_inputs

RNG = np.random.default_rng(0)


def rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_no_partial_files(out: Path) -> None:
    for path in all_files(out):
        assert not path.name.startswith("."), f"temporary file left: {path}"
        assert path.stat().st_size > 0, f"empty file: {path}"


def build_zoo(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Every good and bad kind of input. Returns ({good rel path: mask stem}, {bad: reason})."""
    good: dict[str, str] = {}
    save(rgb(24, 32), root / "plain.png")
    save(rgb(24, 32)[..., 0], root / "gray.png")
    save(np.dstack([rgb(24, 32), np.full((24, 32), 128, np.uint8)]), root / "rgba.png")
    Image.new("P", (17, 9), 3).save(root / "palette.png")
    Image.new("CMYK", (20, 10), (0, 200, 10, 0)).save(root / "cmyk.jpg")
    Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16)).save(
        root / "deep16.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 40 wide, 20 high stored -> 20 wide, 40 high shown
    Image.fromarray(rgb(20, 40)).save(root / "rotated.png", exif=exif)
    save(rgb(1, 1), root / "one.png")
    save(rgb(16, 2000), root / "wide.png")
    save(rgb(12, 18), root / "name with spaces été 猫.webp", lossless=True)
    save(rgb(10, 14), root / "nested" / "deeper" / "n.bmp")
    save(rgb(10, 14), root / "UPPER.TIF")
    save(rgb(10, 14), root / "upper2.JPG")
    save(rgb(300, 400), root / "bomb_sized.png")  # 120000 px > the limit the test sets
    for rel in [p.relative_to(root) for p in root.rglob("*") if p.is_file()]:
        if rel.name != "bomb_sized.png":
            good[str(rel)] = str(rel.with_suffix(""))
    bad: dict[str, str] = {}
    full = save(rgb(64, 64), root / "tmp_full.jpg").read_bytes()
    (root / "tmp_full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    bad["truncated.jpg"] = "truncated or corrupt image data"
    (root / "empty.png").touch()
    bad["empty.png"] = "empty file (0 bytes)"
    (root / "text.jpg").write_text("hello")
    bad["text.jpg"] = "not an image"
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    bad["dangling.jpg"] = "dangling symlink"
    os.mkfifo(root / "fifo.png")
    bad["fifo.png"] = "not a regular file"
    bad["bomb_sized.png"] = "decompression-bomb limit"
    (root / "folder.jpg").mkdir()  # a folder named like an image: a warning, not a failure
    (root / "readme.txt").write_text("ignored")
    return good, bad


def test_bad_inputs_are_reported_and_every_good_image_is_segmented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = build_zoo(tmp_path / "in")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    out = tmp_path / "out"
    runner = FakeRunner()
    with pytest.warns(Image.DecompressionBombWarning):
        summary = segment_inputs([str(tmp_path / "in")], out, runner, batch_size=3)

    assert summary.processed == len(good)
    assert {Path(f.path).name: f.error for f in summary.failed}.keys() == bad.keys()
    for failure in summary.failed:
        assert bad[Path(failure.path).name] in failure.error
    assert (
        f"{tmp_path / 'in' / 'folder.jpg'}: a folder named like an image; searched as a folder"
        in summary.warnings
    )
    for rel, stem in good.items():
        mask_file = out / f"{stem}.png"
        image = load_image(tmp_path / "in" / rel)
        mask = Image.open(mask_file)
        assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0]), rel
        np.testing.assert_array_equal(np.asarray(mask), expected_fake_mask(image), err_msg=rel)
    assert (out / "rotated.png").exists() and Image.open(out / "rotated.png").size == (20, 40)
    assert len(all_files(out)) == len(good)
    assert_no_partial_files(out)
    assert max(shape[0] for shape in runner.batches) == 3

    payload = json.loads(json.dumps(summary.to_json()))
    assert payload["processed"] == len(good) and payload["out"] == str(out)
    assert sorted(f["path"] for f in payload["failed"]) == sorted(
        str(tmp_path / "in" / name) for name in bad
    )
    assert set(payload) >= {"processed", "failed", "warnings", "out"}


def test_masks_equal_the_runners_own_masks(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    tiny: TinyArtifacts = tiny_artifacts(pytestconfig, tmp_path_factory)
    sizes = [(48, 64), (48, 64), (33, 50), (48, 64), (20, 90), (33, 50), (48, 64)]
    arrays = {f"img{i}.png": rgb(h, w) for i, (h, w) in enumerate(sizes)}
    for name, array in arrays.items():
        save(array, tmp_path / "in" / name)
    runner = OnnxRuntimeRunner(tiny.folder)
    summary = segment_inputs(
        [str(tmp_path / "in")], tmp_path / "out", runner, batch_size=3, fmt="npy", overlay=True
    )
    assert summary.processed == len(sizes) and summary.failed == []
    for name, array in arrays.items():
        direct = runner.infer(array.transpose(2, 0, 1)[None].astype(np.float32))["mask"][0]
        written = np.load(tmp_path / "out" / name.replace(".png", ".npy"))
        assert written.dtype == np.int32 and written.shape == array.shape[:2]
        assert (written == direct).mean() > 0.999
        overlay = Image.open(tmp_path / "out" / name.replace(".png", ".overlay.jpg"))
        assert overlay.size == (array.shape[1], array.shape[0])


def test_skip_existing(tmp_path: Path) -> None:
    for i in range(4):
        save(rgb(8, 8), tmp_path / "in" / f"{i}.png")
    out = tmp_path / "out"
    first = segment_inputs([str(tmp_path / "in")], out, FakeRunner(), overlay=True)
    assert (first.processed, first.skipped) == (4, 0)
    stamp = (out / "0.png").stat().st_mtime_ns
    (out / "1.png").unlink()
    (out / "2.overlay.jpg").unlink()
    runner = FakeRunner()
    second = segment_inputs([str(tmp_path / "in")], out, runner, overlay=True, skip_existing=True)
    assert (second.processed, second.skipped) == (2, 2)
    assert sum(shape[0] for shape in runner.batches) == 2
    assert (out / "0.png").stat().st_mtime_ns == stamp
    assert "skipped 2 input(s) whose outputs exist (--skip-existing)" in second.warnings
    assert (out / "1.png").exists() and (out / "2.overlay.jpg").exists()


def test_memory_stays_bounded_and_batches_hold_one_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [(8, 8), (8, 12), (10, 8)]
    for i in range(60):
        h, w = sizes[(i * 7) % 5 % 3]
        save(rgb(h, w), tmp_path / "in" / f"{i:03d}.png")
    live = 0
    peak = 0
    lock = threading.Lock()

    def release() -> None:
        nonlocal live
        with lock:
            live -= 1

    def counting_load(path: Path) -> np.ndarray:
        nonlocal live, peak
        image = load_image(path)
        with lock:
            live += 1
            peak = max(peak, live)
        weakref.finalize(image, release)
        return image

    monkeypatch.setattr(segment_module, "load_image", counting_load)
    limits = PipelineLimits.for_batch(batch_size=4, decode_workers=2, encode_workers=2)
    runner = FakeRunner(delay=0.002)
    summary = segment_inputs(
        [str(tmp_path / "in")], tmp_path / "out", runner, batch_size=4, overlay=True, limits=limits
    )
    assert summary.processed == 60
    assert live == 0
    assert 4 <= peak <= limits.max_images(batch_size=4) < 60
    assert max(shape[0] for shape in runner.batches) == 4
    assert sum(shape[0] for shape in runner.batches) == 60
    # Three sizes interleaved within a window of 8: most batches are full.
    assert sum(shape[0] == 4 for shape in runner.batches) >= 10


def test_size_grouper() -> None:
    grouper = SizeGrouper(batch_size=2, window=3)
    img = {s: np.zeros((*s, 3), np.uint8) for s in [(1, 1), (2, 2), (3, 3), (4, 4)]}

    def names(groups: list) -> list[list[str]]:
        return [[item for item, _ in group] for group in groups]

    assert names(grouper.add("a", img[(1, 1)])) == []
    assert names(grouper.add("b", img[(2, 2)])) == []
    assert names(grouper.add("c", img[(1, 1)])) == [["a", "c"]]  # full batch
    assert names(grouper.add("d", img[(3, 3)])) == []
    assert names(grouper.add("e", img[(4, 4)])) == []
    assert grouper.held == 3
    assert names(grouper.add("f", img[(4, 4)])) == [["e", "f"]]
    assert names(grouper.add("g", img[(1, 1)])) == []
    assert names(grouper.add("h", img[(3, 3)])) == [["d", "h"]]
    assert names(grouper.add("i", img[(4, 4)])) == []
    assert names(grouper.add("j", img[(3, 3)])) == [["b"]]  # window exceeded: the oldest leaves
    assert names(grouper.drain()) == [["g"], ["i"], ["j"]]
    assert grouper.held == 0


class PickyRunner(FakeRunner):
    """Refuses images wider than 50 px, like a TensorRT profile would."""

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.shape[3] > 50:
            raise InputError(f"input of shape {images.shape} is outside the profile")
        return super().infer(images)


def test_runner_input_errors_fail_those_images_only(tmp_path: Path) -> None:
    save(rgb(8, 60), tmp_path / "in" / "wide.png")
    save(rgb(8, 8), tmp_path / "in" / "ok.png")
    summary = segment_inputs([str(tmp_path / "in")], tmp_path / "out", PickyRunner())
    assert summary.processed == 1
    assert [(Path(f.path).name, "outside the profile" in f.error) for f in summary.failed] == [
        ("wide.png", True)
    ]


class BrokenRunner(FakeRunner):
    def __init__(self, fail_after: int, parallel_calls: int = 1) -> None:
        super().__init__()
        self.fail_after = fail_after
        self.parallel_calls = parallel_calls

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.batches) >= self.fail_after:
            raise ServingError("server localhost:8001 is not reachable")
        return super().infer(images)


@pytest.mark.parametrize("parallel_calls", [1, 2])
def test_server_errors_stop_the_run_and_leave_only_complete_files(
    tmp_path: Path, parallel_calls: int
) -> None:
    for i in range(10):
        save(rgb(8, 8), tmp_path / "in" / f"{i}.png")
    runner = BrokenRunner(fail_after=2, parallel_calls=parallel_calls)
    with pytest.raises(ServingError, match="not reachable"):
        segment_inputs([str(tmp_path / "in")], tmp_path / "out", runner, batch_size=2)
    written = all_files(tmp_path / "out")
    assert len(written) <= 4
    assert_no_partial_files(tmp_path / "out")
    for path in written:
        assert Image.open(path).size == (8, 8)
    # Nothing keeps working after the error: decoders, batching thread, model calls, encoders.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("cosa-")]


class TransposingRunner(FakeRunner):
    """A broken model: its masks come back (N, W, H)."""

    def __init__(self, parallel_calls: int) -> None:
        super().__init__(delay=0.005)
        self.parallel_calls = parallel_calls

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {MASK_NAME: super().infer(images)[MASK_NAME].transpose(0, 2, 1)}


@pytest.mark.parametrize("parallel_calls", [1, 2])
def test_a_model_with_wrong_mask_shapes_stops_the_run_cleanly(
    tmp_path: Path, parallel_calls: int
) -> None:
    for i in range(12):
        save(rgb(8, 12), tmp_path / "in" / f"{i}.png")
    runner = TransposingRunner(parallel_calls)
    try:
        segment_inputs([str(tmp_path / "in")], tmp_path / "out", runner, batch_size=2)
    except ServingError as error:  # not pytest.raises: its exit drops the failed frames
        # The error came from the main thread while model calls, decodes and the batching
        # thread were running: all are stopped before segment_inputs raises, even while the
        # traceback (the CLI still holds it when it reports) keeps the pipeline's frames alive.
        alive = [t.name for t in threading.enumerate() if t.name.startswith("cosa-")]
        assert alive == []
        assert "masks of shape (2, 12, 8)" in str(error) and "check the artifact" in str(error)
    else:
        pytest.fail("a model returning transposed masks must stop the run")
    assert all_files(tmp_path / "out") == []


def test_write_failures_are_reported_per_file(tmp_path: Path) -> None:
    save(rgb(8, 8), tmp_path / "in" / "sub" / "a.png")
    save(rgb(8, 8), tmp_path / "in" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where the folder should be")
    summary = segment_inputs([str(tmp_path / "in")], tmp_path / "out", FakeRunner())
    assert summary.processed == 1
    assert len(summary.failed) == 1 and "cannot write" in summary.failed[0].error
    assert summary.failed[0].path == str(tmp_path / "in" / "sub" / "a.png")


def test_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        segment_inputs([str(tmp_path / "empty")], tmp_path / "out", FakeRunner())
    assert not (tmp_path / "out").exists()  # nothing created for a run that cannot start
    (tmp_path / "file").write_text("x")
    save(rgb(4, 4), tmp_path / "a.png")
    with pytest.raises(ConfigError, match="is a file"):
        segment_inputs([str(tmp_path / "a.png")], tmp_path / "file", FakeRunner())
    with pytest.raises(ConfigError, match="unknown mask format 'jpg'"):
        segment_inputs([str(tmp_path / "a.png")], tmp_path / "o", FakeRunner(), fmt="jpg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 1"):
        segment_inputs([str(tmp_path / "a.png")], tmp_path / "o", FakeRunner(), batch_size=0)


def test_missing_inputs_are_failures_next_to_good_ones(tmp_path: Path) -> None:
    save(rgb(4, 4), tmp_path / "a.png")
    summary = segment_inputs(
        [str(tmp_path / "a.png"), str(tmp_path / "nope.png")], tmp_path / "out", FakeRunner()
    )
    assert summary.processed == 1
    assert [(f.path, f.error) for f in summary.failed] == [
        (str(tmp_path / "nope.png"), "no such file or folder")
    ]
    assert Image.open(tmp_path / "out" / "a.png").getpalette()[:12] == [
        c for colour in PALETTE for c in colour
    ]


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        save(rgb(4, 4), tmp_path / "in" / f"{i}.png")
    segment_inputs([str(tmp_path / "in")], tmp_path / "out", FakeRunner(), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "segment" in captured.err and "3/3" in captured.err


class AsyncClient(FakeRunner):
    """A client double with `infer_many`: answers from a thread pool, in order, and records the
    most batches outstanding at once."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def infer_many(self, batches, max_in_flight: int):  # noqa: ANN001, ANN201 - client's API
        from concurrent.futures import ThreadPoolExecutor

        window: list = []
        with ThreadPoolExecutor(4) as pool:
            for batch in batches:
                window.append(pool.submit(self.infer, batch))
                self.peak = max(self.peak, len(window))
                if len(window) == max_in_flight:
                    yield window.pop(0).result()
            for future in window:
                yield future.result()


def test_clients_get_several_batches_in_flight(tmp_path: Path) -> None:
    arrays = {f"{i:02d}.png": rgb(8, 8 + 4 * (i % 2)) for i in range(20)}
    for name, array in arrays.items():
        save(array, tmp_path / "in" / name)
    client = AsyncClient()
    summary = segment_inputs(
        [str(tmp_path / "in")], tmp_path / "out", client, batch_size=2, max_in_flight=3
    )
    assert summary.processed == 20 and client.peak == 3
    for name, array in arrays.items():
        mask = np.asarray(Image.open(tmp_path / "out" / name))
        np.testing.assert_array_equal(mask, expected_fake_mask(array))


@pytest.mark.parametrize("parallel_calls", [1, 2, 3])
def test_runners_with_parallel_calls_get_that_many_at_once(
    tmp_path: Path, parallel_calls: int
) -> None:
    arrays = {f"{i:02d}.png": rgb(8, 8 + 4 * (i % 3)) for i in range(30)}
    for name, array in arrays.items():
        save(array, tmp_path / "in" / name)
    runner = ParallelRunner(parallel_calls, meet=parallel_calls, fail_width=16)
    summary = segment_inputs([str(tmp_path / "in")], tmp_path / "out", runner, batch_size=2)
    assert runner.peak == parallel_calls
    assert summary.processed == 20  # the 10 images of width 16 fail, in their own batches
    assert sorted(Path(f.path).name for f in summary.failed) == sorted(
        name for name, array in arrays.items() if array.shape[1] == 16
    )
    assert all("outside the engine's profile" in f.error for f in summary.failed)
    for name, array in arrays.items():
        if array.shape[1] != 16:
            mask = np.asarray(Image.open(tmp_path / "out" / name))
            np.testing.assert_array_equal(mask, expected_fake_mask(array))
    assert_no_partial_files(tmp_path / "out")
