"""The own-data path measured on the synthetic benchmark at the demo budget: mask-free checkpoint
selection, pseudo-masks, and a second, fully supervised stage.

Per seed, as a user without masks would run it:
  1. stage 1: `cosa train` (the demo preset: CoSA with all three techniques, 800 iterations),
     best.pt chosen by tag F1 on val (`train.select_metric=tag_f1`), evaluated every 100
     iterations. The val split has masks here, so every evaluation also logs val mIoU: the script
     compares the checkpoint tag F1 picks with the one val mIoU would pick;
  2. `cosa pseudo` on the training split with the stage-1 best.pt; the pseudo-masks are scored
     against the training split's ground truth (unused by training), and, from the same fused
     logits, at several `--min-confidence` values;
  3. stage 2: `cosa train --set train.supervision=full` on the pseudo-mask folder (same preset,
     budget and seed; its val split carries the source's val masks but selection stays tag F1);
  4. both stages' best.pt scored on the test split (never used for selection).

    python benchmarks/own_data.py --seeds 0 --work runs/own_data      # one seed per process;
    python benchmarks/own_data.py --seeds 1 --work runs/own_data      # run two side by side
    python benchmarks/own_data.py --report --work runs/own_data       # tables from what exists

Each step is skipped when its output exists, so an interrupted run continues. Writes
`benchmarks/results/own_data.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cosa.checkpoint import build_teacher_from_checkpoint, load_checkpoint
from cosa.config import apply_overrides, preset
from cosa.data import open_dataset, read_mask, read_rgb, write_synthetic_dataset
from cosa.evaluation.metrics import PartialLabelScore
from cosa.evaluation.predictors import NativeMultiScalePredictor
from cosa.files import write_text_atomic
from cosa.pseudo.second_stage import pseudo_mask, write_pseudo_dataset
from cosa.train.trainer import train

CONFIDENCES = (0.0, 0.3, 0.5, 0.7, 0.9)
IMAGENET = Path("imagenet")  # stage 2 from the ImageNet weights instead of stage 1's network


def stage_config(
    data: Path, seed: int, iters: int, eval_every: int, init: Path | None = None
) -> object:
    """The demo preset, selecting by tag F1; with `init`, stage 2 (full supervision from it)."""
    return apply_overrides(
        preset("demo"),
        {
            "data.root": str(data),
            "train.seed": seed,
            "train.max_iters": iters,
            "train.eval_every": eval_every,
            "train.select_metric": "tag_f1",
            "train.supervision": "weak" if init is None else "full",
            "model.init_checkpoint": None if init is None or init == IMAGENET else str(init),
        },
    )


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "eval"]


def selection_agreement(run: Path) -> dict:
    """Which evaluation tag F1 picks against val mIoU's pick (first of equal scores, as the
    trainer keeps the first best), and the val mIoU given up; rank correlation over evaluations."""
    evals = evaluations(run)
    tag = max(evals, key=lambda r: (r["tag_f1"], -r["iter"]))
    miou = max(evals, key=lambda r: (r["miou"], -r["iter"]))
    ranks = [np.argsort(np.argsort([r[k] for r in evals])) for k in ("tag_f1", "miou")]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if len(evals) > 2 else float("nan")
    return {
        "evaluations": [
            {"iter": r["iter"], "tag_f1": r["tag_f1"], "miou": r["miou"]} for r in evals
        ],
        "tag_f1_pick": tag["iter"],
        "miou_pick": miou["iter"],
        "same": tag["iter"] == miou["iter"],
        "val_miou_at_tag_pick": tag["miou"],
        "val_miou_best": miou["miou"],
        "val_miou_given_up": miou["miou"] - tag["miou"],
        "spearman": spearman,
    }


def confidence_sweep(checkpoint: Path, data: Path) -> list[dict]:
    """Pseudo-mask quality on the training split at each of `CONFIDENCES`, from one fused pass."""
    ckpt = load_checkpoint(checkpoint)
    net = build_teacher_from_checkpoint(ckpt)
    scales = tuple(ckpt.config.pseudo.scales)
    predictor = NativeMultiScalePredictor(net, torch.device("cpu"), scales=scales, flip=True)
    index = open_dataset(data, "train")
    scores = {c: PartialLabelScore(len(index.class_names)) for c in CONFIDENCES}
    for sample in index.samples:
        logits = predictor(np.asarray(read_rgb(sample.image_path), dtype=np.uint8))
        truth = read_mask(sample.mask_path)
        for c in CONFIDENCES:
            scores[c].update(pseudo_mask(logits, sample.label, 2 * len(scales), c), truth)
    return [
        {"min_confidence": c, "miou": s.miou(), "coverage": s.coverage()} for c, s in scores.items()
    ]


def run_seed(
    work: Path,
    seed: int,
    iters: int,
    eval_every: int,
    min_confidence: float,
    stages: int,
    stage2_init: str,
) -> dict | None:
    """Both stages of one seed (or stage 1 and the confidence sweep with `stages=1`). Stage 2
    starts from stage 1's best.pt (`stage2_init="stage1"`) or from ImageNet ("imagenet")."""
    data = work / "data"
    part = work / f"seed{seed}.json"
    if part.is_file():
        return json.loads(part.read_text())
    if not data.is_dir():
        write_synthetic_dataset(data, 400, 60, 100, seed=0)
    row: dict = {
        "seed": seed,
        "iters": iters,
        "min_confidence": min_confidence,
        "stage2_init": stage2_init,
    }
    best_one = work / f"stage1_seed{seed}" / "checkpoints" / "best.pt"
    init = best_one if stage2_init == "stage1" else IMAGENET
    plan = [("stage1", data, None), ("stage2", work / f"pseudo_seed{seed}", init)][:stages]
    for name, source, init_from in plan:
        run = work / f"{name}_seed{seed}"
        if name == "stage2":  # resumes, or only re-scores the masks an earlier run wrote
            start = time.perf_counter()
            pseudo = write_pseudo_dataset(
                best_one, data, source,
                min_confidence=min_confidence, skip_existing=True, device="cpu", progress=False,
            )  # fmt: skip
            row["pseudo"] = {**pseudo.to_json(), "seconds": time.perf_counter() - start}
        result = train(
            stage_config(source, seed, iters, eval_every, init_from), run, device="cpu",
            resume=(run / "checkpoints" / "last.pt").is_file(), progress=False,
        )  # fmt: skip
        row[name] = {
            "test_miou": (result.test or {}).get("miou"),
            "test_miou_label_masked": (result.test or {}).get("miou_label_masked"),
            "best_iteration": result.best_iteration,
            "sec_per_iter": result.seconds_per_iter,
            "selection": selection_agreement(run),
        }
        print(json.dumps({name: row[name]}), flush=True)
        if name == "stage1":
            sweep = run / "confidence_sweep.json"
            if not sweep.is_file():
                write_text_atomic(
                    sweep, json.dumps(confidence_sweep(run / "checkpoints" / "best.pt", data))
                )
            row["sweep"] = json.loads(sweep.read_text())
            print(json.dumps({"sweep": row["sweep"]}), flush=True)
    if stages < 2:
        return None
    write_text_atomic(part, json.dumps(row, indent=1))
    return row


def _variant(row: dict) -> str:
    start = "stage 1's best.pt" if row.get("stage2_init", "imagenet") == "stage1" else "ImageNet"
    return f"from {start}, --min-confidence {row['min_confidence']}"


def markdown(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        "Synthetic benchmark (400/60/100 images, data seed 0), demo preset, 800 iterations per "
        "stage, CPU. Stage 1: CoSA with all three techniques; stage 2: the same network trained "
        "with full supervision on stage 1's pseudo-masks of the training split, starting from "
        "stage 1's network or from ImageNet. best.pt chosen by tag F1 on val (no masks used) in "
        "both stages; test mIoU in %.",
        "",
        "| stage 2 | seed | stage 1 test mIoU | pseudo-masks mIoU (coverage), train | "
        "stage 2 test mIoU | stage 2 - stage 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        one, two, p = r["stage1"]["test_miou"], r["stage2"]["test_miou"], r.get("pseudo", {})
        by_variant.setdefault(_variant(r), []).append(two - one)
        lines.append(
            f"| {_variant(r)} | {r['seed']} | {pct(one)} | {pct(p.get('miou'))} "
            f"({pct(p.get('coverage'))}%) | {pct(two)} | {100 * (two - one):+.1f} |"
        )
    lines.append("")
    for variant, diffs in by_variant.items():
        lines.append(
            f"- {variant}: stage 2 - stage 1 = {100 * float(np.mean(diffs)):+.1f} points, mean "
            f"of {len(diffs)} seed(s) (goal: at least +2)."
        )
    lines += [
        "",
        "Checkpoint selection without masks: the evaluation tag F1 picks against the one val "
        "mIoU picks (8 evaluations per run, every 100 iterations).",
        "",
        "| run | tag F1 picks | val mIoU picks | same | val mIoU at tag F1's pick | best val mIoU "
        "| given up | Spearman (tag F1, mIoU) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    runs = {}
    for r in rows:
        runs[f"stage 1, seed {r['seed']}"] = r["stage1"]["selection"]
        runs[f"stage 2 {_variant(r)}, seed {r['seed']}"] = r["stage2"]["selection"]
    for name, s in runs.items():
        lines.append(
            f"| {name} | {s['tag_f1_pick']} | {s['miou_pick']} | {'yes' if s['same'] else 'no'} "
            f"| {pct(s['val_miou_at_tag_pick'])} | {pct(s['val_miou_best'])} | "
            f"{100 * s['val_miou_given_up']:.1f} | {s['spearman']:.2f} |"
        )
    same = sum(s["same"] for s in runs.values())
    lines += ["", f"Same checkpoint in {same} of {len(runs)} runs."]
    lines += [
        "",
        "Pseudo-masks of the training split against its ground truth, by `--min-confidence` "
        "(mIoU on the pixels they label, and the share of labelled pixels they label):",
        "",
        "| seed | " + " | ".join(f"{c:.1f}" for c in CONFIDENCES) + " |",
        "|---:|" + "---:|" * len(CONFIDENCES),
    ]
    sweeps = {r["seed"]: r["sweep"] for r in rows}
    for seed, sweep in sorted(sweeps.items()):
        cells = [f"{pct(s['miou'])} ({pct(s['coverage'])}%)" for s in sweep]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path("runs/own_data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--report", action="store_true", help="Only write the tables.")
    parser.add_argument("--stages", type=int, default=2, help="1: stage 1 and the sweep only.")
    parser.add_argument("--stage2-init", choices=("stage1", "imagenet"), default="stage1")
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="More work folders for the report."
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):
            run_seed(
                args.work, seed, args.iters, args.eval_every, args.min_confidence, args.stages,
                args.stage2_init,
            )  # fmt: skip
    rows = [
        json.loads(p.read_text())
        for work in (args.work, *args.also)
        for p in sorted(work.glob("seed*.json"))
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "own_data.json", json.dumps(rows, indent=1))
    write_text_atomic(args.out / "own_data.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
