"""`cosa segment` throughput of this working tree against another git revision, side by side.

    .venv/bin/python benchmarks/segment_ab.py --baseline REV [--baseline-set K=V ...]
        [--current-set K=V ...] [--baseline-env NAME=VALUE ...] [--current-env ...]
        [--images 96] [--pairs 5] [--passes 3] [--batch 4] [--name segment_ab]
        [--out benchmarks/results]

--baseline is a git revision, or "current" for this working tree on both sides (to compare
settings). --baseline-set / --current-set change one side's settings from its `cosa segment`
defaults: workers=N (decode and encode threads), parallel_calls=N (onnxruntime runner; revisions
without parallel calls ignore it). --baseline-env / --current-env set environment variables of one
side's children: `--baseline current --baseline-env COSA_MALLOC=system` measures the allocator
setting every `cosa` command makes (cosa/allocator.py), which the children make too.

Both sides segment the same folder of --images noise JPEGs (192x256, the costly case for
decoding) with the same exported demo network (random weights), in process (`segment_inputs`,
palette PNG masks), opening the runner as that revision's `cosa segment` does. Each child process
loads one side, warms up with one pass and times --passes passes; children alternate (baseline,
current, baseline, ...) --pairs times so that the machine's load shifts both alike. Reported:
images/s per child (median of its passes), the median of the per-pair ratios current /
baseline, and system CPU time and minor page faults per image. A baseline revision is checked
out with `git worktree` into a temporary folder and removed afterwards.
Results go to OUT/NAME.json and OUT/NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cosa.files import write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
from serving import export_demo_artifact, write_jpegs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("workers", "parallel_calls")

# Runs in a child on one revision's tree (argv[1]). The tree maps `cosa.serving` to serving/ and
# `cosa.export` to export/ (pyproject's package-dir): putting the tree root on `cosa.__path__`
# resolves them there before the editable install's finder can resolve them to this checkout.
CHILD = """
import json, sys, time
from pathlib import Path

tree = sys.argv[1]
sys.path.insert(0, tree)
import cosa
cosa.__path__.append(tree)
from cosa.serving import runners
from cosa.serving.segment import segment_inputs
assert runners.__file__.startswith(tree) and cosa.__file__.startswith(tree), runners.__file__
try:  # as the revision's CLI does at start (COSA_MALLOC=system opts out)
    from cosa.allocator import keep_freed_memory
except ImportError:
    pass
else:
    keep_freed_memory()
import resource

artifact, folder, out, batch, passes = sys.argv[2:7]
settings = json.loads(sys.argv[7])
# Open the runner as this revision's `cosa segment` does, unless told otherwise.
if hasattr(runners, "default_parallel_calls"):
    calls = settings.get("parallel_calls", runners.default_parallel_calls())
    runner = runners.open_runner(Path(artifact), "onnxruntime", parallel_calls=calls)
else:
    runner = runners.open_runner(Path(artifact), "onnxruntime")
workers = {}
if "workers" in settings:
    workers = {"decode_workers": settings["workers"], "encode_workers": settings["workers"]}
speeds, images = [], 0
for index in range(int(passes) + 1):
    if index == 1:  # the first pass warms up
        before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = segment_inputs([folder], Path(out), runner, batch_size=int(batch), **workers)
    seconds = time.perf_counter() - start
    assert not summary.failed, summary.failed
    if index:
        speeds.append(summary.processed / seconds)
        images += summary.processed
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "speeds": speeds,
    "sys_s_per_image": (after.ru_stime - before.ru_stime) / images,
    "minor_faults_per_image": (after.ru_minflt - before.ru_minflt) / images,
}))
"""


def parse_settings(pairs: list[str]) -> dict[str, int]:
    """["workers=1", ...] -> {"workers": 1}; only `SETTINGS` keys, integer values."""
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in SETTINGS or not value.isdigit():
            raise SystemExit(f"bad setting {pair!r}: use KEY=N with KEY one of {SETTINGS}")
        settings[key] = int(value)
    return settings


def describe(settings: dict[str, int], env: dict[str, str]) -> str:
    """ "(`cosa segment` defaults)" or "(workers=1, parallel_calls=2, COSA_MALLOC=system)"."""
    items = {**settings, **env}
    if not items:
        return "(`cosa segment` defaults)"
    return "(" + ", ".join(f"{key}={value}" for key, value in items.items()) + ")"


def parse_env(pairs: list[str]) -> dict[str, str]:
    """["COSA_MALLOC=system"] -> {"COSA_MALLOC": "system"}."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"bad environment setting {pair!r}: use NAME=VALUE")
        env[key] = value
    return env


def run_child(
    tree: Path,
    settings: dict[str, int],
    env: dict[str, str],
    artifact: Path,
    folder: Path,
    out: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    """One child process on `tree`'s code with `settings` and `env`: median images/s, and
    system seconds and minor page faults per image over its timed passes."""
    command = [sys.executable, "-c", CHILD, str(tree), str(artifact), str(folder), str(out)]
    command += [str(args.batch), str(args.passes), json.dumps(settings)]
    completed = subprocess.run(
        command,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": "", **env},
    )
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    return {
        "images_per_s": float(np.median(row["speeds"])),
        "sys_s_per_image": row["sys_s_per_image"],
        "minor_faults_per_image": row["minor_faults_per_image"],
    }


def git(*arguments: str) -> str:
    return subprocess.run(
        ["git", *arguments], check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", required=True, help='git revision, or "current" for this working tree'
    )
    parser.add_argument("--baseline-set", nargs="*", default=[], metavar="K=V")
    parser.add_argument("--current-set", nargs="*", default=[], metavar="K=V")
    parser.add_argument(
        "--baseline-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the baseline's children, e.g. COSA_MALLOC=system",
    )
    parser.add_argument("--current-env", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--name", default="segment_ab", help="output file stem")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    sides = {
        "baseline": parse_settings(args.baseline_set),
        "current": parse_settings(args.current_set),
    }
    envs = {"baseline": parse_env(args.baseline_env), "current": parse_env(args.current_env)}

    work = Path(tempfile.mkdtemp(prefix="cosa-segment-ab-"))
    worktree = work / "baseline"
    trees = {"baseline": ROOT if args.baseline == "current" else worktree, "current": ROOT}
    try:
        if trees["baseline"] == worktree:
            git("-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline)
        commit = git("-C", str(trees["baseline"]), "rev-parse", "--short", "HEAD")
        if trees["baseline"] == ROOT:
            commit += " + working tree"
        artifact = export_demo_artifact(work / "artifact", 192, 256, max_batch=8)
        folder = write_jpegs(work / "jpegs", args.images, 192, 256, seed=3)
        rows: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for _ in range(args.pairs):
            for name, tree in trees.items():
                out = work / f"out_{name}"
                row = run_child(tree, sides[name], envs[name], artifact, folder, out, args)
                rows[name].append(row)
                print(f"{name:>8}: {row['images_per_s']:6.1f} img/s", file=sys.stderr)
    finally:
        if worktree.exists():
            git("-C", str(ROOT), "worktree", "remove", "--force", str(worktree))
        shutil.rmtree(work, ignore_errors=True)

    speeds = {name: [row["images_per_s"] for row in side] for name, side in rows.items()}
    ratios = [c / b for b, c in zip(speeds["baseline"], speeds["current"], strict=True)]

    def median(side: str, key: str) -> float:
        return float(np.median([row[key] for row in rows[side]]))

    report = {
        "baseline": args.baseline,
        "baseline_commit": commit,
        "settings": sides,
        "environments": envs,
        "images": args.images,
        "batch": args.batch,
        "passes": args.passes,
        "cpus": os.cpu_count(),
        "images_per_s": speeds,
        "children": rows,
        "ratios": ratios,
        "ratio": float(np.median(ratios)),
    }
    lines = [
        "# `cosa segment` A/B",
        "",
        f"{args.images} JPEGs of 192x256, batch {args.batch}, {os.cpu_count()} CPUs; each cell is "
        f"one child process (median of {args.passes} timed passes after a warm-up). Baseline: "
        f"{commit} {describe(sides['baseline'], envs['baseline'])}; current: working tree "
        f"{describe(sides['current'], envs['current'])}.",
        "",
        "| pair | baseline img/s | current img/s | current / baseline |",
        "|---:|---:|---:|---:|",
    ]
    for index, (b, c, r) in enumerate(
        zip(speeds["baseline"], speeds["current"], ratios, strict=True)
    ):
        lines.append(f"| {index + 1} | {b:.1f} | {c:.1f} | {r:.3f} |")
    lines += [
        "",
        f"Median ratio current / baseline: {report['ratio']:.3f}.",
        "",
        "| per image, median over children | baseline | current |",
        "|---|---:|---:|",
        f"| system CPU s | {median('baseline', 'sys_s_per_image'):.4f} | "
        f"{median('current', 'sys_s_per_image'):.4f} |",
        f"| minor page faults | {median('baseline', 'minor_faults_per_image'):,.0f} | "
        f"{median('current', 'minor_faults_per_image'):,.0f} |",
        "",
    ]
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
