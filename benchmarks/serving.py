"""Serving benchmark: the embedded Triton server against local onnxruntime, same ONNX, same images,
and `cosa segment` end to end against the model alone on the same runner.

    .venv/bin/python benchmarks/serving.py [--artifact DIR] [--images 48] [--height 192]
        [--width 256] [--concurrency 8] [--max-batch 8] [--segment-batch 4] [--rounds 3]
        [--segment-rounds 15] [--skip-cli] [--out benchmarks/results]

Without --artifact it exports the CPU demo network (EfficientNet-Lite0 + LargeFOV, 21 classes,
random weights: speed does not depend on them) with torch.onnx (dynamo). Needs `cosa triton setup`.

Rows (images/s of the median of --rounds interleaved rounds, after one warm-up round; latency
per request or frame over all rounds):
    local_ort_b1 / local_ort_b8   model only: `OnnxRuntimeRunner` in this process, one call at
                                  a time with every core (batch 1 / batch --max-batch)
    local_ort_b1_par              model only: batch-1 calls on the runner `cosa segment` opens
                                  (`default_parallel_calls()` concurrent calls, cores split)
    triton_seq_grpc / _http       sequential batch-1 requests (one at a time)
    triton_concurrent             batch-1 requests, --concurrency in flight, dynamic batching on
                                  the server (max batch --max-batch, --instances instances)
    triton_stream                 gRPC bidirectional stream of frames, 4 in flight
    triton_ensemble               JPEG bytes in, palette PNG bytes out (pre/post on the server)
    runner_ort_bB                 model only: the runner `cosa segment` opens (`open_runner`,
                                  backend onnxruntime, its parallel calls) on already decoded
                                  float32 batches of B (--segment-batch) images decoded from the
                                  JPEG folder below, calls kept running as the pipeline does
    segment_ort_bB                end to end in this process: `segment_inputs` on a folder of
                                  --images JPEGs of --height x --width, same runner, batch B,
                                  palette PNG masks written (decode, batching, encode included)
    runner_ort_bB_1call /         the same two with a runner of one call at a time over every
    segment_ort_bB_1call          core (what `cosa segment` ran before parallel calls)
    segment_cli_*                 `cosa segment` as a subprocess (interpreter start included) on
                                  50 and 500 JPEGs of the same size: throughput and peak RSS

Serving overhead = 1 - triton_concurrent / best local model-only throughput, any local row
(target <= 10%). On a CPU machine the server's onnxruntime, the client and the stubs share the
same cores, so batching cannot add compute; what this shows is the cost of the serving path. The
summary adds the CPU ms per image of the client, the server and its python-backend stubs.

End to end / model only = median over --segment-rounds paired rounds of segment_ort_bB / the
better of the two model-only rows of the same round (target >= 0.9). The summary adds
process CPU ms per image of both and a per-image breakdown (CPU and wall ms) of the pipeline's
stages run alone (decode, to_batch, model, png_write): on a machine whose cores the model already
fills, decode and encode cannot hide behind inference, so their share of the CPU work bounds the
ratio. The CLI rows check that
peak RSS stays flat from 50 to 500 images. Results go to OUT/serving.json and OUT/serving.md
(written atomically).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ModelSpec, ShapeProfile, write_spec
from cosa.files import write_text_atomic
from cosa.images import load_image
from cosa.serving.background import ordered_calls
from cosa.serving.masks import palette_lut, write_mask
from cosa.serving.runners import (
    OnnxRuntimeRunner,
    Runner,
    default_parallel_calls,
    images_to_batch,
    open_runner,
)
from cosa.serving.segment import segment_inputs
from cosa.serving.triton_client import TritonSegmentationClient
from cosa.serving.triton_repo import write_repository
from cosa.serving.triton_server import TritonServer

NUM_CLASSES = 21  # VOC: background + 20
SEGMENT_TARGET = 0.9  # end to end / model only, issue 5 item 7


def export_demo_artifact(folder: Path, height: int, width: int, max_batch: int) -> Path:
    """Exports the demo network (random weights) to folder/model.onnx + spec.json."""
    import torch

    from cosa.config import ModelConfig
    from cosa.model import DeployModel, build_model

    torch.manual_seed(0)
    config = ModelConfig(backbone="efficientnet_lite0", decoder_channels=128)
    model = DeployModel(build_model(config, NUM_CLASSES - 1, load_pretrained=False)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    dynamic = torch.export.Dim.DYNAMIC
    torch.onnx.export(
        model,
        (torch.rand(1, 3, height, width) * 255,),
        str(folder / "model.onnx"),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[LOGITS_NAME, MASK_NAME],
        dynamic_shapes={INPUT_NAME: {0: dynamic, 2: dynamic, 3: dynamic}},
        external_data=False,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    palette = tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(NUM_CLASSES))
    profile = ShapeProfile(min=(1, 32, 32), opt=(1, height, width), max=(max_batch, 1024, 1024))
    names = ("background",) + tuple(f"class_{i}" for i in range(1, NUM_CLASSES))
    write_spec(ModelSpec(class_names=names, palette=palette, profile=profile), folder)
    return folder


@dataclass
class Case:
    """One measured configuration: `run` processes `images` images once and may return
    per-request latencies (seconds)."""

    name: str
    images: int
    run: Callable[[], list[float] | None]
    note: str = ""


def run_rounds(cases: list[Case], rounds: int) -> dict[str, dict[str, Any]]:
    """Warms every case up once, then runs all cases `rounds` times, interleaved, so that the
    load of a shared machine shifts all of them alike (odd rounds in reverse order); reports
    the median round.

    Returns:
        Rows by case name: images/s of the median round, every round's images/s (in round
        order, for paired ratios), p50/p95 latency when the case returns latencies, and the
        median process CPU time per image.
    """
    for case in cases:
        case.run()
    seconds: dict[str, list[float]] = {case.name: [] for case in cases}
    cpu: dict[str, list[float]] = {case.name: [] for case in cases}
    latencies: dict[str, list[float]] = {case.name: [] for case in cases}
    for index in range(rounds):
        # Odd rounds run in reverse order: no case always follows the same one.
        for case in cases if index % 2 == 0 else cases[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            latencies[case.name] += case.run() or []
            seconds[case.name].append(time.perf_counter() - start)
            cpu[case.name].append(time.process_time() - cpu_start)
    rows = {}
    for case in cases:
        median = float(np.median(seconds[case.name]))
        row: dict[str, Any] = {
            "name": case.name,
            "images": case.images,
            "seconds": median,
            "images_per_s": case.images / median,
            "rounds_images_per_s": [case.images / t for t in seconds[case.name]],
            # CPU of this process only (all threads): for the Triton rows, the client's share.
            "process_cpu_ms_per_image": float(np.median(cpu[case.name])) * 1000.0 / case.images,
        }
        if latencies[case.name]:
            ms = np.asarray(latencies[case.name]) * 1000.0
            row["p50_ms"] = float(np.percentile(ms, 50))
            row["p95_ms"] = float(np.percentile(ms, 95))
        row["note"] = case.note
        rows[case.name] = row
        print(f"{case.name:>22}: {row['images_per_s']:7.1f} img/s  {case.note}", file=sys.stderr)
    return rows


def call_latencies(call: Callable[[Any], object], items: Iterable[Any]) -> list[float]:
    """Wall seconds of `call(item)` for each item, in order (one synchronous call at a time)."""
    latencies = []
    for item in items:
        start = time.perf_counter()
        call(item)
        latencies.append(time.perf_counter() - start)
    return latencies


def infer_all(runner: OnnxRuntimeRunner, batches: Iterable[np.ndarray]) -> None:
    """Every batch through `runner`, its `parallel_calls` kept running as the segment pipeline
    keeps them (one call at a time when it has one)."""
    calls = runner.parallel_calls
    for _ in ordered_calls(runner.infer, batches, calls, max_outstanding=calls + 1):
        pass


def local_cases(
    one_call: OnnxRuntimeRunner, parallel: OnnxRuntimeRunner, images: np.ndarray, batch: int
) -> list[Case]:
    """Model only on local onnxruntime: one call at a time (batch 1, `batch`) with latencies,
    and batch-1 calls kept running on `parallel` as `cosa segment` keeps them."""

    def run(size: int) -> list[float]:
        batches = (images[i : i + size] for i in range(0, len(images), size))
        return call_latencies(one_call.infer, batches)

    def run_parallel() -> None:
        infer_all(parallel, (images[i : i + 1] for i in range(len(images))))

    calls = parallel.parallel_calls
    return [
        Case("local_ort_b1", len(images), lambda: run(1), "model only, batch 1"),
        Case(f"local_ort_b{batch}", len(images), lambda: run(batch), f"model only, batch {batch}"),
        Case(
            "local_ort_b1_par",
            len(images),
            run_parallel,
            f"model only, batch 1, {calls} parallel calls",
        ),
    ]


def triton_cases(
    clients: dict[str, TritonSegmentationClient], images: np.ndarray, concurrency: int
) -> list[Case]:
    """Cases on the server; `clients` maps "grpc" and "http" to open clients."""
    singles = [images[i : i + 1] for i in range(len(images))]
    grpc = clients["grpc"]

    def sequential(client: TritonSegmentationClient) -> list[float]:
        return call_latencies(client.infer, singles)

    def concurrent() -> None:
        for _ in grpc.infer_many(iter(singles), max_in_flight=concurrency):
            pass

    def stream() -> list[float]:
        sent: list[float] = []

        def frames() -> Iterator[np.ndarray]:
            for single in singles:
                sent.append(time.perf_counter())
                yield single

        return [
            time.perf_counter() - sent[index] for index, _ in grpc.stream(frames(), max_in_flight=4)
        ]

    jpegs = [jpeg_bytes(image) for image in images]

    def ensemble() -> list[float]:
        return call_latencies(lambda data: grpc.infer_encoded([data]), jpegs)

    n = len(images)
    return [
        Case("triton_seq_grpc", n, lambda: sequential(grpc), "batch 1, one request at a time"),
        Case("triton_seq_http", n, lambda: sequential(clients["http"]), "batch 1, one at a time"),
        Case(
            "triton_concurrent",
            n,
            concurrent,
            f"gRPC batch 1, {concurrency} in flight, dynamic batching",
        ),
        Case("triton_stream", n, stream, "gRPC stream, 4 frames in flight"),
        Case("triton_ensemble", n, ensemble, "JPEG in, PNG out, one at a time"),
    ]


def group_cpu_seconds(group: int) -> dict[str, float]:
    """CPU seconds (user + system) of each live process in process group `group`, by
    "name:pid" (Linux /proc; the Triton server runs in its own group with its stubs)."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group:  # pgrp
            usage[f"{name}:{entry.name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return usage


def triton_cpu_breakdown(
    server: TritonServer, client: TritonSegmentationClient, images: np.ndarray, concurrency: int
) -> dict[str, float]:
    """CPU ms per image of the triton_concurrent path, split into client (this process), server
    (tritonserver) and stubs (python-backend processes running the models), over one pass."""
    singles = [images[i : i + 1] for i in range(len(images))]
    group = server.pid or 0
    before, cpu_start = group_cpu_seconds(group), time.process_time()
    for _ in client.infer_many(iter(singles), max_in_flight=concurrency):
        pass
    client_s, after = time.process_time() - cpu_start, group_cpu_seconds(group)
    split = {"client": client_s, "server": 0.0, "stubs": 0.0}
    for key, seconds in after.items():
        part = "server" if key.startswith("tritonserver") else "stubs"
        split[part] += seconds - before.get(key, 0.0)
    return {part: 1000.0 * seconds / len(images) for part, seconds in split.items()}


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_jpegs(folder: Path, count: int, height: int, width: int, seed: int) -> Path:
    """Writes `count` uniform-noise RGB JPEGs (quality 90) of height x width as
    folder/img_NNNN.jpg. Noise is the costly case for JPEG decoding (no flat blocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.jpg", quality=90)
    return folder


def decoded_batches(folder: Path, batch: int) -> list[np.ndarray]:
    """The folder's JPEGs decoded as `cosa segment` decodes them, in float32 (N, 3, H, W)
    batches of `batch` images (the last one may be smaller)."""
    images = [load_image(path) for path in sorted(folder.glob("*.jpg"))]
    return [images_to_batch(images[i : i + batch]) for i in range(0, len(images), batch)]


def segment_cases(
    runner: OnnxRuntimeRunner,
    folder: Path,
    out: Path,
    batch: int,
    suffix: str = "",
) -> list[Case]:
    """Model only and end to end on one runner, same images, same batch size; listed back to
    back so that each round measures them next to each other. Model only keeps the runner's
    `parallel_calls` running, as the pipeline does."""
    batches = decoded_batches(folder, batch)
    count = sum(len(b) for b in batches)
    calls = runner.parallel_calls

    def model_only() -> None:
        infer_all(runner, batches)

    def end_to_end() -> None:
        summary = segment_inputs([str(folder)], out, runner, batch_size=batch)
        if summary.processed != count or summary.failed:
            raise RuntimeError(f"segment_inputs processed {summary.processed} of {count} images")

    how = f"{calls} parallel calls" if calls > 1 else "one call at a time"
    return [
        Case(
            f"runner_ort_b{batch}{suffix}",
            count,
            model_only,
            f"model only: runner on decoded arrays, batch {batch}, {how}",
        ),
        Case(
            f"segment_ort_b{batch}{suffix}",
            count,
            end_to_end,
            f"segment_inputs in process: JPEG folder to PNG masks, same runner, batch {batch}",
        ),
    ]


def pipeline_breakdown(
    runner: Runner, folder: Path, out: Path, batch: int, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Per-image cost of each pipeline stage run alone on this thread, median of `repeats`
    passes over the folder: decode (`load_image`), to_batch (`images_to_batch`), model
    (`runner.infer` at `batch`), png_write (`write_mask`: PNG encode and atomic file write).

    Returns:
        {stage: {"wall_ms": ..., "cpu_ms": ...}} per image; cpu_ms is process CPU time, so the
        model's counts every onnxruntime thread.
    """
    paths = sorted(folder.glob("*.jpg"))
    lut = palette_lut(runner.spec.palette)
    out.mkdir(parents=True, exist_ok=True)
    stages = ("decode", "to_batch", "model", "png_write")
    wall: dict[str, list[float]] = {stage: [] for stage in stages}
    cpu: dict[str, list[float]] = {stage: [] for stage in stages}

    def clock(stage: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        wall[stage].append(now[0] - since[0])
        cpu[stage].append(now[1] - since[1])
        return now

    for _ in range(repeats):
        since = (time.perf_counter(), time.process_time())
        images = [load_image(path) for path in paths]  # (H, W, 3) uint8 each
        since = clock("decode", since)
        starts = range(0, len(paths), batch)
        # One batch alive at a time, as in the pipeline: keeping them all would time first-touch
        # page faults of fresh memory instead of the conversion.
        for i in starts:
            images_to_batch(images[i : i + batch])
        since = clock("to_batch", since)
        batches = [images_to_batch(images[i : i + batch]) for i in starts]
        since = (time.perf_counter(), time.process_time())
        masks = [mask for b in batches for mask in runner.infer(b)[MASK_NAME]]  # (H, W) each
        since = clock("model", since)
        for path, mask in zip(paths, masks, strict=True):
            write_mask(mask, out / f"{path.stem}.png", "png", lut)
        clock("png_write", since)
    scale = 1000.0 / len(paths)
    return {
        stage: {
            "wall_ms": float(np.median(wall[stage])) * scale,
            "cpu_ms": float(np.median(cpu[stage])) * scale,
        }
        for stage in stages
    }


def segment_summary(
    rows: dict[str, Any], batch: int, breakdown: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """End to end / model only from the paired rounds of `segment_cases`, against the target."""
    model = rows[f"runner_ort_b{batch}"]
    one_call = rows[f"runner_ort_b{batch}_1call"]
    e2e = rows[f"segment_ort_b{batch}"]
    best_model = np.maximum(model["rounds_images_per_s"], one_call["rounds_images_per_s"])
    paired = [e / m for e, m in zip(e2e["rounds_images_per_s"], best_model, strict=True)]
    ratio = float(np.median(paired))
    model_cpu = breakdown["model"]["cpu_ms"]
    others_cpu = sum(cost["cpu_ms"] for stage, cost in breakdown.items() if stage != "model")
    return {
        "batch": batch,
        "model_only_ips": max(model["images_per_s"], one_call["images_per_s"]),
        "end_to_end_ips": e2e["images_per_s"],
        "end_to_end_1call_ips": rows[f"segment_ort_b{batch}_1call"]["images_per_s"],
        "ratio": ratio,
        "ratio_quartiles": [float(q) for q in np.percentile(paired, [25, 75])],
        "rounds_ratio": paired,
        "target": SEGMENT_TARGET,
        "met": ratio >= SEGMENT_TARGET,
        "cpu_ratio": model["process_cpu_ms_per_image"] / e2e["process_cpu_ms_per_image"],
        "breakdown_ms_per_image": breakdown,
        # With every core busy (the model's threads, other jobs) nothing hides decode and
        # encode: end to end costs model + the rest in CPU time.
        "serial_bound": model_cpu / (model_cpu + others_cpu),
    }


# `cosa segment` in a child that writes its own peak RSS (VmHWM, kB) to $COSA_BENCH_PEAK_RSS at
# exit. Not wait4's ru_maxrss: Linux carries the high-water mark of the forked copy of this
# process (over 1 GB after the torch export) across execve, so every child would report ours.
CLI_WITH_PEAK_RSS = """
import atexit, os

def _report_peak_rss():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["COSA_BENCH_PEAK_RSS"], "w") as out:
        out.write(kb)

atexit.register(_report_peak_rss)
from cosa.app.cli import main
main()
"""


def segment_cli_rows(
    artifact: Path,
    work: Path,
    server: TritonServer,
    height: int,
    width: int,
    batch: int,
    counts: tuple[int, ...] = (50, 500),
) -> dict[str, Any]:
    """`cosa segment` as a subprocess on `counts` JPEGs of height x width: images/s including
    interpreter start, and the child's peak RSS (VmHWM; Linux only)."""
    cli = [sys.executable, "-c", CLI_WITH_PEAK_RSS]
    rows = {}
    for count in counts:
        folder = write_jpegs(work / f"images_{count}", count, height, width, seed=1)
        for backend, extra in (
            ("onnxruntime", []),
            ("triton", ["--url", server.grpc_url, "--protocol", "grpc"]),
        ):
            out = work / f"masks_{backend}_{count}"
            rss_file = work / f"peak_rss_{backend}_{count}"
            command = [*cli, "segment", str(folder), "--out", str(out), "--model", str(artifact)]
            command += ["--backend", backend, *extra, "--batch-size", str(batch), "--json"]
            start = time.perf_counter()
            completed = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "COSA_BENCH_PEAK_RSS": str(rss_file)},
            )
            seconds = time.perf_counter() - start
            name = f"segment_cli_{backend}_{count}"
            rows[name] = {
                "name": name,
                "images": count,
                "seconds": seconds,
                "images_per_s": count / seconds,
                "exit_code": completed.returncode,
                "note": f"`cosa segment` subprocess incl. interpreter start, batch {batch}",
                "summary": json.loads(completed.stdout or b"{}"),
            }
            if rss_file.is_file():
                rows[name]["peak_rss_mb"] = int(rss_file.read_text()) / 1024.0
            print(f"{name:>22}: {count / seconds:7.1f} img/s", file=sys.stderr)
    return rows


def memory_summary(rows: dict[str, Any], counts: tuple[int, int] = (50, 500)) -> dict[str, Any]:
    """Peak RSS of the CLI rows per backend, and its growth from counts[0] to counts[1] images."""
    summary: dict[str, Any] = {}
    for backend in ("onnxruntime", "triton"):
        small = rows.get(f"segment_cli_{backend}_{counts[0]}")
        large = rows.get(f"segment_cli_{backend}_{counts[1]}")
        if small and large and "peak_rss_mb" in small and "peak_rss_mb" in large:
            summary[backend] = {
                f"rss_mb_{counts[0]}": small["peak_rss_mb"],
                f"rss_mb_{counts[1]}": large["peak_rss_mb"],
                "growth": large["peak_rss_mb"] / small["peak_rss_mb"] - 1.0,
            }
    return summary


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, load average at start "
        f"{report['machine']['load_start']:.1f}, end {report['machine']['load_end']:.1f}; "
        f"model: {report['model']['name']}, images {report['model']['size']}; median of "
        f"{report['rounds']} interleaved rounds ({report['segment_rounds']} paired rounds for "
        "runner_ort / segment_ort).",
        "",
        "| run | images/s | p50 ms | p95 ms | peak RSS MB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else ""

    for row in report["rows"].values():
        note = row.get("note") or row.get("status", "")
        lines.append(
            f"| {row['name']} | {cell(row, 'images_per_s', '.1f')} | {cell(row, 'p50_ms', '.1f')} "
            f"| {cell(row, 'p95_ms', '.1f')} | {cell(row, 'peak_rss_mb', '.0f')} | {note} |"
        )
    summary = report["summary"]
    lines += [
        "",
        f"Serving overhead at concurrency {summary['concurrency']}: "
        f"{summary['serving_overhead'] * 100:.1f}% (target <= 10%): triton_concurrent "
        f"{summary['triton_concurrent_ips']:.1f} img/s ({summary['instances']} instance(s)) "
        f"against the best local {summary['local_best_ips']:.1f} img/s. CPU ms per image on the "
        "Triton path: "
        + ", ".join(f"{part} {ms:.2f}" for part, ms in summary["triton_cpu_ms_per_image"].items())
        + f" (total {sum(summary['triton_cpu_ms_per_image'].values()):.2f}), against "
        f"{summary['local_cpu_ms_per_image']:.2f} for local_ort_b1_par.",
        "",
    ]
    lines += segment_markdown(summary["segment_end_to_end"])
    for backend, memory in summary["segment_cli_memory"].items():
        small, large = (value for key, value in memory.items() if key.startswith("rss_mb_"))
        lines.append(
            f"`cosa segment` peak RSS, {backend}: {small:.0f} MB for 50 images, {large:.0f} MB "
            f"for 500 ({memory['growth'] * 100:+.1f}%)."
        )
    lines.append("")
    return "\n".join(lines)


def segment_markdown(seg: dict[str, Any]) -> list[str]:
    """The end-to-end paragraph of the markdown report."""
    stages = seg["breakdown_ms_per_image"]
    return [
        f"`cosa segment` end to end against model only (onnxruntime, batch {seg['batch']}, same "
        f"runner and images): {seg['ratio']:.2f} (target >= {seg['target']}, "
        f"{'met' if seg['met'] else 'NOT met'}); median of the paired per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in seg['rounds_ratio'])} (quartiles "
        f"{seg['ratio_quartiles'][0]:.2f}-{seg['ratio_quartiles'][1]:.2f}); "
        f"segment_ort_b{seg['batch']} {seg['end_to_end_ips']:.1f} img/s against the best model "
        f"only {seg['model_only_ips']:.1f} img/s (segment_ort_b{seg['batch']}_1call: "
        f"{seg['end_to_end_1call_ips']:.1f} img/s). Process CPU per image, model only / end to "
        f"end: {seg['cpu_ratio']:.2f}.",
        "",
        "Per-image cost of each stage run alone, CPU ms (wall ms): "
        + ", ".join(
            f"{stage} {cost['cpu_ms']:.2f} ({cost['wall_ms']:.2f})"
            for stage, cost in stages.items()
        )
        + ". With no spare core to hide decode and encode, the ratio would be model CPU / total "
        f"CPU = {seg['serial_bound']:.2f}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="export folder (model.onnx + spec.json)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="Triton model instances (onnxruntime threads per instance: CPUs / instances)",
    )
    parser.add_argument(
        "--segment-batch", type=int, default=4, help="batch of the segment rows (CLI default 4)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument(
        "--segment-rounds", type=int, default=15, help="paired rounds of the two segment rows"
    )
    parser.add_argument("--skip-cli", action="store_true", help="skip the `cosa segment` rows")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="cosa-serving-bench-"))
    try:
        artifact = args.artifact or export_demo_artifact(
            work / "artifact", args.height, args.width, args.max_batch
        )
        images = (
            np.random.default_rng(0)
            .uniform(0, 255, (args.images, 3, args.height, args.width))
            .astype(np.float32)
        )
        jpegs = write_jpegs(work / "jpegs", args.images, args.height, args.width, seed=2)
        # Each python-backend instance is a process with its own onnxruntime pool.
        threads_per_instance = max(1, (os.cpu_count() or 1) // args.instances)
        repo = write_repository(
            artifact,
            work / "repo",
            "python",
            max_batch=args.max_batch,
            preferred_batch=(args.max_batch // 2, args.max_batch) if args.max_batch > 1 else (),
            max_queue_delay_us=2000,
            instances=args.instances,
            ort_threads=threads_per_instance,
        )
        # What `cosa segment --backend onnxruntime` opens, and the one-call runner it opened before.
        runner = open_runner(artifact, "onnxruntime", parallel_calls=default_parallel_calls())
        one_call = open_runner(artifact, "onnxruntime")
        local = local_cases(one_call, runner, images, args.max_batch)
        with TritonServer(repo.root) as server:
            clients = {
                "grpc": TritonSegmentationClient(server.grpc_url, "grpc"),
                "http": TritonSegmentationClient(server.http_url, "http"),
            }
            try:
                segment = segment_cases(runner, jpegs, work / "masks", args.segment_batch)
                segment += segment_cases(
                    one_call, jpegs, work / "masks_1call", args.segment_batch, suffix="_1call"
                )
                rows = run_rounds(
                    local + triton_cases(clients, images, args.concurrency), args.rounds
                )
                triton_cpu = triton_cpu_breakdown(server, clients["grpc"], images, args.concurrency)
                rows.update(run_rounds(segment, args.segment_rounds))
                breakdown = pipeline_breakdown(one_call, jpegs, work / "stages", args.segment_batch)
            finally:
                for client in clients.values():
                    client.close()
                runner.close()
                one_call.close()
            if not args.skip_cli:
                rows.update(
                    segment_cli_rows(
                        artifact, work, server, args.height, args.width, args.segment_batch
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import onnxruntime

    local_best = max(
        rows[name]["images_per_s"]
        for name in ("local_ort_b1", f"local_ort_b{args.max_batch}", "local_ort_b1_par")
    )
    triton = rows["triton_concurrent"]["images_per_s"]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "triton": "2.51.0 (nvidia-pytriton 0.7.0), python backend + onnxruntime CPU",
        },
        "model": {
            "name": str(args.artifact) if args.artifact else "EfficientNet-Lite0 + LargeFOV",
            "size": f"{args.images} x {args.height}x{args.width}",
        },
        "rounds": args.rounds,
        "segment_rounds": args.segment_rounds,
        "rows": rows,
        "summary": {
            "concurrency": args.concurrency,
            "local_best_ips": local_best,
            "triton_concurrent_ips": triton,
            "serving_overhead": 1.0 - triton / local_best,
            "instances": args.instances,
            "triton_cpu_ms_per_image": triton_cpu,
            "local_cpu_ms_per_image": rows["local_ort_b1_par"]["process_cpu_ms_per_image"],
            "segment_end_to_end": segment_summary(rows, args.segment_batch, breakdown),
            "segment_cli_memory": memory_summary(rows),
        },
    }
    write_text_atomic(args.out / "serving.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / "serving.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
