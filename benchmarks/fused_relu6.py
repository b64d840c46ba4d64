"""ReLU6 inside the folded convolution (oneDNN) against conv then in-place clamp, layer by layer.

`FoldedNetwork` runs each of the teacher's conv -> BatchNorm -> ReLU6 triples as one
`mkldnn::_convolution_pointwise` call on the CPU without autograd (`cosa.model.folding`). This
records the input of every such layer during one teacher forward at the demo's largest scale
(16 images: 8 and their flips, 240 x 240, channels_last as in training), then times the fused call
against the unfused pass (the conv module, then `clamp_`) on those inputs, taking turns call by call
(`cosa.serving.benchmark.time_calls`), and checks that both give the same values.

    python benchmarks/fused_relu6.py

Results go to OUT/NAME.json and OUT/NAME.md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from cosa.allocator import keep_freed_memory
from cosa.config import preset
from cosa.files import write_text_atomic
from cosa.model import build_model, make_teacher
from cosa.model.folding import FoldedNetwork, _ConvReLU6
from cosa.serving.benchmark import time_calls


def layer_inputs(batch: int, size: int) -> list[tuple[str, _ConvReLU6, torch.Tensor]]:
    """(name, layer, input) of every ReLU6 conv of the demo teacher, from one forward pass."""
    torch.manual_seed(0)
    cfg = preset("demo").model
    student = build_model(cfg, num_classes=10, load_pretrained=False)
    teacher = make_teacher(student, copy_heads=True).eval().to(memory_format=torch.channels_last)
    twin = FoldedNetwork(teacher).refreshed()
    seen: list[tuple[str, _ConvReLU6, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.append((name, m, args[0].clone()))
        )
        for name, module in twin.named_modules()
        if isinstance(module, _ConvReLU6)
    ]
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        twin(images)
    for hook in hooks:
        hook.remove()
    return seen


@torch.no_grad()
def time_layer(name: str, layer: _ConvReLU6, x: torch.Tensor, repeats: int) -> dict:
    """p50 ms of the fused call and of conv then `clamp_` on input `x`, and their largest gap."""
    conv = layer.conv

    def unfused() -> torch.Tensor:
        return conv(x).clamp_(0.0, 6.0)

    stats = time_calls(
        {"fused": lambda: layer(x), "unfused": unfused}, batch=len(x), warmup=2, repeats=repeats
    )
    return {
        "layer": name,
        "input": list(x.shape),
        "kernel": conv.kernel_size[0],
        "groups": conv.groups,
        "fused_ms": stats["fused"].p50_ms,
        "unfused_ms": stats["unfused"].p50_ms,
        "max_abs_diff": float((layer(x) - unfused()).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="8 images and their flips")
    parser.add_argument("--size", type=int, default=240, help="the demo's 160 px crop at 1.5x")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="fused_relu6")
    args = parser.parse_args()
    keep_freed_memory()  # as every `cosa` command runs

    rows = [
        time_layer(name, layer, x, args.repeats)
        for name, layer, x in layer_inputs(args.batch, args.size)
    ]
    fused_total = sum(r["fused_ms"] for r in rows)
    unfused_total = sum(r["unfused_ms"] for r in rows)
    report = {
        "batch": args.batch,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "layers": rows,
        "fused_total_ms": fused_total,
        "unfused_total_ms": unfused_total,
    }
    lines = [
        "# ReLU6 fused into the folded convolution, layer by layer",
        "",
        f"The demo teacher's {len(rows)} conv + ReLU6 layers at its largest scale "
        f"({args.batch} x 3 x {args.size} x {args.size}, channels_last, untrained weights), "
        f"{report['threads']} threads, {report['machine']}; p50 over {args.repeats} calls each, "
        "taking turns. Command: "
        "`python benchmarks/fused_relu6.py`.",
        "",
        f"All layers: fused {fused_total:.1f} ms, conv then clamp_ {unfused_total:.1f} ms, "
        f"ratio {fused_total / unfused_total:.2f}; largest difference in values "
        f"{max(r['max_abs_diff'] for r in rows):.1e}.",
        "",
        "| layer | input | kernel / groups | fused ms | conv + clamp_ ms | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['input']))} | {r['kernel']} / {r['groups']} | "
            f"{r['fused_ms']:.2f} | {r['unfused_ms']:.2f} | {r['fused_ms'] / r['unfused_ms']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:7]))


if __name__ == "__main__":
    main()
