"""`cosa benchmark` and the measuring code it shares with benchmarks/inference.py.

The export folders are `serving_fixtures.make_export` stand-ins (one-Conv graphs with the synthetic
benchmark's classes, each file its own weights; a positive weight scale leaves the argmax, so every
file of one folder gives the same masks); the torch row uses the tiny real model's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import TinyArtifacts, loading_shallow, make_export, tiny_artifacts
from typer.testing import CliRunner

from cli import app
from cosa.data import write_synthetic_dataset
from cosa.export.spec import read_spec, write_spec
from cosa.serving.benchmark import (
    BenchmarkOptions,
    LatencyStats,
    NetworkResult,
    _recommend,
    benchmark_artifacts,
    mask_agreement,
    time_calls,
)

FAST = ["--batch", "1,2", "--size", "8x8", "--repeats", "1", "--seconds", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, 1, 2, 0, seed=0)
    return root


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("int8") / "export", "int8", plan=False)


@pytest.fixture
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyArtifacts]:
    with loading_shallow():
        yield tiny_artifacts(request.config, tmp_path_factory)


def test_time_calls_takes_turns_and_counts() -> None:
    order: list[str] = []
    calls = {key: (lambda key=key: order.append(key)) for key in ("a", "b")}
    stats = time_calls(calls, batch=4, warmup=1, repeats=3)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then round robin
    for s in stats.values():
        assert s.calls == 3 and s.batch == 4
        assert s.images_per_s == pytest.approx(4 / (s.mean_ms / 1e3))
    timed = LatencyStats.from_seconds(2, [0.1, 0.2, 0.3, 0.4])
    assert (timed.mean_ms, timed.p50_ms, timed.images_per_s) == pytest.approx((250, 250, 8.0))
    assert timed.p95_ms == pytest.approx(385.0)  # numpy's linear interpolation


def test_mask_agreement_counts_pixels_over_all_masks() -> None:
    reference = [np.zeros((2, 2), np.int32), np.ones((1, 4), np.int32)]
    masks = [np.array([[0, 1], [0, 0]]), np.array([[1, 1, 0, 0]])]
    assert mask_agreement(masks, reference) == pytest.approx(5 / 8)


def row(
    name: str, miou: float | None, images_per_s: float, runtime: str = "onnxruntime"
) -> NetworkResult:
    result = NetworkResult(
        name=name,
        role="fp32" if name == "model.onnx" else "int8_cpu",
        precision="fp32",
        runtime=runtime,
        device="cpu",
        file=name,
        description="",
        miou=miou,
        chosen=True,
    )
    result.latency.append(LatencyStats(1, 1e3 / images_per_s, 0, 0, images_per_s, 3))
    return result


def test_recommendation_is_the_fastest_within_one_point() -> None:
    fp32 = row("model.onnx", 53.0, 10.0)
    rows = [fp32, row("a", 52.1, 30.0), row("b", 51.9, 50.0), row("c", 53.5, 20.0)]
    name, text = _recommend(rows, fp32, 1, scored=True)
    assert name == "a"  # b is faster but 1.1 points below FP32
    assert text.startswith("a (onnxruntime, cpu): 3.00x the images/s of model.onnx at batch 1")
    assert "--precision fp32" in text
    name, text = _recommend([fp32, row("b", 40.0, 50.0)], fp32, 1, scored=True)
    assert name == "model.onnx"  # FP32 itself always qualifies
    name, text = _recommend(rows, fp32, 1, scored=False)
    assert name is None and text.startswith("accuracy not measured (pass --data")
    assert "fastest at batch 1: b (onnxruntime)" in text
    failed = dataclasses.replace(fp32, error="onnxruntime cannot load it")
    name, text = _recommend([failed, row("b", 50.0, 50.0)], None, 1, scored=True)
    assert name is None and text.startswith("no FP32 graph was measured")


def test_command_table_json_and_markdown(int8_export: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    args = ["benchmark", str(int8_export), "--data", str(dataset), *FAST, "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for name in ("model.onnx", "model.ort.onnx", "model.int8.onnx", "model.int8_cpu.onnx"):
        assert name in res.stdout
    assert "skipped tensorrt: no model.plan in the folder" in res.stdout
    assert "skipped torch: spec.json names no source checkpoint" in res.stdout
    assert "skipped triton: no --url HOST:PORT" in res.stdout
    assert "recommendation: " in res.stdout and "within" not in res.stdout.split("recommen")[-1]
    page = out.read_text()
    assert page.startswith(f"# cosa benchmark {int8_export}")
    assert re.search(r"^\| model\.int8_cpu\.onnx( \*)? \| onnxruntime \| int8 \|", page, re.M)

    res = CliRunner().invoke(app, [*args[:-2], "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    rows = {r["name"]: r for r in report["networks"]}
    assert list(rows) == ["model.onnx", "model.ort.onnx", "model.int8.onnx", "model.int8_cpu.onnx"]
    fp32 = rows["model.onnx"]["miou"]
    for r in rows.values():  # positive weight scales: the same masks, the same score
        assert r["miou"] == pytest.approx(fp32) and r["agreement"] == 1.0 and r["error"] is None
        assert [s["batch"] for s in r["latency"]] == [1, 2] and r["latency"][0]["calls"] >= 1
    assert report["scored"] and report["agreement_on"] == "the scored split"
    assert report["recommended"] in rows
    assert [s["runtime"] for s in report["skipped"]] == ["tensorrt", "torch", "triton"]
    assert rows["model.int8_cpu.onnx"]["chosen"] and not rows["model.int8.onnx"]["chosen"]


def test_broken_network_is_reported_in_its_row(int8_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(int8_export, folder)
    (folder / "model.int8.onnx").write_bytes(b"not onnx")
    seen: list[str] = []
    report = benchmark_artifacts(
        folder,
        BenchmarkOptions(
            backends=("onnxruntime",), batches=(1,), size=(8, 8), repeats=1, min_seconds=0.0
        ),
        progress=lambda name, done, total: seen.append(name),
    )
    rows = {r.name: r for r in report.networks}
    assert rows["model.int8.onnx"].error is not None
    assert "onnxruntime cannot load" in rows["model.int8.onnx"].error
    assert all(r.error is None and r.latency for n, r in rows.items() if n != "model.int8.onnx")
    # The progress callback names every network while it loads, then the timing rounds.
    assert set(seen) == {*rows, "timing batch 1 (3 networks taking turns)"}
    # No --data: the agreement comes from nothing (no calib.npz in this folder), no mIoU.
    assert report.agreement_on.startswith("nothing") and rows["model.onnx"].miou is None


def test_checkpoint_row_and_calibration_images(tiny: TinyArtifacts, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(tiny.folder / "model.onnx", folder / "model.onnx")
    spec = read_spec(tiny.folder)
    write_spec(dataclasses.replace(spec, source_checkpoint=str(tiny.checkpoint)), folder)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 48), dtype=np.uint8)
    np.savez(folder / "calib.npz", images=images)
    report = benchmark_artifacts(
        folder,
        BenchmarkOptions(
            backends=("onnxruntime", "torch"),
            batches=(1,),
            size=(32, 32),
            repeats=1,
            min_seconds=0.0,
        ),
    )
    rows = {r.runtime: r for r in report.networks}
    assert set(rows) == {"onnxruntime", "torch"}
    assert rows["torch"].name == "checkpoint tiny.pt" and rows["torch"].error is None
    assert report.agreement_on == "3 calibration images (calib.npz)"
    assert rows["torch"].agreement is not None and rows["torch"].agreement > 0.99  # same weights
    assert rows["onnxruntime"].peak_memory_mib is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no-spec", "has no spec.json; pass a folder written by `cosa export`"),
        ("classes", "class"),
        ("url", "Triton at 127.0.0.1"),
        ("backend", "unknown backend 'tflite'; choose one of"),
        ("out-folder", "must be a markdown file path"),
        ("batch", "--batch needs sizes >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_report(
    int8_export: Path, dataset: Path, tmp_path: Path, change: str, message: str
) -> None:
    folder = tmp_path / "export"
    shutil.copytree(int8_export, folder)
    out = tmp_path / "report.md"
    args = ["benchmark", str(folder), *FAST, "--out", str(out)]
    if change == "no-spec":
        (folder / "spec.json").unlink()
    elif change == "classes":
        spec = read_spec(folder)
        names = ("background", *(f"thing{i}" for i in range(1, spec.num_classes)))
        write_spec(dataclasses.replace(spec, class_names=names), folder)
        args += ["--data", str(dataset)]
    elif change == "url":
        args += ["--url", f"127.0.0.1:{free_port()}"]
    elif change == "backend":
        args += ["--backends", "onnxruntime,tflite"]
    elif change == "out-folder":
        out.mkdir()
        args[-1] = str(out)
    elif change == "batch":
        args += ["--batch", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.is_file()
