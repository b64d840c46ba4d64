"""Where the CoSA training step spends its time: torch.profiler over a few full steps of a preset.

Reported, as shares of the profiled steps' CPU time (so they hold on a loaded machine, where
absolute times do not): the step's named regions (`cosa.teacher`, `cosa.student`,
`cosa.objective` with `cosa.crf` and `cosa.csp` inside it, `cosa.backward`, `cosa.optimizer`,
`cosa.ema`, `cosa.thresholds`; see cosa/train/step.py) and the operators with the most self CPU
time. The first `--skip` steps (one-off allocations, kernel selection) are not profiled.

    python benchmarks/profile_step.py --preset demo --steps 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from train_speed import FULL_STEP, timing_loop

from cosa.config import apply_overrides, preset
from cosa.data import write_synthetic_dataset
from cosa.files import write_text_atomic
from cosa.train.distributed import setup_distributed, teardown_distributed
from cosa.train.step import train_step
from cosa.train.trainer import Trainer

# The step's own regions: every `record_function` name in cosa/ starts with this.
REGION_PREFIX = "cosa."


def profile_steps(preset_name: str, steps: int, skip: int, device: str) -> dict:
    """Profile `steps` full CoSA steps after `skip` unprofiled ones on synthetic data."""
    with tempfile.TemporaryDirectory(prefix="cosa_profile_") as tmp:
        work = Path(tmp)
        write_synthetic_dataset(work / "data", 32, 2, 0, seed=0)
        cfg = apply_overrides(
            preset(preset_name), {**timing_loop(work / "data", skip + steps), **FULL_STEP}
        )
        ctx = setup_distributed(device)
        try:
            trainer = Trainer(cfg, work / "run", ctx, resume=False)
            activities = [ProfilerActivity.CPU]
            if ctx.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)

            def step() -> None:
                trainer.state.iteration += 1
                with record_function("benchmark.step"):
                    train_step(
                        trainer.state,
                        trainer.objective,
                        trainer.cfg,
                        ctx,
                        trainer.amp_dtype,
                        next(trainer.batches),
                    )

            for _ in range(skip):
                step()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
        finally:
            teardown_distributed()
    events = prof.key_averages()
    step_total = sum(e.cpu_time_total for e in events if e.key == "benchmark.step")
    regions = {e.key: e.cpu_time_total for e in events if e.key.startswith(REGION_PREFIX)}
    ops = sorted(
        (e for e in events if e.key.startswith(("aten::", "mkldnn::"))),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    return {
        "preset": preset_name,
        "steps": steps,
        "skipped": skip,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu_ms_per_step": step_total / steps / 1000,
        "regions": {
            name: {"ms_per_step": us / steps / 1000, "share": us / step_total}
            for name, us in sorted(regions.items(), key=lambda kv: -kv[1])
        },
        "ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "self_ms_per_step": e.self_cpu_time_total / steps / 1000,
                "share": e.self_cpu_time_total / step_total,
            }
            for e in ops[:20]
        ],
    }


def markdown(report: dict) -> str:
    lines = [
        "# Where a training step's time goes",
        "",
        f"`{report['preset']}` preset, full CoSA step, {report['steps']} steps profiled after "
        f"{report['skipped']} on {report['device']} ({report['threads']} threads, "
        f"{report['machine']}); {report['cpu_ms_per_step']:.0f} ms of CPU time per step under "
        "the profiler. Shares are of that time; `cosa.crf` and `cosa.csp` lie inside "
        "`cosa.objective`. Command: `python benchmarks/profile_step.py --preset "
        f"{report['preset']} --steps {report['steps']}`.",
        "",
        "| region | ms per step | share |",
        "|---|---:|---:|",
    ]
    for name, row in report["regions"].items():
        lines.append(f"| {name} | {row['ms_per_step']:.0f} | {100 * row['share']:.1f}% |")
    lines += [
        "",
        "| operator | calls per step | self ms per step | share |",
        "|---|---:|---:|---:|",
    ]
    for row in report["ops"]:
        lines.append(
            f"| {row['op']} | {row['calls_per_step']:.0f} | {row['self_ms_per_step']:.0f} | "
            f"{100 * row['share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--skip", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="profile_step", help="result file stem")
    args = parser.parse_args()
    report = profile_steps(args.preset, args.steps, args.skip, args.device)
    text = markdown(report)
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
