"""Host-device synchronisations per training step on CUDA, counted with PyTorch's sync debug mode.

A synchronisation stalls the host until the GPU has drained its queue, so the next step's kernels
cannot be queued behind the current ones; the goal is none inside the step. The run trains the paper
configuration (the `voc` preset: ViT-B/16, batch 4, crop 448, teacher scales 1.0, 0.5, 1.5 +
flip, full CoSA step from the first iteration) on synthetic data with
`torch.cuda.set_sync_debug_mode("warn")` and records every synchronising call with its Python
stack. Calls during the first `--warmup` iterations (cuDNN and allocator start-up) and outside the
step loop (evaluation, checkpoint, set-up) are reported apart from the steady steps.

    python benchmarks/cuda_syncs.py --out benchmarks/results         # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from train_speed import FULL_STEP, timing_loop  # benchmarks/ is the script's own folder

from cosa.config import apply_overrides, preset
from cosa.data import write_synthetic_dataset
from cosa.train.trainer import Trainer, train

PROJECT_DIRS = ("cosa", "export", "serving")


def _trainer_iteration(frame: FrameType | None) -> int | None:
    """The iteration of the `Trainer` whose method is on the stack, if any."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            state = getattr(owner, "state", None)  # None while it is being built
            return None if state is None else state.iteration
        frame = frame.f_back
    return None


def _site(stack: list[traceback.FrameSummary]) -> str:
    """`file:line (function)` of the innermost frame in the project's code."""
    for entry in reversed(stack):
        parts = Path(entry.filename).parts
        if any(d in parts for d in PROJECT_DIRS) and "benchmarks" not in parts:
            tail = "/".join(parts[parts.index(next(d for d in parts if d in PROJECT_DIRS)) :])
            return f"{tail}:{entry.lineno} ({entry.name})"
    last = stack[-1]
    return f"{last.filename}:{last.lineno} ({last.name})"


def _phase(stack: list[traceback.FrameSummary]) -> str:
    """Which part of the run issued the call: the step loop or something around it."""
    names = [e.name for e in stack]
    for outside in ("_evaluate_and_select", "_save", "_finish", "__init__"):
        if outside in names:
            return outside.strip("_")
    return "loop"


def count_syncs(steps: int, warmup: int, work: Path) -> dict[str, Any]:
    """Train the paper configuration for `warmup + steps` iterations on CUDA, recording syncs."""
    data = work / "data"
    write_synthetic_dataset(data, 16, 2, 0, seed=0)
    total = warmup + steps
    cfg = apply_overrides(preset("voc"), {**timing_loop(data, total, eval_images=1), **FULL_STEP})
    records: list[dict[str, Any]] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        records.append(
            {
                "iteration": _trainer_iteration(sys._getframe()),
                "site": _site(stack),
                "phase": _phase(stack),
            }
        )

    previous_show = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train(cfg, work / "run", device="cuda", progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous_show

    steady = [r for r in records if r["phase"] == "loop" and (r["iteration"] or 0) > warmup]
    by_site = collections.Counter(r["site"] for r in steady)
    around = collections.Counter(
        f"{r['phase']}: {r['site']}"
        for r in records
        if not (r["phase"] == "loop" and (r["iteration"] or 0) > warmup)
    )
    return {
        "steps_counted": steps,
        "warmup_steps": warmup,
        "syncs_in_steady_steps": len(steady),
        "syncs_per_step": len(steady) / steps,
        "steady_sites": [
            {"site": s, "count": n, "per_step": n / steps} for s, n in by_site.most_common()
        ],
        "outside_steady_steps": [{"site": s, "count": n} for s, n in around.most_common()],
        "device_name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Host-device synchronisations per training step (CUDA)",
        "",
        f"{result['device_name']}, torch {result['torch']}; the paper configuration (voc preset, "
        f"full CoSA step), {result['steps_counted']} steps counted after {result['warmup_steps']}. "
        "Command: `python benchmarks/cuda_syncs.py`.",
        "",
        f"**{result['syncs_per_step']:.2f} synchronisations per step** (goal 0).",
        "",
        "| where (steady steps) | count | per step |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| `{r['site']}` | {r['count']} | {r['per_step']:.2f} |" for r in result["steady_sites"]
    ]
    lines += ["", "| outside the steady steps | count |", "|---|---:|"]
    lines += [f"| `{r['site']}` | {r['count']} |" for r in result["outside_steady_steps"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps counted")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before counting")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: sync debug mode counts CUDA synchronisations")
    with tempfile.TemporaryDirectory(prefix="cosa_cuda_syncs_") as tmp:
        result = count_syncs(args.steps, args.warmup, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_syncs.json").write_text(json.dumps(result, indent=2))
    (args.out / "cuda_syncs.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
