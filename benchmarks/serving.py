"""Serving benchmark: the embedded Triton server against local onnxruntime, same ONNX, same images.

    .venv/bin/python benchmarks/serving.py [--artifact DIR] [--images 48] [--height 192]
        [--width 256] [--concurrency 8] [--max-batch 8] [--rounds 3] [--skip-cli]
        [--out benchmarks/results]

Without --artifact it exports the CPU demo network (EfficientNet-Lite0 + LargeFOV, 21 classes,
random weights: speed does not depend on them) with torch.onnx (dynamo). Needs `cosa triton setup`.

Rows (images/s of the median of --rounds interleaved rounds, after one warm-up round; latency
per request or frame over all rounds):
    local_ort_b1 / local_ort_b8   model only: onnxruntime in this process, batch 1 / batch 8
    triton_seq_grpc / _http       sequential batch-1 requests (one at a time)
    triton_concurrent             batch-1 requests, --concurrency in flight, dynamic batching on
                                  the server (max batch --max-batch)
    triton_stream                 gRPC bidirectional stream of frames, 4 in flight
    triton_ensemble               JPEG bytes in, palette PNG bytes out (pre/post on the server)
    segment_cli_*                 `cosa segment` end to end and its peak RSS for 50 and 500 images

Serving overhead = 1 - triton_concurrent / best local throughput (target <= 10%). On a CPU machine
the server's onnxruntime, the client and the stubs share the same cores, so batching cannot add
compute; what this shows is the cost of the serving path. Results go to OUT/serving.json and
OUT/serving.md (written atomically).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ModelSpec, ShapeProfile, write_spec
from cosa.serving.triton_client import TritonSegmentationClient
from cosa.serving.triton_repo import write_repository
from cosa.serving.triton_server import TritonServer

NUM_CLASSES = 21  # VOC: background + 20


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
    load of a shared machine shifts all of them alike; reports the median round."""
    for case in cases:
        case.run()
    seconds: dict[str, list[float]] = {case.name: [] for case in cases}
    latencies: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            latencies[case.name] += case.run() or []
            seconds[case.name].append(time.perf_counter() - start)
    rows = {}
    for case in cases:
        median = float(np.median(seconds[case.name]))
        row: dict[str, Any] = {
            "name": case.name,
            "images": case.images,
            "seconds": median,
            "images_per_s": case.images / median,
            "rounds_images_per_s": [case.images / t for t in seconds[case.name]],
        }
        if latencies[case.name]:
            ms = np.asarray(latencies[case.name]) * 1000.0
            row["p50_ms"] = float(np.percentile(ms, 50))
            row["p95_ms"] = float(np.percentile(ms, 95))
        row["note"] = case.note
        rows[case.name] = row
        print(f"{case.name:>22}: {row['images_per_s']:7.1f} img/s  {case.note}", file=sys.stderr)
    return rows


def local_cases(model: Path, images: np.ndarray, batch: int) -> list[Case]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def run(size: int) -> list[float]:
        latencies = []
        for i in range(0, len(images), size):
            start = time.perf_counter()
            session.run([MASK_NAME], {INPUT_NAME: images[i : i + size]})
            latencies.append(time.perf_counter() - start)
        return latencies

    return [
        Case("local_ort_b1", len(images), lambda: run(1), "model only, batch 1"),
        Case(f"local_ort_b{batch}", len(images), lambda: run(batch), f"model only, batch {batch}"),
    ]


def triton_cases(
    clients: dict[str, TritonSegmentationClient], images: np.ndarray, concurrency: int
) -> list[Case]:
    """Cases on the server; `clients` maps "grpc" and "http" to open clients."""
    singles = [images[i : i + 1] for i in range(len(images))]
    grpc = clients["grpc"]

    def sequential(client: TritonSegmentationClient) -> list[float]:
        latencies = []
        for single in singles:
            start = time.perf_counter()
            client.infer(single)
            latencies.append(time.perf_counter() - start)
        return latencies

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
        latencies = []
        for data in jpegs:
            start = time.perf_counter()
            grpc.infer_encoded([data])
            latencies.append(time.perf_counter() - start)
        return latencies

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


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def segment_cli_rows(
    artifact: Path, work: Path, server: TritonServer, counts: tuple[int, ...] = (50, 500)
) -> dict[str, Any]:
    """`cosa segment` end to end and its peak RSS; a TODO row while the command is missing."""
    cli = [sys.executable, "-c", "from cosa.app.cli import main; main()"]
    probe = subprocess.run([*cli, "segment", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        # TODO(serving benchmark): runs once `cosa segment` is wired in cli.py (issue 5, item 4).
        return {"segment_cli": {"name": "segment_cli", "status": "not run: `cosa segment` is "
                                "not in cli.py yet"}}  # fmt: skip
    rows = {}
    rng = np.random.default_rng(1)
    for count in counts:
        folder = work / f"images_{count}"
        folder.mkdir(exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:04d}.jpg", quality=90)
        for backend, extra in (
            ("onnxruntime", []),
            ("triton", ["--url", server.grpc_url, "--protocol", "grpc"]),
        ):
            out = work / f"masks_{backend}_{count}"
            command = [*cli, "segment", str(folder), "--out", str(out), "--model", str(artifact)]
            command += ["--backend", backend, *extra, "--json"]
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert process.stdout is not None
            output = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
            seconds = time.perf_counter() - start
            name = f"segment_cli_{backend}_{count}"
            rows[name] = {
                "name": name,
                "images": count,
                "seconds": seconds,
                "images_per_s": count / seconds,
                "peak_rss_mb": usage.ru_maxrss / 1024.0,
                "exit_code": os.waitstatus_to_exitcode(status),
                "note": "end to end incl. interpreter start",
                "summary": json.loads(output or b"{}"),
            }
            print(f"{name:>22}: {count / seconds:7.1f} img/s", file=sys.stderr)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, load average at start "
        f"{report['machine']['load_start']:.1f}, end {report['machine']['load_end']:.1f}; "
        f"model: {report['model']['name']}, images {report['model']['size']}; median of "
        f"{report['rounds']} interleaved rounds.",
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
        f"{summary['triton_concurrent_ips']:.1f} img/s against the best local "
        f"{summary['local_best_ips']:.1f} img/s.",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="export folder (model.onnx + spec.json)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
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
        repo = write_repository(
            artifact,
            work / "repo",
            "python",
            max_batch=args.max_batch,
            preferred_batch=(args.max_batch // 2, args.max_batch) if args.max_batch > 1 else (),
            max_queue_delay_us=2000,
        )
        local = local_cases(artifact / "model.onnx", images, args.max_batch)
        with TritonServer(repo.root) as server:
            clients = {
                "grpc": TritonSegmentationClient(server.grpc_url, "grpc"),
                "http": TritonSegmentationClient(server.http_url, "http"),
            }
            try:
                cases = local + triton_cases(clients, images, args.concurrency)
                rows = run_rounds(cases, args.rounds)
            finally:
                for client in clients.values():
                    client.close()
            if not args.skip_cli:
                rows.update(segment_cli_rows(artifact, work, server))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import onnxruntime

    local_best = max(
        rows["local_ort_b1"]["images_per_s"], rows[f"local_ort_b{args.max_batch}"]["images_per_s"]
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
        "rows": rows,
        "summary": {
            "concurrency": args.concurrency,
            "local_best_ips": local_best,
            "triton_concurrent_ips": triton,
            "serving_overhead": 1.0 - triton / local_best,
        },
    }
    write_atomic(args.out / "serving.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "serving.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
