"""`cosa`: the command-line interface. Thin: parse, call one library function, print, set exit code.

Exit codes: 0 ok, 1 some inputs failed (segment) or a multi-node run lost a rank, 2 usage or
configuration error. Library errors (`cosa.errors.CosaError`) become one line on stderr, never a
traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cosa.choices import (
    DEFAULT_EVAL_SCALES,
    Backend,
    CalibrationMethod,
    Device,
    EvalProtocol,
    InstanceKind,
    MaskFormat,
    OrtFusion,
    Platform,
    Precision,
    Preset,
    SegmentEngine,
    WireProtocol,
)
from cosa.errors import CosaError
from cosa.serving.triton_names import DEFAULT_MODEL_NAME, ServerPorts
from cosa.train.rendezvous import DEFAULT_TIMEOUT_S as DEFAULT_RDZV_TIMEOUT_S

app = typer.Typer(
    help="CoSA toolkit: weakly supervised segmentation from image-level labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: check a folder, write the synthetic benchmark.", no_args_is_help=True
)
triton_app = typer.Typer(
    help="Triton Inference Server: repository, local server, set-up.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(triton_app, name="triton")

out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(func: F) -> F:
    """Turn library errors into one line on stderr and their exit code (2 mostly; Ctrl-C: 130)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CosaError as exc:
            # escape: a message may hold brackets ("cosa-toolkit[ray]") that are not markup
            err_console.print(
                f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# Options several commands share, declared once.
TritonUrl = Annotated[str | None, typer.Option(help="Triton HOST:PORT (backend triton).")]
TritonProtocol = Annotated[WireProtocol, typer.Option(help="Triton protocol (backend triton).")]


def print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------- data


@data_app.command("synth")
@reports_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (VOC layout).", metavar="OUT")],
    train: Annotated[int, typer.Option(help="Training images.")] = 400,
    val: Annotated[int, typer.Option(help="Validation images (checkpoint selection).")] = 60,
    test: Annotated[
        int, typer.Option(help="Test images (reported, never used for selection).")
    ] = 100,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
) -> None:
    """Write the synthetic weakly supervised benchmark (masks, classes.json, image labels)."""
    from cosa.data import write_synthetic_dataset

    summary = write_synthetic_dataset(out, train, val, test, seed=seed)
    out_console.print(f"wrote {summary} to {out}")


PROBLEMS_SHOWN = 20  # per severity in the text report; --json lists every one


@data_app.command("check")
@reports_errors
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder (any layout).", metavar="DIR")],
    train_split: Annotated[
        str, typer.Option(help="Split whose classes need 5+ images (a warning otherwise).")
    ] = "train",
    val_fraction: Annotated[
        float, typer.Option(help="Tagged folder without a split column: share drawn into val.")
    ] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of that draw.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate a dataset folder and summarise it; exit 2 on errors, 0 with warnings only."""
    from cosa.data.check import check_dataset

    report = check_dataset(
        root,
        train_split=train_split,
        val_fraction=val_fraction,
        split_seed=split_seed,
        progress=not json_,
    )
    if json_:
        print_json(report.to_json())
    else:
        _print_data_report(report)
    if report.errors:
        raise typer.Exit(2)


def _print_data_report(report: Any) -> None:
    derived = " (drawn: no split column)" if report.split_derived else ""
    out_console.print(
        f"{report.root}: {report.layout} layout, {len(report.class_names) - 1} classes from "
        f"{report.class_source}, splits {', '.join(report.splits) or 'none'}{derived}",
        highlight=False,
    )
    splits = Table(title="images per split")
    for column in ("split", "images", "with masks", "without tags"):
        splits.add_column(column, justify="left" if column == "split" else "right")
    for name, summary in report.splits.items():
        splits.add_row(
            name, str(summary.images), str(summary.with_masks), str(summary.without_tags)
        )
    out_console.print(splits)
    classes = Table(title="images per class")
    classes.add_column("class")
    for name in report.splits:
        classes.add_column(name, justify="right")
    for i, name in enumerate(report.class_names[1:]):
        counts = [str(s.per_class[name]) for s in report.splits.values()]
        classes.add_row(f"{i + 1} {name}", *counts)
    out_console.print(classes)
    if report.pairs:
        pairs = ", ".join(f"{a} + {b} ({n})" for a, b, n in report.pairs)
        out_console.print(f"most frequent class pairs: {pairs}", highlight=False)
    for kind, problems in (("error", report.errors), ("warning", report.warnings)):
        for problem in problems[:PROBLEMS_SHOWN]:
            err_console.print(f"{kind}: {problem}", highlight=False, soft_wrap=True)
        if len(problems) > PROBLEMS_SHOWN:
            err_console.print(
                f"... and {len(problems) - PROBLEMS_SHOWN} more {kind}s (--json lists all)"
            )
    sizes = f" (median long side {report.median_long_side} px)" if report.median_long_side else ""
    out_console.print(
        f"{len(report.errors)} errors, {len(report.warnings)} warnings; "
        f"{report.images_checked} images decoded{sizes}"
    )


# ------------------------------------------------------------------------------------------ train


@app.command()
@reports_errors
def train(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (checkpoints, metrics, pictures).")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset root (VOC/COCO/synthetic layout). "
            "Default: the embedded synthetic benchmark."
        ),
    ] = None,
    preset: Annotated[Preset, typer.Option(help="Starting configuration.")] = Preset.DEMO,
    config: Annotated[Path | None, typer.Option(help="YAML file of overrides.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="key=value override, repeatable (e.g. --set loss.seg_weight=0.2)."
        ),
    ] = None,
    max_iters: Annotated[int | None, typer.Option(help="Override train.max_iters.")] = None,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.AUTO,
    pretrained: Annotated[Path | None, typer.Option(help="Local backbone weights file.")] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint's assignment network (e.g. a second stage on "
            "`cosa pseudo` masks) instead of --pretrained."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue RUN from checkpoints/last.pt.")] = False,
    nproc: Annotated[
        int, typer.Option(help="DDP processes on this node (or launch with torchrun).")
    ] = 1,
    nnodes: Annotated[
        int, typer.Option(help="Nodes of the run, each running this command (docs/training.md).")
    ] = 1,
    node_rank: Annotated[
        int, typer.Option(help="This node's rank, 0 to nnodes-1; node 0 hosts the rendezvous.")
    ] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of node rank 0 (c10d rendezvous), the same on every node."),
    ] = None,
    rdzv_timeout: Annotated[
        int, typer.Option(help="Seconds a node waits for the other nodes to join.")
    ] = DEFAULT_RDZV_TIMEOUT_S,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train CoSA (online + EMA assignment network) from image-level labels."""
    from cosa.config import apply_overrides, resolve
    from cosa.errors import ConfigError
    from cosa.train.launch import launch, launch_nodes
    from cosa.train.rendezvous import node_group

    nodes = node_group(nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
    paths: dict[str, str] = {}  # set directly: a path is not parsed as YAML like --set values
    if data is not None:
        paths["data.root"] = str(data)
    if pretrained is not None:
        if not pretrained.is_file():
            raise ConfigError(
                f"--pretrained {pretrained} does not exist; pass a local weights file"
            )
        paths["model.pretrained"] = str(pretrained)
    if init is not None:
        if not init.is_file():
            raise ConfigError(f"--init {init} does not exist; pass a checkpoint of `cosa train`")
        paths["model.init_checkpoint"] = str(init)
    if resume and (set_ or paths or config is not None):
        raise ConfigError(
            "--resume continues a run with its own config.yaml; drop --set/--config/--data "
            "(only --max-iters may change)"
        )
    cfg = apply_overrides(resolve(preset.value, config, set_ or []), paths)
    run = dict(device=device.value, resume=resume, max_iters=max_iters, nproc=nproc)
    if nodes is None:
        result = launch(cfg, out, **run, progress=not json_)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
            return
    else:
        found = launch_nodes(cfg, out, nodes, **run, progress=not json_)
        if found is None:
            err_console.print(
                f"this node (--node-rank {nodes.node_rank}) finished its ranks; global rank 0 ran "
                "on another node, whose output reports the run",
                soft_wrap=True,
            )
            return
        result = found
    summary = result.to_json()
    if json_:
        print_json(summary)
        return
    out_console.print(f"run folder: {out}")
    out_console.print(
        f"checkpoints: {summary['last_checkpoint']} (best by {summary['selection_metric']} on "
        f"{summary.get('selection_split')}: {summary['best_checkpoint']})"
    )
    if summary.get("best_score") is not None:
        out_console.print(
            f"best {summary.get('selection_split')} {summary['selection_metric']} "
            f"{summary['best_score']:.4f} at iteration {summary['best_iteration']}"
        )
    if summary.get("test"):
        out_console.print(
            f"test mIoU {summary['test']['miou']:.4f} on split {summary['test']['split']}"
        )
    out_console.print(f"{summary['seconds_per_iter']:.3f} s/it")


# ------------------------------------------------------------------------------------------- eval

_SCALES = ",".join(map(str, DEFAULT_EVAL_SCALES))


@app.command("eval")
@reports_errors
def eval_(
    model: Annotated[
        Path, typer.Argument(help="Checkpoint (.pt) or export folder (spec.json).", metavar="MODEL")
    ],
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "val",
    protocol: Annotated[
        EvalProtocol,
        typer.Option(
            help="deploy: what `cosa segment` writes (native size, "
            "single scale); paper: 448x448, scales + flip; tta: native size, scales + flip "
            "(the CAM scores use them too)."
        ),
    ] = EvalProtocol.DEPLOY,
    scales: Annotated[str, typer.Option(help="Scales of the paper and tta protocols.")] = _SCALES,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Export folder: the network of this precision (default the export's); the "
            "file is the one `cosa segment` runs here."
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            help="Export folder: onnxruntime or tensorrt (auto: tensorrt when the export's "
            "primary file is an engine)."
        ),
    ] = Backend.AUTO,
    flip: Annotated[
        bool, typer.Option(help="Flip test-time augmentation (paper and tta protocols).")
    ] = True,
    cam: Annotated[
        bool, typer.Option(help="Also score CAM and CAM pseudo-labels (checkpoints).")
    ] = True,
    max_images: Annotated[int, typer.Option(help="Score only the first N images (0 = all).")] = 0,
    device: Annotated[Device, typer.Option()] = Device.AUTO,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """mIoU (plain, the headline), label-masked mIoU, CAM and pseudo-label quality."""
    scale_values = _parse_floats(scales, "--scales")
    if model.is_dir() or model.suffix in (".onnx", ".plan"):
        result = _evaluate_artifact(model, data, split, protocol, precision, backend, max_images)
    else:
        from cosa.evaluation.run import evaluate_checkpoint

        result = evaluate_checkpoint(
            model,
            data,
            split=split,
            protocol=protocol.value,
            scales=scale_values,
            flip=flip,
            with_cam=cam,
            max_images=max_images,
            device=device.value,
        )
    for warning in result.extra.get("warnings", []):
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    if json_:
        print_json(result.to_json())
        return
    table = Table(title=f"{model} on {data} [{split}], protocol {protocol.value}")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("IoU (label-masked)", justify="right")
    for name, iou in result.per_class.items():
        masked = result.per_class_label_masked[name]
        table.add_row(
            name, "-" if iou is None else f"{iou:.4f}", "-" if masked is None else f"{masked:.4f}"
        )
    if result.miou is None:
        out_console.print(
            f"no masks in split {split}: no mIoU; tag F1 {result.tag_f1:.4f} "
            f"(the seg stream's classes against the tags)   images {result.num_images}"
        )
    else:
        out_console.print(table)
        out_console.print(
            f"mIoU {result.miou:.4f} on {result.num_images_with_masks} images with masks   "
            f"(label-masked mIoU, uses GT image labels: {result.miou_label_masked:.4f})   "
            f"tag F1 {result.tag_f1:.4f} on {result.num_images} images"
        )
    if result.cam_miou is not None:
        out_console.print(
            f"CAM mIoU {result.cam_miou:.4f} (GT image labels; with the classifier's own "
            f"labels {result.cam_miou_predicted_labels:.4f})   CPL mIoU {result.cpl_miou:.4f} "
            f"(coverage {result.cpl_coverage:.2f})"
        )
    artifact = result.extra.get("artifact")
    if artifact:
        out_console.print(
            f"scored {artifact.get('file')} with {artifact.get('runtime')} on "
            f"{artifact.get('device')} ({artifact.get('reason')})",
            highlight=False,
            soft_wrap=True,
        )
        if artifact.get("warning"):
            err_console.print(f"warning: {artifact['warning']}", highlight=False, soft_wrap=True)
    chosen = result.extra.get("checkpoint")
    if chosen and chosen.get("selection_metric"):
        best = chosen.get("best_score")
        out_console.print(
            f"checkpoint at iteration {chosen['iteration']}; its run keeps as best.pt the "
            f"evaluation with the highest {chosen['selection_metric']} on "
            f"{chosen.get('selection_split')} "
            + (f"({best:.4f} at iteration {chosen['best_iteration']})" if best is not None else "")
        )


# ----------------------------------------------------------------------------------------- pseudo


@app.command()
@reports_errors
def pseudo(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint (.pt) written by `cosa train`.", metavar="CHECKPOINT")
    ],
    data: Annotated[Path, typer.Option(help="The dataset it was trained on (any layout).")],
    out: Annotated[Path, typer.Option(help="Tagged folder to write (images, masks, labels).")],
    split: Annotated[str, typer.Option(help="Split to pseudo-label.")] = "train",
    min_confidence: Annotated[
        float | None,
        typer.Option(
            help="Pixels whose class probability is lower become 255 (ignored); default 0.5 "
            "(cosa.pseudo.second_stage.DEFAULT_MIN_CONFIDENCE)."
        ),
    ] = None,
    skip_existing: Annotated[
        bool, typer.Option(help="Resume: keep the masks an interrupted run wrote.")
    ] = False,
    copy: Annotated[bool, typer.Option(help="Copy the images instead of hard-linking.")] = False,
    device: Annotated[Device, typer.Option()] = Device.AUTO,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Pseudo-masks for a second, fully supervised stage, written as a tagged folder."""
    from cosa.pseudo.second_stage import write_pseudo_dataset

    tuned = {} if min_confidence is None else {"min_confidence": min_confidence}
    result = write_pseudo_dataset(
        checkpoint,
        data,
        out,
        split=split,
        **tuned,
        skip_existing=skip_existing,
        copy=copy,
        device=device.value,
        progress=not json_,
    )
    if json_:
        print_json(result.to_json())
        return
    out_console.print(
        f"{result.pseudo_masks} pseudo-masks ({result.written} written, {result.skipped} kept) "
        f"and {result.images - result.pseudo_masks} other images -> {out} "
        f"({result.seconds:.0f} s)"
    )
    if result.miou is not None:
        out_console.print(
            f"against the ground truth of {result.scored} images: mIoU {result.miou:.4f} on the "
            f"pixels they label, coverage {result.coverage:.2f}"
        )
    out_console.print(
        f"second stage: cosa train --data {out} --set train.supervision=full --init {checkpoint} "
        "--out RUN"
    )


# ------------------------------------------------------------------------------------------- demo


@app.command()
@reports_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the run, the export and the masks.")] = Path(
        "runs/demo"
    ),
    max_iters: Annotated[int | None, typer.Option(help="Shorter or longer training.")] = None,
    images: Annotated[int, typer.Option(help="Test images to segment at the end.")] = 8,
    device: Annotated[Device, typer.Option()] = Device.AUTO,
    config: Annotated[Path | None, typer.Option(help="YAML file of overrides.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value override of the demo preset, repeatable."),
    ] = None,
) -> None:
    """The embedded default: train on synthetic data, export to ONNX, segment test images."""
    from cosa.config import resolve
    from cosa.export.pipeline import ExportOptions, export_artifacts
    from cosa.serving.runners import default_parallel_calls, open_runner
    from cosa.serving.segment import segment_inputs
    from cosa.train.launch import launch

    run = out / "run"
    resume = (run / "checkpoints" / "last.pt").is_file()
    result = launch(
        resolve(Preset.DEMO, config, set_ or []),
        run,
        device=device.value,
        resume=resume,
        max_iters=max_iters,
    )
    summary = result.to_json()
    checkpoint = Path(summary["best_checkpoint"] or summary["last_checkpoint"])
    exported = export_artifacts(checkpoint, out / "export", ExportOptions())
    test_list = run / "data" / "ImageSets" / "Segmentation" / "test.txt"
    names = test_list.read_text().split()[:images]
    inputs = [str(run / "data" / "JPEGImages" / f"{name}.jpg") for name in names]
    runner = open_runner(
        out / "export", backend="onnxruntime", parallel_calls=default_parallel_calls()
    )
    try:
        seg = segment_inputs(inputs, out / "masks", runner, overlay=True, progress=True)
    finally:
        runner.close()
    test_miou = (summary.get("test") or {}).get("miou", float("nan"))
    out_console.print(
        f"trained:   {checkpoint}  (test mIoU {test_miou:.3f}; curves {run / 'curves.png'}, "
        f"pictures {run / 'vis'})"
    )
    out_console.print(f"exported:  {exported.onnx_path}  (spec {out / 'export' / 'spec.json'})")
    out_console.print(f"segmented: {seg.processed} images -> {out / 'masks'}")


# ----------------------------------------------------------------------------------------- export


@app.command()
@reports_errors
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint (.pt) written by `cosa train`.", metavar="CHECKPOINT")
    ],
    out: Annotated[Path, typer.Option(help="Export folder (model.onnx + spec.json, ...).")],
    precision: Annotated[
        Precision, typer.Option(help="Primary artifact precision.")
    ] = Precision.FP32,
    calib: Annotated[
        Path | None, typer.Option(help="Calibration images (required for int8).")
    ] = None,
    calib_size: Annotated[int | None, typer.Option(help="At most N calibration images.")] = None,
    calib_method: Annotated[CalibrationMethod, typer.Option()] = CalibrationMethod.ENTROPY,
    exclude_node: Annotated[
        list[str] | None, typer.Option(help="Keep this node in float (int8), repeatable.")
    ] = None,
    trt: Annotated[
        bool, typer.Option("--trt", help="Also build a TensorRT engine (needs CUDA).")
    ] = False,
    min_shape: Annotated[str, typer.Option(help="Profile min NxHxW.")] = "1x224x224",
    opt_shape: Annotated[str, typer.Option(help="Profile opt NxHxW.")] = "1x448x448",
    max_shape: Annotated[str, typer.Option(help="Profile max NxHxW.")] = "8x1024x1024",
    opset: Annotated[int | None, typer.Option(help="ONNX opset.")] = None,
    workspace_mib: Annotated[
        int | None, typer.Option(help="TensorRT workspace limit (MiB).")
    ] = None,
    ort_fusion: Annotated[
        OrtFusion,
        typer.Option(
            help="Also write model.ort.onnx: fused transformer ops, onnxruntime only. "
            "auto: ViT backbones only; on: fail if nothing fuses."
        ),
    ] = OrtFusion.AUTO,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export the assignment network's seg stream: verified ONNX, FP16, INT8 (Q/DQ), TensorRT."""
    from dataclasses import fields

    from cosa.export.pipeline import ExportOptions, export_artifacts, parse_shape

    given: dict[str, Any] = {
        "precision": precision.value,
        "calib_dir": calib,
        "calib_size": calib_size,
        "calib_method": calib_method.value,
        "trt": trt,
        "opset": opset,
        "workspace_mib": workspace_mib,
        "exclude_nodes": tuple(exclude_node or ()),
        "ort_fusion": ort_fusion.value,
        "min_shape": parse_shape(min_shape, "--min-shape"),
        "opt_shape": parse_shape(opt_shape, "--opt-shape"),
        "max_shape": parse_shape(max_shape, "--max-shape"),
    }
    known = {f.name for f in fields(ExportOptions)}
    options = ExportOptions(**{k: v for k, v in given.items() if k in known and v is not None})
    result = export_artifacts(checkpoint, out, options)
    if json_:
        print_json(result.to_json_dict())
        return
    for warning in result.warnings:
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    for role, path in result.files.items():
        out_console.print(f"{role:>10}: {path}")
    for name, check in (result.spec.verification or {}).items():
        shapes = ", ".join("x".join(map(str, r["shape"])) for r in check.get("shapes", []))
        verdict = "ok" if check.get("passed") else "OUT OF TOLERANCE"
        out_console.print(
            f"verified {name} against {check.get('reference')} at {shapes}: max |diff| "
            f"{check.get('max_abs_diff', float('nan')):.2e}, mask agreement "
            f"{check.get('min_mask_agreement', float('nan')):.4f} ({verdict})",
            highlight=False,
            soft_wrap=True,
        )
    out_console.print(f"primary artifact {result.primary} ({result.seconds:.0f} s)")


# -------------------------------------------------------------------------------- segment, stream


@app.command()
@reports_errors
def segment(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (recursive) or globs.", metavar="INPUT"),
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder; masks keep the inputs' relative paths.")
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Export folder, .onnx/.plan, or checkpoint .pt "
            "(with triton: the export folder, for spec.json)."
        ),
    ] = None,
    backend: Annotated[Backend, typer.Option(help="auto: from the model file.")] = Backend.AUTO,
    url: TritonUrl = None,
    protocol: TritonProtocol = WireProtocol.GRPC,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Network of an export folder (onnxruntime; default the export's precision); "
            "the file is the one accurate and fast on this device (--json names it)."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per inference call (same-size images).")
    ] = 4,
    overlay: Annotated[bool, typer.Option(help="Also write a blended picture per image.")] = False,
    format_: Annotated[
        MaskFormat, typer.Option("--format", help="png: palette PNG; npy: raw ids.")
    ] = MaskFormat.PNG,
    skip_existing: Annotated[bool, typer.Option(help="Skip inputs whose mask exists.")] = False,
    engine: Annotated[
        SegmentEngine,
        typer.Option(help="local: this process; ray: Ray Data workers (cosa-toolkit[ray])."),
    ] = SegmentEngine.LOCAL,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster HOST:PORT, ray://HOST:PORT or auto [default: a local Ray]."),
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="Ray workers, one runner each [default: one per CPU].")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Segment images; bad files are reported and skipped (exit code 1 if any failed)."""
    from cosa.errors import ConfigError
    from cosa.serving.runners import default_parallel_calls, describe_runner, open_runner
    from cosa.serving.segment import segment_inputs

    if engine is SegmentEngine.RAY:
        from cosa.serving.ray_engine import RayOptions, runner_factory, segment_with_ray

        options = RayOptions(address=ray_address, workers=ray_workers)
        summary = segment_with_ray(
            inputs,
            out,
            runner_factory(
                model,
                backend=backend.value,
                url=url,
                protocol=protocol.value,
                precision=precision,
                threads=options.cpus_per_worker,
            ),
            batch_size=batch_size,
            fmt=format_.value,
            overlay=overlay,
            skip_existing=skip_existing,
            progress=not json_,
            options=options,
        )
        # Each Ray worker opens its own runner (the same chooser, on the worker's machine).
        model_info = {"engine": "ray", "file": None}
    else:
        if ray_address is not None or ray_workers is not None:
            raise ConfigError("--ray-address and --ray-workers need --engine ray")
        runner = open_runner(
            model,
            backend=backend.value,
            url=url,
            protocol=protocol.value,
            precision=precision,
            parallel_calls=default_parallel_calls(),
        )
        model_info = describe_runner(runner)
        if model_info.get("warning") and not json_:
            err_console.print(f"warning: {model_info['warning']}", highlight=False, soft_wrap=True)
        try:
            summary = segment_inputs(
                inputs,
                out,
                runner,
                batch_size=batch_size,
                fmt=format_.value,
                overlay=overlay,
                skip_existing=skip_existing,
                progress=not json_,
            )
        finally:
            runner.close()
    if json_:
        print_json({**summary.to_json(), "model": model_info})
    else:
        for failure in summary.failed:
            err_console.print(
                f"failed: {failure.path}: {failure.error}", highlight=False, soft_wrap=True
            )
        for warning in summary.warnings:
            err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
        out_console.print(
            f"{summary.processed} segmented, {len(summary.failed)} failed, "
            f"{summary.skipped} skipped in {summary.seconds:.1f} s -> {out}"
        )
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@reports_errors
def stream(
    source: Annotated[
        str, typer.Argument(help="Video file, camera index (0) or image glob.", metavar="SOURCE")
    ],
    out: Annotated[Path, typer.Option(help="Output video with overlays (.mp4 or .avi).")],
    model: Annotated[
        Path | None, typer.Option(help="Export folder, .onnx/.plan or checkpoint.")
    ] = None,
    backend: Annotated[Backend, typer.Option()] = Backend.AUTO,
    url: TritonUrl = None,
    protocol: TritonProtocol = WireProtocol.GRPC,
    masks: Annotated[
        Path | None, typer.Option(help="Also write one mask PNG per frame here.")
    ] = None,
    max_in_flight: Annotated[int, typer.Option(help="Frames in flight (backpressure).")] = 4,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Segment a video or stream frame by frame, in order; report FPS and latency.

    Files and image sequences run two frames at once on a local onnxruntime backend with two or
    more CPUs (more frames per second); a camera runs one at a time (lower latency).
    """
    from cosa.serving.runners import default_parallel_calls, describe_runner, open_runner
    from cosa.serving.stream import is_camera, run_stream

    runner = open_runner(
        model,
        backend=backend.value,
        url=url,
        protocol=protocol.value,
        parallel_calls=1 if is_camera(source) else default_parallel_calls(),
    )
    try:
        summary = run_stream(
            source,
            out,
            runner,
            masks_dir=masks,
            max_in_flight=max_in_flight,
            max_frames=max_frames,
            progress=not json_,
        )
    finally:
        runner.close()
    if json_:
        print_json({**summary.to_json(), "model": describe_runner(runner)})
        return
    out_console.print(
        f"{summary.frames} frames -> {summary.out}: {summary.fps:.1f} FPS, latency p50 "
        f"{summary.latency_p50_ms:.0f} ms, p95 {summary.latency_p95_ms:.0f} ms"
    )


# -------------------------------------------------------------------------------------- benchmark


@app.command()
@reports_errors
def benchmark(
    artifact_dir: Annotated[
        Path, typer.Argument(help="Folder written by `cosa export`.", metavar="ARTIFACT_DIR")
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset root: also score mIoU on --split (as `cosa eval` does)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split scored with --data.")] = "val",
    backends: Annotated[
        str | None,
        typer.Option(
            help="Runtimes to measure, comma-separated (default: all; those that cannot run "
            "here are listed as skipped)."
        ),
    ] = None,
    url: TritonUrl = None,
    protocol: TritonProtocol = WireProtocol.GRPC,
    batch: Annotated[str, typer.Option(help="Batch sizes to time; the first decides.")] = "1,8",
    size: Annotated[
        str | None, typer.Option(help="HxW of the timing images (default: the export's opt).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed calls per batch size, at least.")] = 5,
    seconds: Annotated[
        float, typer.Option(help="Keep timing a batch size until its calls took this long.")
    ] = 1.0,
    max_images: Annotated[int, typer.Option(help="Score only the first N images (0 = all).")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Also write the report as markdown to this file.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure every network of an export folder on this machine and recommend one to deploy."""
    from cosa.errors import ConfigError
    from cosa.export.spec import read_spec
    from cosa.serving.benchmark import BenchmarkOptions

    if out is not None and (out.is_dir() or out.suffix.lower() != ".md"):
        raise ConfigError(f"--out {out} must be a markdown file path (FILE.md), not a folder")
    names = tuple(b.strip() for b in (backends or "").split(",") if b.strip())
    chosen = {"backends": names} if backends is not None else {}
    options = BenchmarkOptions(
        **chosen,  # type: ignore[arg-type]
        url=url,
        protocol=protocol,
        batches=_parse_ints(batch, "--batch"),
        size=_parse_size(size) if size else None,
        repeats=repeats,
        min_seconds=seconds,
    )
    if not (artifact_dir / "spec.json").is_file():
        raise ConfigError(
            f"{artifact_dir} has no spec.json; pass a folder written by `cosa export`"
        )
    spec = read_spec(artifact_dir)
    scorer = None
    if data is not None:
        from cosa.data import open_dataset
        from cosa.evaluation.evaluate import evaluate

        index = open_dataset(data, split, class_names=spec.class_names)

        def scorer(predict: Any) -> float | None:
            return evaluate(predict, index, protocol="deploy", max_images=max_images).miou

    report = _run_benchmark(artifact_dir, options, scorer, progress=not json_)
    if out is not None:
        from cosa.files import write_text_atomic

        write_text_atomic(out, report.markdown())
    if json_:
        print_json(report.to_json())
        return
    header, rows = report.rows()
    height, width = report.size
    table = Table(
        title=f"{artifact_dir} on {report.machine}, input {height}x{width}",
        box=box.SIMPLE_HEAD,
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < 3 else "right", no_wrap=i < 2)
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
    out_console.print(
        "mIoU: "
        + (f"{data} [{split}], as `cosa eval` scores it" if data else "not measured (no --data)")
        + f"; =FP32: mask agreement with FP32 on {report.agreement_on}; bN ms / p95: mean and "
        "95th-percentile latency of a batch of N (networks taking turns call by call); MiB: peak "
        "memory its loading added; * = recommended",
        highlight=False,
        markup=False,
    )
    for skipped in report.skipped:
        out_console.print(
            f"skipped {skipped.runtime}: {skipped.reason}", highlight=False, markup=False
        )
    for network in report.networks:
        for note in network.notes:
            out_console.print(f"{network.name}: {note}", highlight=False, markup=False)
    out_console.print(
        f"recommendation: {report.recommendation}", highlight=False, soft_wrap=True, markup=False
    )


def _run_benchmark(artifact_dir: Path, options: Any, scorer: Any, progress: bool) -> Any:
    """`benchmark_artifacts` with a rich progress bar on stderr (one task per network)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cosa.serving.benchmark import benchmark_artifacts

    if not progress:
        return benchmark_artifacts(artifact_dir, options, scorer)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total or None)
            bar.update(tasks[name], completed=done)

        return benchmark_artifacts(artifact_dir, options, scorer, progress=update)


def _parse_size(text: str) -> tuple[int, int]:
    from cosa.errors import ConfigError

    parts = text.lower().replace(" ", "").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size {text!r} is not HxW with two positive integers; e.g. 448x448")
    return values  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- triton


@triton_app.command("setup")
@reports_errors
def triton_setup(
    dir_: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Install folder (default $COSA_TRITON_HOME or ~/.cache/cosa/triton)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Reinstall even if present.")] = False,
) -> None:
    """Install the Triton server (nvidia-pytriton wheel) and its numpy<2 model environment."""
    from cosa.serving.triton_server import setup_triton

    install = setup_triton(dir_, force=force)
    out_console.print(f"Triton server ready in {install.root}")


@triton_app.command("repo")
@reports_errors
def triton_repo(
    artifact_dir: Annotated[
        Path, typer.Argument(help="Folder written by `cosa export`.", metavar="ARTIFACT_DIR")
    ],
    out: Annotated[Path, typer.Option(help="Model repository to create.")],
    platform: Annotated[
        Platform, typer.Option(help="Backend of the segmentation model.")
    ] = Platform.ONNXRUNTIME,
    max_batch: Annotated[int, typer.Option(help="max_batch_size of the segmentation model.")] = 8,
    instances: Annotated[int, typer.Option(help="Model instances (instance_group count).")] = 1,
    preferred_batch: Annotated[str, typer.Option(help="Preferred batch sizes, e.g. 4,8.")] = "",
    max_queue_delay_us: Annotated[int, typer.Option(help="Dynamic batching queue delay.")] = 100,
    model_name: Annotated[
        str, typer.Option(help="Name of the segmentation model.")
    ] = DEFAULT_MODEL_NAME,
    instance_kind: Annotated[
        InstanceKind,
        typer.Option(help="auto: GPU for tensorrt, CPU for python, KIND_AUTO for onnxruntime."),
    ] = InstanceKind.AUTO,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Network to serve (default the export's precision); the file is the one "
            "accurate and fast where the instances run (--json names it)."
        ),
    ] = None,
    ensemble: Annotated[
        bool, typer.Option(help="Add pre/post-processing + ensemble models.")
    ] = True,
    warmup: Annotated[bool, typer.Option(help="Add model_warmup.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace a repository written by cosa.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write a Triton model repository (dynamic batching, instances, warmup, ensemble)."""
    from cosa.serving.triton_repo import write_repository

    preferred = _parse_ints(preferred_batch, "--preferred-batch") if preferred_batch.strip() else ()
    layout = write_repository(
        artifact_dir,
        out,
        platform=platform.value,
        max_batch=max_batch,
        instances=instances,
        preferred_batch=preferred,
        max_queue_delay_us=max_queue_delay_us,
        model_name=model_name,
        instance_kind=None if instance_kind is InstanceKind.AUTO else instance_kind.value,
        precision=precision,
        ensemble=ensemble,
        warmup=warmup,
        overwrite=overwrite,
    )
    if json_:
        print_json(layout.to_json_dict())
        return
    artifact = layout.artifact or {}
    out_console.print(f"wrote {out}: models {', '.join(layout.models)}")
    out_console.print(
        f"{layout.segmentation} serves {artifact.get('file')} ({artifact.get('reason')})",
        highlight=False,
    )
    if artifact.get("warning"):
        err_console.print(f"warning: {artifact['warning']}", highlight=False, soft_wrap=True)
    out_console.print(
        f"serve it: cosa triton serve {out}   (or: tritonserver --model-repository={out})"
    )


@triton_app.command("k8s")
@reports_errors
def triton_k8s(
    repo: Annotated[
        Path, typer.Argument(help="Model repository (from `cosa triton repo`).", metavar="REPO")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the manifests into.")],
    storage_uri: Annotated[
        str | None,
        typer.Option(
            help="Where REPO is in the cluster: pvc://CLAIM/PATH, s3://, gs://, https://, ... "
            "[default: pvc://cosa-model-repository/<REPO folder name>]"
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(help="Pods at start; the autoscaler's minimum.")] = 1,
    max_replicas: Annotated[
        int | None, typer.Option(help="The autoscaler's maximum [default: 2 x --replicas].")
    ] = None,
    gpu: Annotated[
        int | None,
        typer.Option(
            help="GPUs per pod [default: 1; 0 when the segmentation model runs on the CPU]."
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Triton image (required for TensorRT engines: the one with their TensorRT)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Object name [default: the segmentation model's].")
    ] = None,
    cpu: Annotated[str, typer.Option(help="CPU request per pod.")] = "2",
    memory: Annotated[str, typer.Option(help="Memory request and limit per pod.")] = "4Gi",
    overwrite: Annotated[bool, typer.Option(help="Replace manifests written before.")] = False,
) -> None:
    """Write Kubernetes manifests for REPO: Triton Deployment, Service and HPA; KServe
    InferenceService."""
    from cosa.serving.k8s_manifests import K8sOptions, write_manifests

    options = K8sOptions(
        storage_uri=storage_uri,
        replicas=replicas,
        max_replicas=max_replicas,
        gpus=gpu,
        image=image,
        name=name,
        cpu=cpu,
        memory=memory,
    )
    files = write_manifests(repo, out, options, overwrite=overwrite)
    for path in files:
        out_console.print(str(path), highlight=False, markup=False)
    out_console.print(
        f"apply one of: kubectl apply -k {out / 'triton'}   (Deployment, Service, HPA)\n"
        f"              kubectl apply -k {out / 'kserve'}   (KServe InferenceService)",
        highlight=False,
        markup=False,
    )


@triton_app.command("serve")
@reports_errors
def triton_serve(
    repo: Annotated[
        Path, typer.Argument(help="Model repository (from `cosa triton repo`).", metavar="REPO")
    ],
    http_port: Annotated[int, typer.Option()] = ServerPorts().http,
    grpc_port: Annotated[int, typer.Option()] = ServerPorts().grpc,
    metrics_port: Annotated[int, typer.Option()] = ServerPorts().metrics,
    dir_: Annotated[
        Path | None, typer.Option("--dir", help="Install folder of `cosa triton setup`.")
    ] = None,
) -> None:
    """Run a real Triton server on loopback in the foreground (Ctrl-C / SIGTERM stop it)."""
    from cosa.serving.triton_server import docker_command, serve

    ports = ServerPorts(http_port, grpc_port, metrics_port)
    err_console.print(
        "with Docker and NVIDIA's container instead:\n  " + docker_command(repo, ports),
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(serve(repo, ports, home=dir_, log_stream=sys.stderr))


def _evaluate_artifact(
    model: Path,
    data: Path,
    split: str,
    protocol: EvalProtocol,
    precision: Precision | None,
    backend: Backend,
    max_images: int,
) -> Any:
    """Score an exported network (ONNX through onnxruntime, a plan through TensorRT): the file
    `cosa segment` runs on this machine (`cosa.export.layout.choose_artifact`)."""
    from cosa.data import open_dataset
    from cosa.errors import ConfigError
    from cosa.evaluation.evaluate import evaluate
    from cosa.serving.runners import describe_runner, logits_predictor, open_runner

    if protocol is not EvalProtocol.DEPLOY:
        raise ConfigError(
            "exported artifacts are scored with --protocol deploy (what they compute); "
            "use the checkpoint for --protocol paper or tta"
        )
    if backend not in (Backend.AUTO, Backend.ONNXRUNTIME, Backend.TENSORRT):
        raise ConfigError(
            f"--backend {backend.value} does not score an export folder; use onnxruntime or "
            "tensorrt (a checkpoint is scored in torch: pass the .pt)"
        )
    runner = open_runner(model, backend=backend.value, precision=precision, return_logits=True)
    try:
        # A tagged folder's ids follow the model's classes; other layouts must have the same.
        index = open_dataset(data, split, class_names=runner.spec.class_names)
        result = evaluate(
            logits_predictor(runner), index, protocol=protocol.value, max_images=max_images
        )
        result.extra["artifact"] = describe_runner(runner)
        return result
    finally:
        runner.close()


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    from cosa.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{option} needs positive numbers, got {text!r}")
    return values


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    from cosa.errors import ConfigError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated integers, got {text!r}") from None


def main() -> None:
    from cosa.allocator import keep_freed_memory

    keep_freed_memory()  # every command: training and inference churn large tensors
    app()


if __name__ == "__main__":
    main()
