"""A user's whole journey through the real CLI, on the tiny configuration, in order: synthetic data,
train, resume to a longer run, eval (table and JSON, checkpoint and export folder), export (FP32 and
INT8, nothing stubbed), a Triton repository, segment with a corrupt file among good ones, segment
through a real Triton server, stream a short clip, and the demo. Each step uses what the previous
ones wrote, as a user's shell session would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from train_fixtures import TINY
from typer.testing import CliRunner

from cli import app
from cosa.files import stale_temporaries

pytestmark = pytest.mark.slow

TINY_SET = [f"{key}={json.dumps(value)}" for key, value in TINY.items()]
SYNTH = {"train": 10, "val": 4, "test": 4}


def run_cosa(*args: Any, code: int = 0) -> Result:
    """Run `cosa ARGS` in-process and assert its exit code."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output, result.exception)
    return result


def cosa(*args: Any, code: int = 0) -> str:
    """What `cosa ARGS` shows the user (stdout and stderr interleaved)."""
    return run_cosa(*args, code=code).output


def cosa_json(*args: Any, code: int = 0) -> Any:
    """The one JSON object `cosa ARGS --json` prints on stdout (progress goes to stderr)."""
    return json.loads(run_cosa(*args, "--json", code=code).stdout)


def set_options(pairs: list[str]) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("journey")


@pytest.fixture(scope="module")
def data(work: Path) -> Path:
    root = work / "data"
    cosa("data", "synth", root, *(f"--{k}={v}" for k, v in SYNTH.items()))
    return root


@pytest.fixture(scope="module")
def trained(work: Path, data: Path) -> dict[str, Any]:
    """`cosa train` for 3 iterations, then `--resume` to 5: the result of the second call."""
    run = work / "run"
    options = ["--data", data, "--out", run, "--device", "cpu", *set_options(TINY_SET)]
    first = cosa_json("train", *options, "--max-iters", "3")
    assert first["iterations"] == 3 and Path(first["last_checkpoint"]).is_file()
    cosa("train", *options, "--max-iters", "3", code=2)  # an existing run is never overwritten
    return cosa_json("train", "--out", run, "--resume", "--max-iters", "5", "--device", "cpu")


@pytest.fixture(scope="module")
def exported(work: Path, trained: dict[str, Any], data: Path) -> dict[str, Any]:
    """`cosa export` of the best checkpoint: FP32 as a user first runs it (default options), and
    INT8 calibrated on the training images with a profile of the 64-pixel crops it was trained on
    (calibration runs at the profile's opt size: 64 x 64 instead of the default 448 x 448)."""
    checkpoint = trained["best_checkpoint"]
    fp32 = cosa_json("export", checkpoint, "--out", work / "export")
    int8 = cosa_json(
        "export",
        checkpoint,
        "--out",
        work / "export_int8",
        "--precision",
        "int8",
        "--calib",
        data / "JPEGImages",
        "--calib-size",
        "8",
        "--min-shape",
        "1x32x32",
        "--opt-shape",
        "1x64x64",
        "--max-shape",
        "2x128x128",
    )
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def inputs(work: Path, data: Path) -> Path:
    """Three test images and a corrupt file among them."""
    folder = work / "inputs"
    folder.mkdir()
    names = (data / "ImageSets" / "Segmentation" / "test.txt").read_text().split()[:3]
    for name in names:
        (folder / f"{name}.jpg").write_bytes((data / "JPEGImages" / f"{name}.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return folder


def test_resume_continues_to_the_longer_run(trained: dict[str, Any], work: Path) -> None:
    assert trained["iterations"] == 5
    steps = [
        json.loads(line)["iter"]
        for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]
    assert steps == [1, 2, 3, 4, 5]  # every step logged once: none repeated, none lost
    assert trained["test"]["split"] == "test" and 0.0 <= trained["test"]["miou"] <= 1.0


def test_eval_checkpoint_table_and_json_agree(trained: dict[str, Any], data: Path) -> None:
    checkpoint = trained["best_checkpoint"]
    report = cosa_json("eval", checkpoint, "--data", data, "--split", "test", "--no-cam")
    assert report["num_images"] == SYNTH["test"]
    assert report["miou"] == pytest.approx(trained["test"]["miou"], abs=1e-6)
    table = cosa("eval", checkpoint, "--data", data, "--split", "test", "--no-cam")
    assert f"{100 * report['miou']:.1f}" in table


def test_export_writes_verified_fp32_and_int8(exported: dict[str, Any], work: Path) -> None:
    import onnxruntime as ort

    assert (work / "export" / "model.onnx").is_file() and (work / "export" / "spec.json").is_file()
    for result in exported.values():
        out = Path(result["out"])
        assert stale_temporaries(out) == [] and stale_temporaries(out.parent) == []
    # The INT8 model's masks, counted here against its own folder's FP32 model on the
    # calibration images it archived.
    folder = work / "export_int8"
    with np.load(folder / "calib.npz") as archive:
        images = archive["images"].astype(np.float32)
    masks = {
        name: ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"]).run(
            ["mask"], {"images": images}
        )[0]
        for name in ("model.onnx", "model.int8.onnx")
    }
    assert images.shape[2:] == (64, 64)  # calibrated at the profile's opt size
    # The exporter's bar, share of pixels >= 0.9, over the 8 images (this barely trained model's
    # worst image agreed on 0.896).
    assert (masks["model.int8.onnx"] == masks["model.onnx"]).mean() >= 0.9


def test_eval_of_the_export_matches_the_checkpoint(
    exported: dict[str, Any], trained: dict[str, Any], data: Path, work: Path
) -> None:
    checkpoint = cosa_json(
        "eval", trained["best_checkpoint"], "--data", data, "--split", "test", "--no-cam"
    )
    onnx = cosa_json("eval", work / "export", "--data", data, "--split", "test")
    assert onnx["miou"] == pytest.approx(checkpoint["miou"], abs=0.01)


def test_segment_reports_the_corrupt_file_and_writes_the_rest(
    exported: dict[str, Any], inputs: Path, work: Path
) -> None:
    out = work / "masks"
    summary = cosa_json("segment", inputs, "--out", out, "--model", work / "export", code=1)
    assert summary["processed"] == 3
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.jpg"]
    good = sorted(p.stem for p in inputs.glob("*.jpg") if p.name != "broken.jpg")
    assert sorted(p.stem for p in out.rglob("*.png")) == good
    for mask in out.rglob("*.png"):
        assert Image.open(mask).mode == "P"
    assert not (out / "broken.png").exists()


@pytest.mark.triton
def test_segment_through_a_real_triton_server_gives_the_local_masks(
    triton_installed: None, exported: dict[str, Any], inputs: Path, work: Path
) -> None:
    from cosa.serving.triton_server import TritonServer

    repo = work / "repo"
    cosa("triton", "repo", work / "export", "--out", repo, "--platform", "python")
    assert (repo / "cosa_seg" / "config.pbtxt").is_file()
    good = [str(p) for p in sorted(inputs.glob("*.jpg")) if p.name != "broken.jpg"]
    local = work / "masks_local"
    cosa("segment", *good, "--out", local, "--model", work / "export")
    served = work / "masks_triton"
    with TritonServer(repo, startup_timeout_s=120) as server:
        summary = cosa_json(
            "segment", *good, "--out", served, "--backend", "triton", "--url", server.grpc_url
        )
    assert summary["processed"] == 3 and summary["failed"] == []
    for mask in local.rglob("*.png"):
        twin = served / mask.relative_to(local)
        np.testing.assert_array_equal(np.asarray(Image.open(twin)), np.asarray(Image.open(mask)))


def test_stream_a_short_clip(exported: dict[str, Any], data: Path, work: Path) -> None:
    clip = work / "clip.avi"
    frame = cv2.imread(str(next((data / "JPEGImages").glob("*.jpg"))))
    h, w = frame.shape[:2]
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for shift in range(6):
        writer.write(np.roll(frame, 4 * shift, axis=1))
    writer.release()
    out = work / "clip_masks.avi"
    masks = work / "clip_masks"
    report = cosa_json("stream", clip, "--out", out, "--model", work / "export", "--masks", masks)
    assert report["frames"] == 6
    assert len(list(masks.glob("*.png"))) == 6
    video = cv2.VideoCapture(str(out))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    video.release()


def test_demo_on_the_tiny_configuration(work: Path) -> None:
    out = work / "demo"
    # The fewest images the demo runs on: one batch of 2, and the 2 test images it segments
    # (the run's test report scores them all at full size).
    sizes = {"train": 2, "val": 2, "test": 2}
    synth = [f"data.synth_{k}={v}" for k, v in sizes.items()]
    output = cosa(
        "demo",
        "--out",
        out,
        "--max-iters",
        "2",
        "--images",
        "2",
        "--device",
        "cpu",
        *set_options(TINY_SET + synth),
    )
    assert "segmented: 2 images" in output
    assert (out / "export" / "model.onnx").is_file()
    assert len(list((out / "masks").rglob("*.png"))) >= 2
