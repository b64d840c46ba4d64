"""`cosa stream` on a local onnxruntime backend: one frame at a time against parallel calls.

    .venv/bin/python benchmarks/stream_local.py [--frames 96] [--height 192] [--width 256]
        [--rounds 7] [--calls 2] [--out benchmarks/results]

Both sides run `run_stream` (what `cosa stream` runs) on the same image sequence of --frames
noise JPEGs into a Motion-JPEG .avi, with the exported demo network (random weights: speed does
not depend on them) and 4 frames in flight (the default of `cosa stream --max-in-flight`):
    one_call   `OnnxRuntimeRunner()`: one call at a time, onnxruntime's threads over every core
               (what `cosa stream` runs for a camera)
    parallel   `OnnxRuntimeRunner(parallel_calls=--calls)`: that many frames at once, the cores
               split between them (what `cosa stream` runs for files and image sequences)
Rounds alternate the two (odd rounds in reverse order) after one warm-up round each, so that
the machine's load shifts both alike. Reported: FPS of the median round, the median of the paired
per-round FPS ratios parallel / one_call, and latency p50 / p95 (handing a frame to the backend
to having its mask, medians over rounds). Results go to OUT/stream_local.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cosa.files import write_text_atomic  # noqa: E402
from cosa.serving.runners import OnnxRuntimeRunner  # noqa: E402
from cosa.serving.stream import StreamSummary, run_stream  # noqa: E402
from serving import export_demo_artifact, write_jpegs  # noqa: E402


def one_round(runner: OnnxRuntimeRunner, frames: Path, out: Path) -> StreamSummary:
    """One `run_stream` over the whole sequence; the video is overwritten each round."""
    return run_stream(str(frames), out, runner, max_in_flight=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cosa-stream-bench-") as tmp:
        work = Path(tmp)
        artifact = export_demo_artifact(work / "export", args.height, args.width, max_batch=8)
        frames = write_jpegs(work / "frames", args.frames, args.height, args.width, seed=0)
        runners = {
            "one_call": OnnxRuntimeRunner(artifact),
            "parallel": OnnxRuntimeRunner(artifact, parallel_calls=args.calls),
        }
        try:
            for name, runner in runners.items():  # warm-up
                one_round(runner, frames, work / f"{name}.avi")
            summaries: dict[str, list[StreamSummary]] = {name: [] for name in runners}
            for index in range(args.rounds):
                order = list(runners) if index % 2 == 0 else list(runners)[::-1]
                for name in order:
                    summary = one_round(runners[name], frames, work / f"{name}.avi")
                    assert summary.frames == args.frames, summary
                    summaries[name].append(summary)
        finally:
            for runner in runners.values():
                runner.close()

    rows = {
        name: {
            "fps": float(np.median([s.fps for s in runs])),
            "rounds_fps": [s.fps for s in runs],
            "latency_p50_ms": float(np.median([s.latency_p50_ms for s in runs])),
            "latency_p95_ms": float(np.median([s.latency_p95_ms for s in runs])),
        }
        for name, runs in summaries.items()
    }
    ratios = [
        p / o
        for p, o in zip(rows["parallel"]["rounds_fps"], rows["one_call"]["rounds_fps"], strict=True)
    ]
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_end": os.getloadavg()[0],
        },
        "frames": args.frames,
        "size": [args.height, args.width],
        "rounds": args.rounds,
        "calls": args.calls,
        "rows": rows,
        "fps_ratio_parallel_over_one_call": float(np.median(ratios)),
        "paired_ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "stream_local.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / "stream_local.md", markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table with a one-line summary."""
    height, width = report["size"]
    lines = [
        "# `cosa stream`, local onnxruntime: one frame at a time against parallel calls",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, load average at the end "
        f"{report['machine']['load_average_end']:.1f}; {report['frames']} frames of "
        f"{width}x{height} (JPEG sequence to Motion-JPEG .avi), 4 frames in flight, demo network; "
        f"median of {report['rounds']} interleaved rounds.",
        "",
        "| runner | FPS | latency p50 ms | latency p95 ms |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "one_call": "one call at a time (cameras)",
        "parallel": f"{report['calls']} parallel calls (files, sequences)",
    }
    for name, row in report["rows"].items():
        lines.append(
            f"| {labels[name]} | {row['fps']:.1f} | {row['latency_p50_ms']:.1f} | "
            f"{row['latency_p95_ms']:.1f} |"
        )
    ratios = ", ".join(f"{r:.3f}" for r in report["paired_ratios"])
    lines += [
        "",
        f"FPS parallel / one call: {report['fps_ratio_parallel_over_one_call']:.3f} (median of "
        f"the paired per-round ratios {ratios}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
