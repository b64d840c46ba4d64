"""The CAM baseline against CoSA at matched test-time augmentation, from stored benchmark runs.

`wsss_synth.py` scores CoSA (and b to g) with the deploy forward: one pass at native size. It
scores the CAM baseline (a) with its CAM, which `CamQuality` computes with the checkpoint's
teacher: scales `pseudo.scales` + flip, four passes in the demo preset. The two headline numbers
therefore differ in test-time augmentation as well as in method. This script re-scores the stored
`best.pt` of each run on the test split under two matched protocols (no training):

  single pass   one pass at native size, no flip: a's CAM at scale 1.0 (what a CAM-only model
                deploys at the cost of `cosa segment`), the others' deploy forward
  teacher TTA   the checkpoint's teacher scales + flip at native size for both: a's CAM as
                `wsss_synth.py` scores it, the others' seg logits fused the same way
                (`cosa eval --protocol tta`)

a's CAM uses the classes its own classifier predicts (sigmoid > 0.5), as in `wsss_synth.py`.
Checkpoints were chosen on val by `wsss_synth.py`'s own metric (a: the teacher-TTA CAM). In the
800-iteration runs a's best checkpoint is its last, so the choice favours neither protocol; where
it is not the last (seed 1 at 1600: iteration 1066), a's single-pass row is scored on a checkpoint
chosen for the other protocol.

    python benchmarks/wsss_protocols.py --work runs/bench_wsss800_2s --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cosa.checkpoint import load_checkpoint
from cosa.evaluation.run import evaluate_checkpoint
from cosa.files import write_text_atomic

PROTOCOLS = ("single pass", "teacher TTA")


def score_run(key: str, checkpoint: Path, data: Path) -> dict[str, float]:
    """Test mIoU (fraction) of one stored run under each protocol of `PROTOCOLS`."""
    teacher_scales = tuple(load_checkpoint(checkpoint).config.pseudo.scales)
    cam_baseline = key == "a"
    scores = {}
    for name, scales, flip in (
        ("single pass", (1.0,), False),
        ("teacher TTA", teacher_scales, True),
    ):
        if not cam_baseline and name == "single pass":
            result = evaluate_checkpoint(checkpoint, data, "test", with_cam=False, device="cpu")
        else:
            result = evaluate_checkpoint(
                checkpoint,
                data,
                "test",
                protocol="tta",
                scales=scales,
                flip=flip,
                with_cam=cam_baseline,
                device="cpu",
            )
        miou = result.cam_miou_predicted_labels if cam_baseline else result.miou
        assert miou is not None
        scores[name] = miou
    return scores


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# CAM baseline against CoSA at matched test-time augmentation",
        "",
        f"Stored runs of `{meta['work']}` (best.pt of each, test split), re-scored by "
        "`python benchmarks/wsss_protocols.py`. Test mIoU in %. `wsss_synth.md`'s headline is "
        "the teacher-TTA column for a and the single-pass column for the others.",
        "",
        "| variant | seed | single pass | teacher TTA |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | "
            + " | ".join(f"{100 * r[p]:.1f}" for p in PROTOCOLS)
            + " |"
        )
    lines += ["", "| | " + " | ".join(PROTOCOLS) + " |", "|---|" + "---:|" * len(PROTOCOLS)]
    by = {(r["variant"], r["seed"]): r for r in rows}
    for label, keys, formula, unit in (
        ("f - a (points)", "af", lambda a, f: 100 * (f - a), ""),
        ("f / g", "fg", lambda f, g: 100 * f / g, "%"),
    ):
        seeds = sorted({s for _, s in by if all((k, s) in by for k in keys)})
        if not seeds:
            continue
        cells = []
        for p in PROTOCOLS:
            values = [formula(*(by[(k, s)][p] for k in keys)) for s in seeds]
            each = " / ".join(f"{v:.0f}%" if unit else f"{v:+.1f}" for v in values)
            cells.append(f"{each} (mean {sum(values) / len(values):.1f}{unit})")
        lines.append(f"| {label}, seeds {'/'.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_wsss"))
    parser.add_argument("--variants", default="abfg")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    data = args.work / "data"
    rows = []
    for key in args.variants:
        for run in sorted(args.work.glob(f"{key}_seed*")):
            checkpoint = run / "checkpoints" / "best.pt"
            if not checkpoint.is_file():
                continue
            row = {"variant": key, "seed": int(run.name.split("seed")[1])}
            row.update(score_run(key, checkpoint, data))
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"work": str(args.work), "split": "test"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        args.out / "wsss_protocols.json", json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    write_text_atomic(args.out / "wsss_protocols.md", markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
