"""Rows of two `wsss_synth.py` runs side by side: the same variants and seeds before and after a
change of the training code, with the difference in test mIoU.

    python benchmarks/wsss_synth_compare.py \\
        --before benchmarks/results/wsss_core15_gpu/pre15/wsss_synth \\
        --after benchmarks/results/wsss_warmup_gpu/off/wsss_synth --variants bf \\
        --out benchmarks/results/wsss_core15_gpu/compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (
    ("miou", "mIoU (test)"),
    ("cam_miou_predicted_labels", "CAM mIoU, own labels"),
    ("cam_miou", "CAM mIoU, GT labels"),
    ("cpl_miou", "CPL mIoU"),
    ("miou_label_masked", "label-masked mIoU"),
)


def _rows(folder: Path, variants: str) -> dict[tuple[str, int], dict]:
    rows = {}
    for path in sorted(folder.glob("*_seed*.json")):
        row = json.loads(path.read_text())["row"]
        if row["variant"] in variants:
            rows[(row["variant"], row["seed"])] = row
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="rows folder of the old run")
    parser.add_argument("--after", type=Path, required=True, help="rows folder of the new run")
    parser.add_argument("--variants", default="bf")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--caption", default="", help="a paragraph above the table")
    args = parser.parse_args()
    before, after = _rows(args.before, args.variants), _rows(args.after, args.variants)
    keys = sorted(before.keys() & after.keys())
    lines = [args.caption, ""] if args.caption else []
    lines += [
        "| | variant | seed | run | " + " | ".join(name for _, name in COLUMNS) + " | s/it |",
        "|---|---|---:|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    deltas: dict[str, list[float]] = {}
    for key in keys:
        old, new = before[key], after[key]
        for label, row in (("before", old), ("after", new)):
            cells = " | ".join(_pct(row.get(column)) for column, _ in COLUMNS)
            lines.append(
                f"| {key[0]} | {row['description']} | {key[1]} | {label} | {cells} | "
                f"{row['sec_per_iter']:.2f} |"
            )
        change = " | ".join(
            "-" if old.get(c) is None or new.get(c) is None else f"{100 * (new[c] - old[c]):+.1f}"
            for c, _ in COLUMNS
        )
        lines.append(f"| {key[0]} | | {key[1]} | change | {change} | |")
        deltas.setdefault(key[0], []).append(new["miou"] - old["miou"])
    lines.append("")
    for variant, values in sorted(deltas.items()):
        lines.append(
            f"Variant {variant}: test mIoU change {100 * sum(values) / len(values):+.1f} points "
            f"on average over {len(values)} seed(s) ("
            + ", ".join(f"{100 * v:+.1f}" for v in values)
            + ")."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"before": [before[k] for k in keys], "after": [after[k] for k in keys]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
