"""`cosa`: the command-line interface. Thin: parse, call one library function, print, set the exit code.

Exit codes: 0 ok, 1 some inputs failed (segment), 2 usage or configuration error. Library errors
(`cosa.errors.CosaError`) become one line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cosa.errors import CosaError

app = typer.Typer(help="CoSA toolkit: weakly supervised segmentation from image-level labels.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: the synthetic benchmark.", no_args_is_help=True)
triton_app = typer.Typer(help="Triton Inference Server: repository, local server, set-up.",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(triton_app, name="triton")

out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(func: F) -> F:
    """Turn library errors into one line on stderr and exit code 2 (Ctrl-C: 130)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CosaError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class Preset(str, Enum):
    demo = "demo"
    voc = "voc"
    coco = "coco"
    reference = "reference"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Protocol(str, Enum):
    deploy = "deploy"
    paper = "paper"


# ------------------------------------------------------------------------------------------------ data

@data_app.command("synth")
@reports_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (VOC layout).")],
    train: Annotated[int, typer.Option(help="Training images.")] = 400,
    val: Annotated[int, typer.Option(help="Validation images (checkpoint selection).")] = 60,
    test: Annotated[int, typer.Option(help="Test images (reported, never used for selection).")] = 100,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
) -> None:
    """Write the synthetic weakly supervised benchmark (masks, classes.json, image labels)."""
    from cosa.data import write_synthetic_dataset

    summary = write_synthetic_dataset(out, train, val, test, seed=seed)
    out_console.print(f"wrote {summary} to {out}")


# ----------------------------------------------------------------------------------------------- train

@app.command()
@reports_errors
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, metrics, pictures).")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (VOC/COCO/synthetic layout). "
                                              "Default: the embedded synthetic benchmark.")] = None,
    preset: Annotated[Preset, typer.Option(help="Starting configuration.")] = Preset.demo,
    config: Annotated[Path | None, typer.Option(help="YAML file of overrides.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override, repeatable "
                                                    "(e.g. --set loss.seg_weight=0.2).")] = None,
    max_iters: Annotated[int | None, typer.Option(help="Override train.max_iters.")] = None,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    pretrained: Annotated[Path | None, typer.Option(help="Local backbone weights file.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue RUN from checkpoints/last.pt.")] = False,
    nproc: Annotated[int, typer.Option(help="Local DDP processes (or launch with torchrun).")] = 1,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train CoSA (online + EMA assignment network) from image-level labels."""
    from cosa.config import resolve
    from cosa.errors import ConfigError
    from cosa.train.launch import launch

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.root={data}")
    if pretrained is not None:
        if not pretrained.is_file():
            raise ConfigError(f"--pretrained {pretrained} does not exist; pass a local weights file")
        overrides.append(f"model.pretrained={pretrained}")
    if resume and (overrides or config is not None):
        raise ConfigError("--resume continues a run with its own config.yaml; drop --set/--config/--data "
                          "(only --max-iters may change)")
    cfg = resolve(preset.value, config, overrides)
    result = launch(cfg, out, device=device.value, resume=resume, max_iters=max_iters, nproc=nproc,
                    progress=not json_)
    summary = result if isinstance(result, dict) else result.to_json()
    if json_:
        print_json(summary)
        return
    out_console.print(f"run folder: {out}")
    out_console.print(f"checkpoints: {summary['last_checkpoint']} (best on "
                      f"{summary.get('selection_split')}: {summary['best_checkpoint']})")
    if summary.get("best_val_miou") is not None:
        out_console.print(f"best val mIoU {summary['best_val_miou']:.4f} at iteration "
                          f"{summary['best_iteration']}")
    if summary.get("test"):
        out_console.print(f"test mIoU {summary['test']['miou']:.4f} on split {summary['test']['split']}")
    out_console.print(f"{summary['seconds_per_iter']:.3f} s/it")


# ------------------------------------------------------------------------------------------------ eval

@app.command("eval")
@reports_errors
def eval_(
    model: Annotated[Path, typer.Argument(help="Checkpoint (.pt) or export folder (spec.json).")],
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "val",
    protocol: Annotated[Protocol, typer.Option(help="deploy: what `cosa segment` writes (native size, "
                                               "single scale); paper: 448x448, scales + flip.")]
    = Protocol.deploy,
    scales: Annotated[str, typer.Option(help="Scales of the paper protocol.")] = "1.0,0.5,1.5,0.75,1.25",
    flip: Annotated[bool, typer.Option(help="Flip test-time augmentation (paper protocol).")] = True,
    cam: Annotated[bool, typer.Option(help="Also score CAM and CAM pseudo-labels (checkpoints).")]
    = True,
    max_images: Annotated[int, typer.Option(help="Score only the first N images (0 = all).")] = 0,
    device: Annotated[Device, typer.Option()] = Device.auto,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """mIoU (plain, the headline), label-masked mIoU, CAM and pseudo-label quality."""
    from cosa.evaluation.run import evaluate_model

    scale_values = _parse_floats(scales, "--scales")
    result = evaluate_model(model, data, split=split, protocol=protocol.value, scales=scale_values,
                            flip=flip, with_cam=cam, max_images=max_images, device=device.value,
                            progress=not json_)
    if json_:
        print_json(result.to_json())
        return
    table = Table(title=f"{model} on {data} [{split}], protocol {protocol.value}")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("IoU (label-masked)", justify="right")
    for name, iou in result.per_class.items():
        masked = result.per_class_label_masked[name]
        table.add_row(name, "-" if iou is None else f"{iou:.4f}", "-" if masked is None else f"{masked:.4f}")
    out_console.print(table)
    out_console.print(f"mIoU {result.miou:.4f}   (label-masked mIoU, uses GT image labels: "
                      f"{result.miou_label_masked:.4f})   images {result.num_images}")
    if result.cam_miou is not None:
        out_console.print(f"CAM mIoU {result.cam_miou:.4f}   CPL mIoU {result.cpl_miou:.4f} "
                          f"(coverage {result.cpl_coverage:.2f})")


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    from cosa.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{option} needs positive numbers, got {text!r}")
    return values


def main() -> None:
    app()


if __name__ == "__main__":
    main()
