"""Training speed A/B: this tree against another commit (or this tree with glibc's default malloc),
alternating run by run in one session, so that both sides see the same machine and the same load.

Each run is a fresh process that trains the demo preset on the same synthetic data for
`--warmup + --iters` steps, once in the warm-up phase (classification only) and once with the
full CoSA step, and reports the median s/it of the timed steps and, over the whole `train()` call
(set-up and one 2-image evaluation included), the system CPU time and minor page faults per step.
Sides run in turn (A, B, A, B, ...) for `--rounds` rounds; the table gives each side's median
over rounds and the ratios B / A.

The phase `run` is the demo's whole training run instead, as `cosa demo` trains it (the preset
unchanged: its own synthetic data, every step, every evaluation, the test split at the end); it
reports the wall time of `train()`, its CPU time and the test mIoU. The phase `demo` is the whole
`cosa demo` command, as a user runs it: data generation, that training run, the ONNX export and the
segmentation of 8 test images; it reports the command's wall time, its CPU time, its peak resident
memory and the test mIoU it prints.

    python benchmarks/train_ab.py --against 6e97449                 # this tree vs a commit
    python benchmarks/train_ab.py --system-malloc                   # this tree, malloc tuned vs not
    python benchmarks/train_ab.py --against 6e97449 --phases run --rounds 1   # the demo's training
    python benchmarks/train_ab.py --against 6e97449 --phases demo --rounds 1  # all of `cosa demo`

The other commit comes from a temporary `git worktree`. The step phases and `run` import only its
`cosa/` (training needs nothing outside it), so they work against any commit whose trainer has
`cosa.train.trainer.train`. The phase `demo` runs each side's command line (`cosa.app.cli:main`)
from a folder that lays the side's tree out as its pyproject's `package-dir` installs it, so both
sides run the same way, neither from the editable install.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from train_speed import timing_loop  # noqa: E402  (benchmarks/ is the script's own folder)

# Runs inside the side's tree (PYTHONPATH); uses only APIs both trees have.
DRIVER = r"""
import json, resource, statistics, sys, time
from pathlib import Path
from cosa.config import apply_overrides, preset
from cosa.train.trainer import train

spec = json.loads(sys.argv[1])
cfg = apply_overrides(preset("demo"), spec["overrides"])
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
result = train(cfg, Path(spec["out"]), device="cpu", progress=False)
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
lines = Path(spec["out"], "metrics.jsonl").read_text().splitlines()
steps = [json.loads(x) for x in lines if json.loads(x).get("kind") == "step"]
timed = [r["sec_per_it"] for r in steps[spec["warmup"]:]]
n = len(steps)
allocator = sys.modules.get("cosa.allocator")
print(json.dumps({
    "sec_per_it": statistics.median(timed),
    "sys_s_per_step": (after.ru_stime - before.ru_stime) / n,
    "user_s_per_step": (after.ru_utime - before.ru_utime) / n,
    "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / n,
    "malloc_tuned": bool(allocator and allocator.keep_freed_memory()),
    "wall_s": wall,
    "user_s": after.ru_utime - before.ru_utime,
    "sys_s": after.ru_stime - before.ru_stime,
    "test_miou": (result.test or {}).get("miou"),
}))
"""


@dataclass
class Side:
    name: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)


def run_once(
    side: Side, data: Path, out: Path, phase: str, warmup: int, iters: int, extra: dict
) -> dict:
    steps = warmup + iters
    overrides = {
        **timing_loop(data, steps),
        "loss.warmup_ramp": 0,
        "loss.warmup_iters": steps + 1 if phase == "warm-up" else 0,
    }
    if phase == "run":
        overrides, warmup = {}, 0
    spec = {"overrides": {**overrides, **extra}, "out": str(out), "warmup": warmup}
    path = os.pathsep.join(filter(None, [str(side.tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **side.env, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        env=env,
        cwd=side.tree,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{side.name} ({phase}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed_layout(tree: Path, dest: Path) -> Path:
    """Lay `tree` out as its pyproject installs it (`package-dir`), with links; return the folder.

    `cosa.app = "."` and `cosa.export = "export"` become `dest/cosa/app -> tree`,
    `dest/cosa/export -> tree/export`, and so on; `dest/cosa` holds links to `tree/cosa`'s entries.
    """
    import tomllib  # Python 3.11+; only this phase needs it

    setuptools = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools["package-dir"]
    package = dest / "cosa"
    package.mkdir(parents=True)
    for entry in (tree / package_dirs.get("cosa", "cosa")).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in package_dirs.items():
        if name.startswith("cosa."):
            (package / name.removeprefix("cosa.")).symlink_to((tree / folder).resolve())
    return dest


DEMO_COMMAND = "import sys; from cosa.app.cli import main; sys.argv[0] = 'cosa'; main()"


def run_demo(side: Side, work: Path, out: Path) -> dict:
    """One side's `cosa demo --out OUT` in a fresh process: wall, CPU, memory and test mIoU."""
    layout = installed_layout(side.tree, work / f"layout_{out.name}")
    env = {
        **os.environ,
        **side.env,
        "PYTHONPATH": str(layout),
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "200",  # one line per message, so the test mIoU can be read back
    }
    out.mkdir(parents=True)
    start = time.perf_counter()
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", DEMO_COMMAND, "demo", "--out", str(out / "demo")],
            env=env,
            cwd=work,
            stdout=stdout,
            stderr=stderr,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    printed = (out / "stdout.txt").read_text()
    if code != 0:
        tail = (out / "stderr.txt").read_text()[-3000:]
        raise RuntimeError(f"{side.name} (demo) failed with exit code {code}:\n{tail}")
    found = re.search(r"test mIoU ([0-9.]+)", printed)
    expected = re.search(r"expected: about (\d+) min", (out / "stderr.txt").read_text())
    return {
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # KiB on Linux
        "test_miou": float(found.group(1)) if found else float("nan"),
        "expected_min": float(expected.group(1)) if expected else float("nan"),
    }


def tree_description() -> str:
    """This tree's commit, and whether files differ from it: what side B ran."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{commit or 'unknown'}{' with uncommitted changes' if changed else ''}"


def markdown(meta: dict, table: dict) -> str:
    a, b = meta["sides"]
    lines = [
        "# Training A/B",
        "",
        f"{meta['machine']}, {meta['cpus']} CPUs, load average {meta['load_at_start']} at start; "
        f"this tree is {meta['tree']}. Demo preset: the step phases time {meta['iters']} steps "
        f"after {meta['warmup']}, `run` is the demo's whole training run, `demo` the whole "
        f"`cosa demo` command. {meta['rounds']} round(s), sides alternating"
        f"{', B first' if meta['b_first'] else ''}; medians over rounds. "
        f"Command: `{meta['command']}`.",
        "",
        "| phase | metric | " + f"A: {a} | B: {b} | B / A |",
        "|---|---|---:|---:|---:|",
    ]
    for phase, metrics in table.items():
        for metric, (va, vb) in metrics.items():
            ratio = vb / va if va else float("nan")
            lines.append(f"| {phase} | {metric} | {va:.3f} | {vb:.3f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--against",
        help="commit to compare this tree with (side A), or a folder holding that commit's cosa/ "
        "(`git archive SHA cosa | tar -x -C DIR`, for machines without the repository)",
    )
    which.add_argument(
        "--system-malloc",
        action="store_true",
        help="side A: this tree with COSA_MALLOC=system (glibc's defaults)",
    )
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phases", default="warm-up,full")
    parser.add_argument(
        "--b-first",
        action="store_true",
        help="run side B (this tree) before side A in each round: a second run in the other "
        "order cancels a drift of the machine's speed",
    )
    parser.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the demo preset for both sides, repeatable (e.g. train.seed=1)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="train_ab", help="result file stem")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    sys.path.insert(0, str(ROOT))
    from cosa.config import parse_set_option

    extra = parse_set_option(args.set_)
    if "demo" in phases and (extra or args.system_malloc or Path(args.against).is_dir()):
        parser.error(
            "the phase demo runs `cosa demo` as a user does: give --against a commit, no --set"
        )
    load_at_start = round(os.getloadavg()[0], 2)

    with tempfile.TemporaryDirectory(prefix="cosa_train_ab_") as tmp:
        work = Path(tmp)
        worktree = bool(args.against) and not Path(args.against).is_dir()
        if worktree:
            other = work / "other"
            subprocess.run(
                ["git", "worktree", "add", "--detach", "-q", str(other), args.against],
                cwd=ROOT,
                check=True,
            )
            sides = [Side(args.against, other), Side("this tree", ROOT)]
        elif args.against:
            sides = [Side(args.against, Path(args.against).resolve()), Side("this tree", ROOT)]
        else:
            sides = [
                Side("COSA_MALLOC=system", ROOT, {"COSA_MALLOC": "system"}),
                Side("tuned", ROOT),
            ]
        try:
            from cosa.data import write_synthetic_dataset

            data = work / "data"
            write_synthetic_dataset(data, 32, 2, 0, seed=0)
            results: dict[tuple[str, str], list[dict]] = {}
            run = 0
            for round_ in range(args.rounds):
                for phase in phases:
                    for side in sides[::-1] if args.b_first else sides:
                        run += 1
                        if phase == "demo":
                            row = run_demo(side, work, work / f"run{run}")
                        else:
                            row = run_once(
                                side,
                                data,
                                work / f"run{run}",
                                phase,
                                args.warmup,
                                args.iters,
                                extra,
                            )
                        print(
                            json.dumps({"round": round_, "phase": phase, "side": side.name, **row})
                        )
                        results.setdefault((phase, side.name), []).append(row)
        finally:
            if worktree:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(work / "other")], cwd=ROOT
                )

    step_metrics = ("sec_per_it", "sys_s_per_step", "user_s_per_step", "minor_faults_per_step")
    phase_metrics = {
        "run": ("wall_s", "user_s", "sys_s", "test_miou"),
        "demo": ("wall_s", "user_s", "sys_s", "peak_rss_gb", "test_miou", "expected_min"),
    }
    table = {
        phase: {
            m: tuple(statistics.median(r[m] for r in results[(phase, s.name)]) for s in sides)
            for m in phase_metrics.get(phase, step_metrics)
        }
        for phase in phases
    }
    meta = {
        "sides": [s.name for s in sides],
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_at_start": load_at_start,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "b_first": args.b_first,
        "tree": tree_description(),
        "command": "python benchmarks/train_ab.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {f"{p} / {s}": v for (p, s), v in results.items()}
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "runs": raw, "table": {p: t for p, t in table.items()}}, indent=2)
    )
    (args.out / f"{args.name}.md").write_text(markdown(meta, table))
    print(markdown(meta, table))


if __name__ == "__main__":
    main()
