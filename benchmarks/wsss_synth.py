"""What CoSA and each of its three techniques are worth, on the synthetic benchmark,
at one shared budget.

Variants (all on the demo backbone, EfficientNet-Lite0 with its shipped ImageNet weights, unless
said):
  a  CAM baseline: classification only (the warm-up never ends); its segmentation is the
     thresholded CAM
  b  CoSA as the reference code runs it (RAW, dynamic thresholds and CSP off)
  c  b + reliability weighting (RAW)          d  b + dynamic thresholds (DT)
  e  b + contrastive separation (CSP)         f  b + all three (the `demo` preset)
  g  fully supervised bound: same network and schedule, pixel labels
  h  f with a from-scratch ViT-Ti/16 (what pretraining is worth)

Every run trains on `train`, selects its best checkpoint on `val`, and is scored on `test` (never
used for selection) with the deploy forward (what `cosa segment` writes). Reported: plain mIoU
(headline; for the CAM baseline a, its CAM with the classes its own classifier predicts, since
that is what it could deploy), CAM mIoU with the network's own and with ground-truth image labels,
pseudo-label (CPL) mIoU on the pixels it keeps and its coverage, label-masked mIoU (GT labels),
seconds per iteration, seeds.
The headline thus scores a with the teacher's test-time augmentation (scales + flip) and the
others with one pass; `benchmarks/wsss_protocols.py` re-scores the stored runs at matched
augmentation.
`--rescore` scores the stored runs' best.pt again after a change of the metrics.

    python benchmarks/wsss_synth.py --iters 300 --out benchmarks/results   # JSON + markdown table
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from cosa.config import CosaConfig, apply_overrides, preset
from cosa.data import write_synthetic_dataset
from cosa.evaluation.run import evaluate_checkpoint
from cosa.train.trainer import train

VARIANTS: dict[str, tuple[str, dict]] = {
    "a": (
        "CAM baseline (cls only, thresholded CAM)",
        {"__cam_baseline__": True, "train.select_metric": "cam_miou_predicted_labels"},
    ),
    "b": (
        "CoSA, reference configuration",
        {"reliability.enabled": False, "thresholds.enabled": False, "separation.enabled": False},
    ),
    "c": (
        "b + reliability weighting (RAW)",
        {"reliability.enabled": True, "thresholds.enabled": False, "separation.enabled": False},
    ),
    "d": (
        "b + dynamic thresholds (DT)",
        {"reliability.enabled": False, "thresholds.enabled": True, "separation.enabled": False},
    ),
    "e": (
        "b + contrastive separation (CSP)",
        {"reliability.enabled": False, "thresholds.enabled": False, "separation.enabled": True},
    ),
    "f": ("CoSA, all three techniques", {}),
    "g": ("fully supervised bound (pixel labels)", {"train.supervision": "full"}),
    "h": ("f with ViT-Ti/16 from scratch", {"model.backbone": "vit_tiny_patch16"}),
}


def variant_config(base: CosaConfig, key: str, iters: int, data: Path, seed: int) -> CosaConfig:
    overrides = dict(VARIANTS[key][1])
    cam_baseline = overrides.pop("__cam_baseline__", False)
    cfg = apply_overrides(
        base, {**overrides, "data.root": str(data), "train.max_iters": iters, "train.seed": seed}
    )
    if cam_baseline:
        cfg = replace(cfg, loss=replace(cfg.loss, warmup_iters=iters + 1))
    return cfg


def test_metrics(key: str, test: dict) -> dict:
    """The row's scores from a test-split `EvalResult.to_json()` (fractions in [0, 1])."""
    cam_baseline = key == "a"
    return {
        # The CAM baseline deploys its CAM with the classes its own classifier predicts.
        "miou": test.get("cam_miou_predicted_labels") if cam_baseline else test.get("miou"),
        "seg_stream_miou": test.get("miou"),
        "cam_miou": test.get("cam_miou"),
        "cam_miou_predicted_labels": test.get("cam_miou_predicted_labels"),
        # Scored on the pixels the CPL does not ignore only: read it with its coverage.
        "cpl_miou": test.get("cpl_miou"),
        "cpl_coverage": test.get("cpl_coverage"),
        "miou_label_masked": test.get("miou_label_masked"),
    }


def run_variant(key: str, cfg: CosaConfig, out: Path, device: str) -> dict:
    start = time.perf_counter()
    result = train(cfg, out, device=device, progress=False)
    return {
        "variant": key,
        "description": VARIANTS[key][0],
        **test_metrics(key, result.test or {}),
        "best_val_miou": result.best_score,  # the selection metric: miou here, CAM for a
        "best_iteration": result.best_iteration,
        "sec_per_iter": result.seconds_per_iter,
        "wall_seconds": time.perf_counter() - start,
        "seed": cfg.train.seed,
        "iters": cfg.train.max_iters,
    }


def rescore(rows_dir: Path, work: Path, data: Path, keys: str, seed: int, device: str) -> None:
    """Score the stored runs' best.pt on test again (after a change of the metrics, not of the
    training) and update their rows in place; timings and selection are kept."""
    for key in keys:
        path = rows_dir / f"{key}_seed{seed}.json"
        part = json.loads(path.read_text())
        checkpoint = work / f"{key}_seed{seed}" / "checkpoints" / "best.pt"
        test = evaluate_checkpoint(checkpoint, data, split="test", device=device).to_json()
        part["row"].update(test_metrics(key, test))
        path.write_text(json.dumps(part))
        print(json.dumps(part["row"]), flush=True)


def seed_means(rows: list[dict]) -> list[str]:
    """Each variant's test mIoU averaged over its seeds, when some variant has several."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r["miou"] is not None:
            by_variant.setdefault(r["variant"], []).append(r)
    if all(len(v) < 2 for v in by_variant.values()):
        return []
    means = {k: sum(r["miou"] for r in v) / len(v) for k, v in by_variant.items()}
    lines = [
        "",
        "Mean over seeds (test mIoU; the difference to b, the reference configuration, is only "
        "meaningful between rows with the same seeds):",
        "",
        "| | variant | seeds | mIoU (test), mean | min-max | vs b |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, group in sorted(by_variant.items()):
        values = [100 * r["miou"] for r in group]
        versus = f"{100 * (means[key] - means['b']):+.1f}" if "b" in means and key != "b" else ""
        lines.append(
            f"| {key} | {group[0]['description']} | {', '.join(str(r['seed']) for r in group)} | "
            f"{100 * means[key]:.1f} | {min(values):.1f}-{max(values):.1f} | {versus} |"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    """The issue's two targets for every seed that has rows a, f and g, and their mean over seeds.

    (f) / (g) >= 85% and (f) - (a) >= +10 points, then the label-masked oracle comparison.
    """
    by_seed: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["miou"] is not None:
            by_seed.setdefault(r["seed"], {})[r["variant"]] = r
    complete = {s: v for s, v in sorted(by_seed.items()) if {"a", "f", "g"} <= v.keys()}
    if not complete:
        return []
    ratios = [v["f"]["miou"] / v["g"]["miou"] for v in complete.values()]
    deltas = [v["f"]["miou"] - v["a"]["miou"] for v in complete.values()]
    lines = [""]
    for seed, ratio, delta in zip(complete, ratios, deltas, strict=True):
        lines.append(
            f"Seed {seed}: (f) reaches {100 * ratio:.0f}% of the fully supervised bound (target "
            f">= 85%) and {100 * delta:+.1f} points over the CAM baseline (target >= +10)."
        )
    if len(complete) > 1:
        lines += [
            "",
            f"Mean over seeds {', '.join(str(s) for s in complete)}: "
            f"{100 * sum(ratios) / len(ratios):.0f}% of the bound and "
            f"{100 * sum(deltas) / len(deltas):+.1f} points over the baseline.",
        ]
    oracle = [
        (v["f"]["miou_label_masked"], v["a"]["cam_miou"])
        for v in complete.values()
        if v["f"]["miou_label_masked"] is not None and v["a"]["cam_miou"] is not None
    ]
    if oracle:
        f_masked = sum(f for f, _ in oracle) / len(oracle)
        a_gt = sum(a for _, a in oracle) / len(oracle)
        lines += [
            "",
            "With ground-truth image labels on both sides (not deployable: an oracle; mean over "
            f"seeds): (f) label-masked {100 * f_masked:.1f} against the CAM baseline's "
            f"{100 * a_gt:.1f} ({100 * (f_masked - a_gt):+.1f} points).",
        ]
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def coverage(v: float | None) -> str:
        return "" if v is None else f" ({100 * v:.0f}%)"

    where = meta.get("device", "cpu")
    where = f"CPU ({meta['threads']} threads)" if where == "cpu" else where
    overrides = ", ".join(f"`{o}`" for o in meta.get("overrides", []))
    lines = [
        f"Synthetic benchmark ({meta['train']}/{meta['val']}/{meta['test']} images, data seed "
        f"{meta['data_seed']}), {meta['iters']} iterations per run, batch {meta['batch']}, crop "
        f"{meta['crop']}, {where}{', overrides ' + overrides if overrides else ''}. "
        "mIoU in % on the test split; "
        "best checkpoint chosen on val. CPL mIoU is scored on the pixels the pseudo-label does "
        "not ignore; coverage = their share of the labelled pixels.",
        "",
        "| | variant | mIoU (test) | CAM mIoU, own labels | CAM mIoU, GT labels "
        "| CPL mIoU (coverage) | label-masked mIoU | s/it | seed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['description']} | {pct(r['miou'])} | "
            f"{pct(r.get('cam_miou_predicted_labels'))} | {pct(r['cam_miou'])} | "
            f"{pct(r['cpl_miou'])}{coverage(r.get('cpl_coverage'))} | "
            f"{pct(r['miou_label_masked'])} | {r['sec_per_iter']:.2f} | "
            f"{r['seed']} |"
        )
    lines += seed_means(rows) + targets(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--variants", default="abcdefgh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_wsss"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (CUDA runs use the preset's autocast)"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the stored runs' best.pt on test again instead of training",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra key=value overrides for every run",
    )
    args = parser.parse_args()

    data = args.work / "data"
    if not (data / "classes.json").exists():
        write_synthetic_dataset(data, args.train, args.val, args.test, seed=0)
    from cosa.config import parse_set_option

    base = apply_overrides(preset("demo"), parse_set_option(args.overrides))
    base = replace(
        base,
        train=replace(
            base.train,
            eval_every=max(1, -(-args.iters // 3)),  # the third evaluation is the last step
            checkpoint_every=args.iters,
            eval_max_images=0,
            vis_images=2,
        ),
    )
    meta = {
        "train": args.train,
        "val": args.val,
        "test": args.test,
        "data_seed": 0,
        "iters": args.iters,
        "batch": base.train.batch_size,
        "crop": base.data.crop_size,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "overrides": args.overrides,
    }
    rows_dir = args.out / "wsss_synth"  # one file per variant: variants can run in parallel
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        rescore(rows_dir, args.work, data, args.variants, args.seed, args.device)
        write_tables(rows_dir, args.out)
        return
    for key in args.variants:
        cfg = variant_config(base, key, args.iters, data, args.seed)
        run_dir = args.work / f"{key}_seed{args.seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        row = run_variant(key, cfg, run_dir, args.device)
        print(json.dumps(row), flush=True)
        (rows_dir / f"{key}_seed{args.seed}.json").write_text(
            json.dumps({"meta": meta, "row": row})
        )
    write_tables(rows_dir, args.out)


def write_tables(rows_dir: Path, out: Path) -> None:
    """Merge every variant's JSON into wsss_synth.json and wsss_synth.md.

    Runs of one budget only.
    """
    parts = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    if not parts:
        return
    meta = parts[-1]["meta"]
    rows = sorted(
        (p["row"] for p in parts if p["meta"]["iters"] == meta["iters"]),
        key=lambda r: (r["variant"], r["seed"]),
    )
    (out / "wsss_synth.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "wsss_synth.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
