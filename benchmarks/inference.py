"""Inference benchmark: torch eager vs onnxruntime FP32 / FP16 / INT8 (TensorRT where available).

For the demo network (EfficientNet-Lite0 + LargeFOV, decoder 128: `--checkpoint CKPT` or, without
one, an untrained model with the shipped ImageNet encoder weights) and for a ViT-S/16 (random init:
speed only; its plain model.onnx and the onnxruntime-fused model.ort.onnx of
`cosa.export.fusion`, both checked against torch first), measured side by side in one process at
the same input size:

  * latency p50/p95 (ms per batch) and images/s at batch 1 and 8, each runtime with the same number
    of intra-op threads (`--threads`, default: all cores), onnxruntime with ORT_ENABLE_ALL;
  * each artifact's mIoU on the synthetic test split at native image size (only meaningful with a
    trained `--checkpoint`; the untrained demo model's mIoU is reported but says nothing), its mask
    agreement with FP32, and the INT8 mIoU drop;
  * a small onnxruntime settings sweep (optimisation level x threads) and onnxruntime's per-op-type
    profile of the FP32 graphs, which say where the time goes.

Timing (round robin, call by call), mask agreement and mIoU are the library's, the code `cosa
benchmark` measures with: `cosa.serving.benchmark.time_calls` and `mask_agreement`, and
`cosa.evaluation.evaluate` (as `cosa eval`). Artifacts come from `cosa.export.export_artifacts`
(FP32 + INT8 Q/DQ + the INT8 CPU flavour, calibrated on synthetic train images), FP16 from
`cosa.export.fp16`. Results go to `benchmarks/results/inference.json` and `inference.md`.

    python benchmarks/inference.py [--checkpoint runs/demo/checkpoints/best.pt] [--size 448]
    python benchmarks/inference.py --models vit_s   # re-measure ViT-S only, keep the demo rows

Timings on a shared machine are noisy: compare ratios from one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosa.checkpoint import Checkpoint, load_deploy_model, save_checkpoint
from cosa.config import ModelConfig, preset
from cosa.data import DatasetIndex, open_dataset, write_synthetic_dataset
from cosa.evaluation.evaluate import evaluate
from cosa.export.fp16 import convert_to_fp16
from cosa.export.fusion import fuse_vit, vit_attention_shape
from cosa.export.layout import FILES, Role, Runtime, choose_artifact
from cosa.export.onnx_export import export_onnx
from cosa.export.pipeline import ExportOptions, export_artifacts
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME
from cosa.export.verify import (
    DEFAULT_SHAPES,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    compare,
    onnxruntime_runner,
    random_images,
)
from cosa.export.verify import torch_runner as verify_torch_runner
from cosa.files import write_text_atomic
from cosa.model import DeployModel, build_model
from cosa.serving.benchmark import LatencyStats, mask_agreement, time_calls

logger = logging.getLogger("benchmarks.inference")

RESULTS = Path(__file__).resolve().parent / "results"
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
TARGETS = {"demo": 2.0, "vit_s": 1.2}  # ORT FP32 speed-up over torch eager (issue 4)
PLAIN_FP32 = "model.onnx (fp32)"
FUSED_FP32 = "model.ort.onnx (fp32, fused)"
SERVED_FP32 = {"demo": PLAIN_FP32, "vit_s": FUSED_FP32}
"""The FP32 graph the onnxruntime runner runs for each model (serving.runners prefers the fused
ViT graph when the export wrote one): the target's artifact."""
SECTIONS = ("demo", "vit_s")
MAX_INT8_MIOU_DROP = 1.0  # points


@dataclass
class Row:
    """One runtime/artifact of one model at one batch size."""

    model: str
    runtime: str
    artifact: str
    batch: int
    p50_ms: float
    p95_ms: float
    images_per_s: float
    speedup_vs_torch: float | None = None
    miou: float | None = None
    mask_agreement_vs_fp32: float | None = None


# ------------------------------------------------------------------------------------ runners


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, mask = model(torch.from_numpy(images))
        return logits.numpy(), mask.numpy()

    return run


def ort_session(
    path: Path,
    threads: int,
    level: str = "ORT_ENABLE_ALL",
    profile_prefix: str | None = None,
    spinning: bool = False,
) -> Any:
    """A CPU session: `threads` intra-op threads, sequential, optimisation `level`; `spinning`
    lets idle pool threads busy-wait between operators (onnxruntime's default, but off by
    default here as in `serving.runners.OnnxRuntimeRunner`: on 2 shared cores busy-waiting
    threads take time from the working ones)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: Any) -> Runner:
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = session.run([LOGITS_NAME, MASK_NAME], {INPUT_NAME: images})
        return logits, mask

    return run


def measure(
    runs: dict[Any, Runner], images: np.ndarray, warmup: int, repeats: int
) -> dict[Any, LatencyStats]:
    """Latency of each `run(images)` over `repeats` timed calls, the runners taking turns call by
    call (`cosa.serving.benchmark.time_calls`, what `cosa benchmark` measures with)."""
    calls = {key: functools.partial(run, images) for key, run in runs.items()}
    return time_calls(calls, images.shape[0], warmup=warmup, repeats=repeats)


# ------------------------------------------------------------------------------------ accuracy


def score_split(run: Runner, index: DatasetIndex, count: int) -> tuple[float, list[np.ndarray]]:
    """(mIoU in points, masks) of the first `count` images of `index`, one image per call at its
    native size, scored by `cosa.evaluation.evaluate` as `cosa eval` and `cosa benchmark` do."""
    masks: list[np.ndarray] = []

    def predict(image: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        logits, mask = run(batch)
        masks.append(mask[0])
        return logits[0]

    result = evaluate(predict, index, protocol="deploy", max_images=count)
    return 100.0 * (result.miou or 0.0), masks


# ------------------------------------------------------------------------------------ profiling


def ort_profile(path: Path, images: np.ndarray, threads: int, runs: int, work: Path) -> dict:
    """Share of node time per op type over `runs` calls, from onnxruntime's profiler."""
    return ort_profile_ms(path, images, threads, runs, work)["share"]


def ort_profile_ms(path: Path, images: np.ndarray, threads: int, runs: int, work: Path) -> dict:
    """onnxruntime's profiler over `runs` calls after one warm-up: {"share": % of node time per
    op type (top 8), "ms": ms per call per op type (top 8), "total_ms": node ms per call}."""
    prefix = work / f"profile_{path.stem}_{images.shape[0]}"
    session = ort_session(path, threads, profile_prefix=str(prefix))
    for _ in range(runs + 1):
        session.run(None, {INPUT_NAME: images})
    trace = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    warmed = calls[0][1] if len(calls) > 1 else 0  # node events after the warm-up call only
    per_op: Counter[str] = Counter()
    for event in trace:
        if (
            event.get("cat") == "Node"
            and event.get("name", "").endswith("_kernel_time")
            and event["ts"] >= warmed
        ):
            per_op[event["args"].get("op_name", "?")] += int(event["dur"])
    timed = max(1, len(calls) - 1)
    total = sum(per_op.values()) or 1
    top = per_op.most_common(8)
    return {
        "share": {op: round(100.0 * dur / total, 1) for op, dur in top},
        "ms": {op: round(dur / 1e3 / timed, 1) for op, dur in top},
        "total_ms": round(total / 1e3 / timed, 1),
    }


def torch_profile(model: torch.nn.Module, images: np.ndarray) -> dict:
    """Share of CPU self time per aten op of one torch eager call."""
    return torch_profile_ms(model, images)["share"]


def torch_profile_ms(model: torch.nn.Module, images: np.ndarray) -> dict:
    """torch's profiler over one call after a warm-up: like `ort_profile_ms` (aten ops)."""
    x = torch.from_numpy(images)
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "share": {e.key: round(100.0 * e.self_cpu_time_total / total, 1) for e in top},
        "ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top},
        "total_ms": round(total / 1e3, 1),
    }


# ------------------------------------------------------------------------------------ models


def demo_checkpoint(
    args: argparse.Namespace,
    work: Path,
    class_names: tuple[str, ...],
    palette: tuple[tuple[int, int, int], ...],
) -> tuple[Path, bool]:
    """The checkpoint to benchmark and whether its mIoU means anything (trained or not)."""
    if args.checkpoint:
        return Path(args.checkpoint), True
    cfg = preset("demo")
    torch.manual_seed(0)
    net = build_model(cfg.model, num_classes=len(class_names) - 1, load_pretrained=True)
    state = net.state_dict()
    path = work / "untrained_demo.pt"
    save_checkpoint(
        Checkpoint(
            config=cfg,
            class_names=list(class_names),
            palette=[list(c) for c in palette],
            iteration=0,
            online=state,
            teacher=state,
        ),
        path,
    )
    return path, False


def synthetic_data(args: argparse.Namespace, work: Path) -> Path:
    if args.data:
        return Path(args.data)
    root = work / "synth"
    write_synthetic_dataset(
        root, n_train=args.calib_images, n_val=0, n_test=args.miou_images, seed=0
    )
    return root


def calibration_folder(root: Path, count: int, work: Path) -> Path:
    """Train-split images only (never the test images the mIoU is measured on)."""
    folder = work / "calib"
    folder.mkdir()
    for sample in open_dataset(root, "train").samples[:count]:
        shutil.copy(sample.image_path, folder / sample.image_path.name)
    return folder


# ------------------------------------------------------------------------------------ main


def timing_rows(
    model_name: str, runners: dict[tuple[str, str], Runner], size: int, args: argparse.Namespace
) -> list[Row]:
    """Rows at batch 1 and 8; `runners` must start with torch eager (the speed-up reference)."""
    rows = []
    for batch in (1, 8):
        images = random_images([(batch, size, size)], seed=batch)[0]
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 3)
        logger.info("timing %s at batch %d (%d rounds)", model_name, batch, repeats)
        stats = measure(runners, images, warmup=1, repeats=repeats)
        eager = stats[next(iter(runners))].p50_ms
        for (runtime, artifact), timed in stats.items():
            rows.append(
                Row(
                    model_name,
                    runtime,
                    artifact,
                    batch,
                    round(timed.p50_ms, 1),
                    round(timed.p95_ms, 1),
                    round(timed.images_per_s, 2),
                    round(eager / timed.p50_ms, 2),
                )
            )
    return rows


def settings_sweep(
    path: Path, size: int, args: argparse.Namespace, spinning: bool = False
) -> list[dict]:
    """Batch-1 p50 of `path` per optimisation level x threads (+ spinning on, if `spinning`)."""
    images = random_images([(1, size, size)])[0]
    settings = [
        (level, threads, False)
        for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
        for threads in sorted({1, args.threads})
    ]
    if spinning:
        settings.append(("ORT_ENABLE_ALL", args.threads, True))
    runs = {key: ort_runner(ort_session(path, key[1], key[0], spinning=key[2])) for key in settings}
    stats = measure(runs, images, warmup=1, repeats=max(3, args.repeats // 2))
    return [
        {"level": level, "threads": threads, "spinning": spin, "p50_ms": round(timed.p50_ms, 1)}
        for (level, threads, spin), timed in stats.items()
    ]


def run_demo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = synthetic_data(args, work)
    test = open_dataset(root, "test")
    samples = list(test.samples[: args.miou_images])
    ckpt_path, trained = demo_checkpoint(args, work, test.class_names, test.palette)
    model, ckpt = load_deploy_model(ckpt_path)
    torch.set_num_threads(args.threads)

    export_dir = work / "demo_export"
    calib_dir = calibration_folder(root, args.calib_images, work)
    options = ExportOptions(
        precision="int8",
        calib_dir=calib_dir,
        calib_size=args.calib_images,
        calib_method=args.calib_method,
    )
    started = time.perf_counter()
    result = export_artifacts(ckpt_path, export_dir, options)
    export_seconds = time.perf_counter() - started
    fp32 = export_dir / FILES[Role.FP32]
    fp16 = convert_to_fp16(fp32, work / FILES[Role.FP16])
    fp16_check = compare(
        onnxruntime_runner(fp16),
        onnxruntime_runner(fp32),
        random_images([(1, 224, 224), (1, 333, 517)]),
        artifact=fp16.name,
        reference_name=fp32.name,
        images_name="random",
        tolerance=FP16_TOLERANCE,
    ).to_json_dict()

    runners: dict[tuple[str, str], Runner] = {
        ("torch eager", "checkpoint"): torch_runner(model),
        ("onnxruntime", "model.onnx (fp32)"): ort_runner(ort_session(fp32, args.threads)),
        ("onnxruntime", "model.fp16.onnx"): ort_runner(ort_session(fp16, args.threads)),
        ("onnxruntime", "model.int8.onnx (s8 Q/DQ, TensorRT file)"): ort_runner(
            ort_session(export_dir / FILES[Role.INT8], args.threads)
        ),
        ("onnxruntime", "model.int8_cpu.onnx (u8s8 QOperator)"): ort_runner(
            ort_session(export_dir / FILES[Role.INT8_CPU], args.threads)
        ),
    }
    rows = timing_rows("demo efficientnet_lite0", runners, args.size, args)

    masks, scores = {}, {}
    for key, run in runners.items():
        logger.info("segmenting the test split: %s %s", *key)
        score, masks[key] = score_split(run, test, len(samples))
        scores[key] = round(score, 2)
    fp32_key = ("onnxruntime", "model.onnx (fp32)")
    agreements = {key: round(mask_agreement(m, masks[fp32_key]), 4) for key, m in masks.items()}
    for row in rows:
        row.miou = scores[(row.runtime, row.artifact)]
        row.mask_agreement_vs_fp32 = agreements[(row.runtime, row.artifact)]
    fp32_miou = scores[fp32_key]
    int8_drop = {
        artifact: round(fp32_miou - score, 2)
        for (_, artifact), score in scores.items()
        if "int8" in artifact
    }
    # The TensorRT file's accuracy as TensorRT computes it: Q/DQ evaluated exactly, without
    # onnxruntime's x86 int8 kernels (see cosa.export.verify.onnxruntime_runner).
    exact_runner = onnxruntime_runner(export_dir / FILES[Role.INT8], optimize=False)
    # The INT8 file `cosa segment` / `cosa eval` run in onnxruntime on this machine.
    chosen_int8 = choose_artifact(export_dir, result.spec, Runtime.ONNXRUNTIME, "int8")
    exact_score, exact_masks = score_split(exact_runner, test, len(samples))
    exact_miou = round(exact_score, 2)

    image = random_images([(1, args.size, args.size)])[0]
    return {
        "rows": [asdict(r) for r in rows],
        "trained": trained,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "miou_images": len(samples),
        "calibration": result.spec.calibration | {"source": "synthetic train split"},
        "export_seconds": round(export_seconds, 1),
        "verification": result.spec.verification,
        "fp16_verification": fp16_check,
        "int8_miou_drop": int8_drop,
        "int8_qdq_exact_miou": exact_miou,
        "int8_qdq_exact_miou_drop": round(fp32_miou - exact_miou, 2),
        "int8_qdq_exact_agreement": round(mask_agreement(exact_masks, masks[fp32_key]), 4),
        "int8_chosen_here": chosen_int8.path.name,
        "ort_sweep": settings_sweep(fp32, args.size, args),
        "ort_spinning": False,
        "ort_profile_fp32": ort_profile(fp32, image, args.threads, 3, work),
        "torch_profile": torch_profile(model, image),
    }


def run_vit_s(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """ViT-S/16 (random init): torch eager vs the plain and the onnxruntime-fused FP32 graph."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model(
        ModelConfig(backbone="vit_small_patch16", decoder_channels=128),
        num_classes=10,
        load_pretrained=False,
    )
    model = DeployModel(net).eval()
    plain = export_onnx(model, work / "model.onnx")
    attention = vit_attention_shape(model)
    assert attention is not None  # a ViT
    fusion = fuse_vit(plain, work / "model.ort.onnx", *attention)
    # The same check as the export pipeline's (random images at DEFAULT_SHAPES, two of them not
    # multiples of 16), so the timed graphs are known to compute the network.
    images = random_images(DEFAULT_SHAPES)
    verification = {
        name: compare(
            onnxruntime_runner(path),
            verify_torch_runner(model),
            images,
            artifact=path.name,
            reference_name="torch eager fp32",
            images_name="uniform random RGB in [0, 255], seed 0",
            tolerance=FP32_TOLERANCE,
        ).to_json_dict()
        for name, path in ((PLAIN_FP32, plain), (FUSED_FP32, work / "model.ort.onnx"))
    }
    fused = work / "model.ort.onnx"
    runners = {
        ("torch eager", "random init"): torch_runner(model),
        ("onnxruntime", PLAIN_FP32): ort_runner(ort_session(plain, args.threads)),
        ("onnxruntime", FUSED_FP32): ort_runner(ort_session(fused, args.threads)),
    }
    rows = timing_rows("ViT-S/16 (random init)", runners, args.size, args)
    profiles: dict[str, Any] = {}
    for batch in (1, 8):
        image = random_images([(batch, args.size, args.size)])[0]
        runs = 3 if batch == 1 else 1
        profiles[str(batch)] = {
            "torch": torch_profile_ms(model, image),
            "onnxruntime model.onnx": ort_profile_ms(plain, image, args.threads, runs, work),
            "onnxruntime model.ort.onnx": ort_profile_ms(fused, image, args.threads, runs, work),
        }
    return {
        "rows": [asdict(r) for r in rows],
        "fusion": asdict(fusion),
        "verification": verification,
        "ort_sweep": settings_sweep(fused, args.size, args, spinning=True),
        "ort_spinning": False,
        "ort_profile_fp32": profiles["1"]["onnxruntime model.ort.onnx"]["share"],
        "torch_profile": profiles["1"]["torch"]["share"],
        "profiles": profiles,
    }


def tensorrt_status() -> str:
    try:
        from cosa.export.tensorrt_build import require_tensorrt

        trt, gpu = require_tensorrt()
    except Exception as exc:  # report why, whatever it is; the CPU rows still stand
        return f"not measured: {exc}"
    return f"available (TensorRT {trt.__version__}, {gpu}); engine timing not implemented here"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Inference benchmark ({report['date']})",
        "",
        f"Machine: {report['machine']}. Threads: {report['threads']} (torch intra-op and "
        "onnxruntime intra-op; onnxruntime inter-op 1, sequential, ORT_ENABLE_ALL, "
        "session.intra_op.allow_spinning "
        + ", ".join(
            f"{'on' if report[s].get('ort_spinning', True) else 'off'} ({s})" for s in SECTIONS
        )
        + " (off is how serving.runners.OnnxRuntimeRunner opens sessions)). "
        f"Input {report['size']}x{report['size']}. Shared machine: timings are noisy; compare "
        "ratios within one model's rows (each model's runtimes are timed round robin, call by "
        "call, in one run).",
    ]
    for section in SECTIONS:
        if report[section].get("date", report["date"]) != report["date"]:
            lines += [
                "",
                f"The {section} rows are from the run of {report[section]['date']} "
                f"({report[section]['machine']}); this run measured "
                f"{', '.join(report['measured'])} only.",
            ]
    lines += [
        "",
        "| model | runtime | artifact | batch | p50 ms | p95 ms | images/s | vs torch | mIoU | "
        "mask agr. vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any, missing: str = "") -> str:
        return missing if value is None else str(value)

    for section in SECTIONS:
        for r in report[section]["rows"]:
            lines.append(
                f"| {r['model']} | {r['runtime']} | {r['artifact']} | {r['batch']} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['images_per_s']} | "
                f"{cell(r['speedup_vs_torch'])} | {cell(r['miou'], 'n/a')} | "
                f"{cell(r['mask_agreement_vs_fp32'])} |"
            )
    demo = report["demo"]
    lines += [
        "",
        f"mIoU on {demo['miou_images']} synthetic test images at native size"
        + (
            "."
            if demo["trained"]
            else " from an UNTRAINED demo model (ImageNet encoder, random heads): not meaningful; "
            "pass --checkpoint for real numbers."
        ),
        f"INT8 mIoU drop vs FP32 (points): {demo['int8_miou_drop']}; the Q/DQ file evaluated "
        f"exactly (Q/DQ arithmetic as TensorRT computes it, onnxruntime graph optimisations off): "
        f"mIoU {demo['int8_qdq_exact_miou']}, drop {demo['int8_qdq_exact_miou_drop']}, mask "
        f"agreement with FP32 {demo['int8_qdq_exact_agreement']}. Target: drop <= "
        f"{MAX_INT8_MIOU_DROP}. The Q/DQ file's row above runs onnxruntime's x86 int8 kernels, "
        "whose u8 x s8 products saturate on this AVX2 CPU without VNNI: its accuracy there is "
        "the kernel's, not the model's.",
        f"INT8 file `cosa segment` runs in onnxruntime on this machine "
        f"(`cosa.export.layout.choose_artifact`): {demo.get('int8_chosen_here', 'not recorded')}.",
        f"TensorRT: {report['tensorrt']}.",
        "",
        "Targets (speed-up over torch eager of the FP32 graph the onnxruntime runner serves: "
        "model.onnx for the demo CNN, model.ort.onnx for the ViT): "
        + ", ".join(
            f"{name} >= {target}x: batch 1 {report['speedups'][name].get('1')}x, batch 8 "
            f"{report['speedups'][name].get('8')}x"
            for name, target in TARGETS.items()
        ),
    ]
    vit = report["vit_s"]
    if vit.get("fusion"):
        fusion, checks = vit["fusion"], vit["verification"]
        lines += [
            "",
            f"ViT-S model.ort.onnx (`cosa.export.fusion.fuse_vit`, the export's `ort_fusion`): "
            f"{fusion['attention_layers']} attention sub-graphs -> MultiHeadAttention, fused ops "
            f"{fusion['fused_ops']}, nodes {fusion['nodes_before']} -> {fusion['nodes_after']}. "
            "Checked against torch eager at "
            + ", ".join("x".join(map(str, s["shape"])) for s in checks[FUSED_FP32]["shapes"])
            + ": "
            + "; ".join(
                f"{name} max |diff| {c['max_abs_diff']:.2g}, mask agreement "
                f"{c['min_mask_agreement']}"
                for name, c in checks.items()
            )
            + ".",
        ]
    lines += [
        "",
        "onnxruntime FP32 settings sweep, batch 1 (p50 ms; demo: model.onnx, vit_s: "
        "model.ort.onnx; spinning = session.intra_op.allow_spinning):",
        "",
    ]
    for section in SECTIONS:
        sweep = ", ".join(
            f"{s['level'].removeprefix('ORT_ENABLE_').lower()}/{s['threads']}t"
            f"{'/spin' if s.get('spinning', True) else '/no-spin'} {s['p50_ms']}"
            for s in report[section]["ort_sweep"]
        )
        lines.append(f"- {section}: {sweep}")
    lines += ["", "Where the time goes (share of op time, batch 1):", ""]
    for section in SECTIONS:
        ort_ops = ", ".join(f"{k} {v}%" for k, v in report[section]["ort_profile_fp32"].items())
        torch_ops = ", ".join(f"{k} {v}%" for k, v in report[section]["torch_profile"].items())
        lines += [f"- {section} onnxruntime: {ort_ops}", f"- {section} torch: {torch_ops}"]
    if vit.get("profiles"):
        lines += [
            "",
            "ViT-S per op type, ms per call (profilers on, one runtime at a time, so "
            "absolute numbers carry the machine's load at that moment):",
            "",
        ]
        for batch, runtimes in vit["profiles"].items():
            for runtime, profile in runtimes.items():
                ops = ", ".join(f"{k} {v}" for k, v in profile["ms"].items())
                lines.append(f"- batch {batch}, {runtime} (total {profile['total_ms']} ms): {ops}")
        lines += [
            "",
            "GEMM vs attention, ms per call (torch aten::addmm + "
            "scaled_dot_product_attention vs onnxruntime MatMul + MultiHeadAttention of "
            "model.ort.onnx):",
            "",
        ]
        for batch, runtimes in vit["profiles"].items():
            torch_split = _split(runtimes["torch"], "aten::addmm", "scaled_dot_product")
            ort_split = _split(
                runtimes["onnxruntime model.ort.onnx"], "MatMul", "MultiHeadAttention"
            )
            lines.append(
                f"- batch {batch}: GEMM {torch_split[0]} vs {ort_split[0]}, attention "
                f"{torch_split[1]} vs {ort_split[1]}, everything else {torch_split[2]} vs "
                f"{ort_split[2]}"
            )
        lines += ["", *vit_findings(report)]
    return "\n".join(lines) + "\n"


def vit_findings(report: dict[str, Any]) -> list[str]:
    """Why the ViT-S batch-8 ratio is what it is, computed from the batch-8 profiles."""
    vit = report["vit_s"]
    speedup = report["speedups"]["vit_s"].get("8")
    batch8 = vit["profiles"]["8"]
    torch_split = _split(batch8["torch"], "aten::addmm", "scaled_dot_product")
    ort_split = _split(batch8["onnxruntime model.ort.onnx"], "MatMul", "MultiHeadAttention")
    ort_total = sum(ort_split)
    met = speedup is not None and speedup >= TARGETS["vit_s"]
    return [
        f"ViT-S batch 8: {'target met' if met else 'target NOT met'} ({speedup}x with "
        f"model.ort.onnx). In its profile the linear layers' GEMMs take "
        f"{100 * ort_split[0] / ort_total:.0f}% of onnxruntime's time and run at "
        f"{torch_split[0] / max(ort_split[0], 1e-9):.2f}x torch's MKL `addmm` speed; fusion "
        "removes only the rest (attention as MultiHeadAttention: "
        f"{torch_split[1] / max(ort_split[1], 1e-9):.2f}x torch's flash attention; LayerNorm, "
        f"GELU, residuals and copies: {torch_split[2]} vs {ort_split[2]} ms). Per image, torch's "
        "GEMMs (785 rows at batch 1) and its work outside them are both much slower at batch 1 "
        "than at batch 8 (see the batch-1 profile above): that, not fusion, is onnxruntime's "
        "batch-1 lead. More at batch 8 in FP32 needs faster GEMMs than MLAS/MKL give on 2 AVX2 "
        "cores (another precision or other hardware), not more graph fusion.",
    ]


def _split(profile: dict, gemm: str, attention: str) -> tuple[float, float, float]:
    """(GEMM, attention, rest) ms per call of an `*_profile_ms` result (top-8 ops named)."""
    ms = profile["ms"]
    gemm_ms = sum(v for k, v in ms.items() if k == gemm)
    attention_ms = sum(v for k, v in ms.items() if attention in k)
    rest = profile["total_ms"] - gemm_ms - attention_ms
    return round(gemm_ms, 1), round(attention_ms, 1), round(rest, 1)


def previous_sections(path: Path) -> dict[str, Any]:
    """Sections of an earlier result file, each stamped with its run's date and machine."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return {
        name: {"date": old["date"], "machine": old["machine"], **old[name]}
        for name in SECTIONS
        if name in old
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="trained demo checkpoint (else untrained: no mIoU)")
    parser.add_argument("--data", help="synthetic dataset root (else a small one is generated)")
    parser.add_argument("--size", type=int, default=448, help="square input size for timing")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls at batch 1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--miou-images", type=int, default=40)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--calib-method", default="entropy")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="inference", help="result file stem")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="models to measure; the others' sections are kept from the "
        "existing result file (stamped with their own date)",
    )
    parser.add_argument("--skip-vit", action="store_true", help="same as --models demo")
    args = parser.parse_args()
    models = ["demo"] if args.skip_vit else list(dict.fromkeys(args.models))
    # onnxruntime's quantizer logs every weight-scale adjustment on the root logger: keep it quiet.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("benchmarks", "cosa"):
        logging.getLogger(name).setLevel(logging.INFO)

    previous = previous_sections(args.out / f"{args.name}.json")
    missing = [name for name in SECTIONS if name not in models and name not in previous]
    if missing:
        parser.error(f"no earlier results for {missing} in {args.out}; measure them too")
    work = Path(tempfile.mkdtemp(prefix="cosa-bench-"))
    try:
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"load avg {os.getloadavg()[0]:.1f} at start",
            "measured": models,
            "threads": args.threads,
            "size": args.size,
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "tensorrt": tensorrt_status(),
        }
        runs = {"demo": run_demo, "vit_s": run_vit_s}
        for name in SECTIONS:
            report[name] = runs[name](args, work) if name in models else previous[name]
        report["speedups"] = {
            name: {
                str(r["batch"]): r["speedup_vs_torch"]
                for r in report[name]["rows"]
                if r["artifact"] == SERVED_FP32[name]
            }
            for name in TARGETS
        }
        report["load_avg_end"] = round(os.getloadavg()[0], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / f"{args.name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
