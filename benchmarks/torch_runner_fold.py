"""The torch runner with and without the teacher's BatchNorms folded, side by side in one process.

`TorchRunner.from_checkpoint` (`cosa segment --backend torch`, `cosa stream`, `cosa benchmark`'s
checkpoint row) runs the deploy network with every conv -> BatchNorm pair folded
(`cosa.model.folding`). This times that network against the plain `DeployModel` of the same
checkpoint, call by call in turn (`cosa.serving.benchmark.time_calls`), and reports the largest
logit difference between the two.

    python benchmarks/torch_runner_fold.py --checkpoint runs/demo/run/checkpoints/best.pt

Without `--checkpoint`, an untrained demo network (EfficientNet-Lite0, decoder 128) is timed.
Results go to OUT/NAME.json and OUT/NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from cosa.checkpoint import load_deploy_model
from cosa.config import preset
from cosa.files import write_text_atomic
from cosa.model import build_model
from cosa.serving.benchmark import time_calls
from cosa.serving.runners import TorchRunner


def untrained_demo_checkpoint(folder: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from model_fixtures import save_net_checkpoint

    cfg = preset("demo").model
    net = build_model(cfg, num_classes=10, load_pretrained=False).eval()
    names = ["background", *(f"class{i}" for i in range(10))]
    palette = [[i, i, i] for i in range(11)]
    return save_net_checkpoint(net, cfg, names, palette, folder / "demo.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--size", type=int, default=320, help="square input side")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="torch_runner_fold")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or untrained_demo_checkpoint(Path(tmp))
        plain, _ = load_deploy_model(path)
        plain.eval()
        runner = TorchRunner.from_checkpoint(path, device="cpu", return_logits=True)
        rng = np.random.default_rng(0)
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            images = rng.uniform(0, 255, (batch, 3, args.size, args.size)).astype(np.float32)
            tensor = torch.from_numpy(images)

            def run_plain(tensor: torch.Tensor = tensor) -> object:
                with torch.inference_mode():
                    return plain(tensor)

            def run_folded(images: np.ndarray = images) -> object:
                return runner.infer(images)

            with torch.inference_mode():
                want = plain(tensor)[0].numpy()
            gap = float(np.abs(runner.infer(images)["logits"] - want).max())
            stats = time_calls(
                {"plain": run_plain, "folded": run_folded}, batch, repeats=args.repeats
            )
            rows.append(
                {
                    "batch": batch,
                    "plain_ms": stats["plain"].p50_ms,
                    "folded_ms": stats["folded"].p50_ms,
                    "ratio": stats["folded"].p50_ms / stats["plain"].p50_ms,
                    "max_logit_gap": gap,
                    "logit_scale": float(np.abs(want).max()),
                }
            )
            print(json.dumps(rows[-1]))
        runner.close()

    meta = {
        "checkpoint": str(args.checkpoint) if args.checkpoint else "untrained demo network",
        "size": args.size,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_at_start": round(os.getloadavg()[0], 2),
    }
    lines = [
        "# Torch runner: folded BatchNorm against the plain deploy network",
        "",
        f"{meta['checkpoint']}, {args.size} x {args.size} inputs, {meta['threads']} threads, "
        f"{meta['machine']}; p50 latency over {args.repeats} calls each, taking turns. Command: "
        f"`python benchmarks/torch_runner_fold.py "
        f"{'--checkpoint ' + str(args.checkpoint) if args.checkpoint else ''}`.",
        "",
        "| batch | plain ms | folded ms | folded / plain | max logit gap (scale) |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['batch']} | {r['plain_ms']:.1f} | {r['folded_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['max_logit_gap']:.1e} ({r['logit_scale']:.1f}) |"
            for r in rows
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        args.out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
