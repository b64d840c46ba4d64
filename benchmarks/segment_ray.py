"""`cosa segment` images/s with the local engine against `--engine ray` (1 and 2 workers), and
Ray's fixed start-up cost, so that one can tell from what job size Ray pays off.

    .venv/bin/python benchmarks/segment_ray.py [--small 100] [--large 500] [--rounds 3]
        [--batch 4] [--netns auto|none|NAME] [--name segment_ray] [--out benchmarks/results]

Every run is the real command line, `cosa segment FOLDER --out OUT --model ARTIFACT --json`, as a
child process, with the exported demo network (EfficientNet-Lite0 + decoder, random weights,
onnxruntime on the CPU) on noise JPEGs of 192x256:

    local    the default engine (one process, two single-thread onnxruntime calls at once)
    ray_1    --engine ray --ray-workers 1 (a local Ray, started and stopped by the command)
    ray_2    --engine ray --ray-workers 2

Each engine runs on a folder of --small and one of --large images, and ray_2 on a single image
(Ray's start-up cost as such). Per engine, the two sizes give a line: time = fixed + images / rate,
so rate (images/s once running) and fixed cost (start-up, model load, shut-down) are separated
without timing anything inside the command; the break-even size is where Ray's line crosses the
local engine's. Times are each run's `seconds` from its --json summary (discovery to the last mask;
Ray's start and stop included), "wall" adds Python start-up and imports. Runs alternate within each
of --rounds rounds so that load shifts all alike; medians are reported. Ray runs inside a
loopback-only network namespace (`ip netns`, root; --netns auto creates a temporary one, none runs
Ray on the machine's address). Results: OUT/NAME.json and OUT/NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serving import export_demo_artifact, write_atomic, write_jpegs  # noqa: E402

HEIGHT, WIDTH = 192, 256
ENGINES = {
    "local": [],
    "ray_1": ["--engine", "ray", "--ray-workers", "1"],
    "ray_2": ["--engine", "ray", "--ray-workers", "2"],
}
LABELS = {"local": "local", "ray_1": "ray, 1 worker", "ray_2": "ray, 2 workers"}


def run_case(
    prefix: list[str], folder: Path, artifact: Path, out: Path, batch: int, extra: list[str]
) -> tuple[float, float, int]:
    """(wall s, in-command s, images processed) of one `cosa segment` child."""
    shutil.rmtree(out, ignore_errors=True)
    command = [*prefix, sys.executable, "-m", "cosa.app.cli", "segment", str(folder)]
    command += ["--out", str(out), "--model", str(artifact), "--batch-size", str(batch)]
    command += ["--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    return wall, float(summary["seconds"]), int(summary["processed"])


def make_netns(choice: str) -> tuple[list[str], str | None]:
    """Command prefix for the children, and a namespace to delete afterwards."""
    if choice == "none":
        return [], None
    if choice != "auto":
        return ["ip", "netns", "exec", choice], None
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("--netns auto needs root and `ip`; pass --netns none to run without")
    name = f"cosa-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    return ["ip", "netns", "exec", name], name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100, help="images of the small folder")
    parser.add_argument("--large", type=int, default=500, help="images of the large folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--netns", default="auto", help="auto, none, or an existing namespace")
    parser.add_argument("--name", default="segment_ray", help="output file stem")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not 1 <= args.small < args.large:
        raise SystemExit("need 1 <= --small < --large")

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="cosa-segment-ray-"))
    prefix, made = make_netns(args.netns)
    cases = [(name, size) for name in ENGINES for size in (args.small, args.large)]
    cases.append(("ray_2", 1))
    walls: dict[str, list[float]] = {f"{n}@{s}": [] for n, s in cases}
    inside: dict[str, list[float]] = {f"{n}@{s}": [] for n, s in cases}
    try:
        artifact = export_demo_artifact(work / "artifact", HEIGHT, WIDTH, max_batch=8)
        folders = {
            size: write_jpegs(work / f"jpegs_{size}", size, HEIGHT, WIDTH, seed=3)
            for size in (1, args.small, args.large)
        }
        for round_ in range(args.rounds):
            for name, size in cases:
                key = f"{name}@{size}"
                wall, seconds, processed = run_case(
                    prefix, folders[size], artifact, work / "out", args.batch, ENGINES[name]
                )
                if processed != size:
                    raise SystemExit(f"{key}: {processed} of {size} images segmented")
                walls[key].append(wall)
                inside[key].append(seconds)
                print(
                    f"round {round_ + 1} {key:>10}: wall {wall:6.1f} s, "
                    f"in command {seconds:6.1f} s",
                    file=sys.stderr,
                )
    finally:
        if made is not None:
            subprocess.run(["ip", "netns", "delete", made], check=False)
        shutil.rmtree(work, ignore_errors=True)

    wall = {key: float(np.median(v)) for key, v in walls.items()}
    cmd = {key: float(np.median(v)) for key, v in inside.items()}
    small, large = args.small, args.large
    rate, fixed = {}, {}
    for name in ENGINES:
        t_small, t_large = cmd[f"{name}@{small}"], cmd[f"{name}@{large}"]
        rate[name] = (large - small) / (t_large - t_small) if t_large > t_small else None
        fixed[name] = t_small - small / rate[name] if rate[name] else None
    break_even: dict[str, float | None] = {}
    for name in ("ray_1", "ray_2"):
        r, f = rate[name], fixed[name]
        gain = 1 / rate["local"] - 1 / r if r and rate["local"] else 0.0
        break_even[name] = (f - fixed["local"]) / gain if gain > 0 and f is not None else None
    report = {
        "sizes": [1, small, large],
        "image_size": [HEIGHT, WIDTH],
        "batch": args.batch,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "netns": args.netns,
        # Other work on the machine takes CPU from both engines, not necessarily alike.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "wall_s": walls,
        "in_command_s": inside,
        "median_wall_s": wall,
        "median_in_command_s": cmd,
        "images_per_s_once_running": rate,
        "fixed_cost_s": fixed,
        "ray_start_one_image_s": cmd["ray_2@1"],
        "ray_break_even_images": break_even,
    }

    def num(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "# `cosa segment`: local engine against `--engine ray`",
        "",
        f"Noise JPEGs of {HEIGHT}x{WIDTH}, demo network (EfficientNet-Lite0, onnxruntime, CPU), "
        f"batch {args.batch}, {os.cpu_count()} CPUs, Ray in a loopback-only network namespace; "
        f"medians of {args.rounds} interleaved rounds of whole command lines "
        "(`benchmarks/segment_ray.py`). Seconds are the command's own (`--json`), Ray's start "
        f"and stop included. Load average (1 min) {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} = every core busy).",
        "",
        f"| engine | {small} images s | {large} images s | images/s at {large} | images/s once "
        "running | fixed cost s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ENGINES:
        t_large = cmd[f"{name}@{large}"]
        lines.append(
            f"| {LABELS[name]} | {cmd[f'{name}@{small}']:.1f} | {t_large:.1f} | "
            f"{large / t_large:.1f} | {num(rate[name])} | {num(fixed[name])} |"
        )
    lines += [
        "",
        f"Ray's start-up cost as such (2 workers, one image): {cmd['ray_2@1']:.1f} s in the "
        f'command, {wall["ray_2@1"]:.1f} s wall. "Once running" and "fixed cost" are the '
        f"line through the {small}- and {large}-image runs.",
        "",
    ]
    for name in ("ray_1", "ray_2"):
        images = break_even[name]
        lines.append(
            f"- {LABELS[name]}: "
            + (
                f"faster than the local engine from about {images:.0f} images on this machine"
                if images is not None
                else "not faster than the local engine at any size on this machine"
            )
        )
    lines.append("")
    write_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
