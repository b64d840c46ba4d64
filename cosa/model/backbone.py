"""Encoders: a timm backbone behind one small interface (features at stride 16 plus aux features).

Every encoder maps an ImageNet-normalised image (B, 3, H, W) to two feature maps on one grid,
(B, D, H // 16, W // 16) and (B, D_aux, H // 16, W // 16). Both variants floor the grid: the ViT
patch conv drops the remainder, and the EfficientNet crops it off first, so one formula holds for
every backbone (333 x 517 -> 20 x 32). Each forward is free of data-dependent Python branches and
baked sizes, so the whole network exports with `torch.onnx.export(..., dynamo=True)` and dynamic
N, H, W.

Variants live in one dict, `BACKBONES`; `build_encoder` is the only constructor. Weights are never
downloaded here (`pretrained=False` always); `cosa.model.pretrained` loads local files.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn

from cosa.errors import ConfigError

STRIDE = 16


class Encoder(nn.Module, abc.ABC):
    """Backbone interface of `CosaNet`.

    Attributes:
        out_channels: D, channels of the final features `F`.
        aux_channels: D_aux, channels of the aux features `F_aux`.
        stride: 16; the feature grid is (H // 16, W // 16).
        name: the backbone key in `BACKBONES`.
        timm_name: the timm architecture whose state-dict layout the encoder's weights follow.
    """

    out_channels: int
    aux_channels: int
    stride: int = STRIDE
    name: str
    timm_name: str

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch.

        Args:
            x: (B, 3, H, W) float, ImageNet-normalised RGB; any H, W >= 16.

        Returns:
            `(F, F_aux)`: (B, D, H // 16, W // 16) final features and (B, D_aux, H // 16, W // 16)
            aux features.
        """


class VitEncoder(Encoder):
    """ViT with patch 16 on timm's `VisionTransformer` parameters, run by our own forward.

    The forward is written here rather than using timm's `dynamic_img_size` path for two reasons:
    timm resizes the position embedding with `antialias=True` (a different bicubic kernel from the
    reference's plain bicubic, and TensorRT's parser has no antialiasing), and we need the tokens of
    an intermediate block (the aux features) in the same pass.

    The 14 x 14 position embedding is bicubically resized (align_corners=False, no antialias) to the
    input's token grid on every forward; it is frozen, the class token is trainable (reference).
    `F` = final patch tokens after the last LayerNorm; `F_aux` = patch tokens after block
    `aux_layer`, without the final norm. The class token is dropped from both.

    Attributes:
        vit: the timm `VisionTransformer` (head removed); its state-dict layout is timm's, so timm
            `.pth`/`.safetensors`/`.npz` weights load into it directly.
        aux_block: 0-based index of the block whose output is `F_aux`.
    """

    def __init__(self, name: str, timm_name: str, aux_layer: int) -> None:
        """Build the encoder.

        Args:
            name: backbone key (e.g. "vit_tiny_patch16").
            timm_name: timm architecture (e.g. "vit_tiny_patch16_224").
            aux_layer: block index for `F_aux`, Python style (-3 = block 10 of 12).

        Raises:
            ConfigError: `aux_layer` does not index a block.
        """
        super().__init__()
        self.name = name
        self.timm_name = timm_name
        # The reference's ViT: qkv bias and LayerNorm eps 1e-6 are timm's defaults for these names;
        # every dropout is 0. pretrained=False: nothing is ever downloaded.
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            drop_rate=0.0,
            pos_drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
        )
        depth = len(self.vit.blocks)
        if not -depth <= aux_layer < depth:
            raise ConfigError(
                f"model.aux_layer={aux_layer} does not index a block of {name} "
                f"({depth} blocks); use a value in [{-depth}, {depth - 1}], e.g. -3"
            )
        self.aux_block = aux_layer % depth
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        if self.num_prefix_tokens != 1 or getattr(self.vit, "no_embed_class", False):
            raise ConfigError(
                f"{timm_name} has no plain class token + position embedding; "
                "only the original ViT layout is supported"
            )
        grid = self.vit.patch_embed.grid_size
        self.pos_grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.out_channels = self.aux_channels = int(self.vit.embed_dim)
        self.vit.pos_embed.requires_grad_(False)  # frozen, as the reference

    def _position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """(1, gh * gw, D) patch position embedding resized from the pretrained grid."""
        pos = self.vit.pos_embed[:, self.num_prefix_tokens :]  # (1, 14 * 14, D)
        pos = pos.reshape(1, self.pos_grid[0], self.pos_grid[1], -1).permute(0, 3, 1, 2)
        # Always interpolate (also at 14 x 14, where bicubic is the identity): a size check would
        # become a Python branch that export specialises on.
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # (1, gh * gw, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Encoder.forward`; D = D_aux = embed dim."""
        # The stride-16 patch conv drops the bottom/right remainder of sizes not divisible by 16.
        patches = self.vit.patch_embed.proj(x)  # (B, D, gh, gw)
        batch, _, gh, gw = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        cls_pos = self.vit.pos_embed[:, : self.num_prefix_tokens]  # (1, 1, D)
        cls = self.vit.cls_token.expand(batch, -1, -1) + cls_pos
        tokens = torch.cat([cls, tokens + self._position_embedding(gh, gw)], dim=1)
        tokens = self.vit.norm_pre(tokens)  # Identity for these models; kept for layout fidelity

        aux = tokens
        for index, block in enumerate(self.vit.blocks):
            tokens = block(tokens)
            if index == self.aux_block:
                aux = tokens
        tokens = self.vit.norm(tokens)
        return self._to_map(tokens, gh, gw), self._to_map(aux, gh, gw)

    def _to_map(self, tokens: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(B, 1 + gh * gw, D) tokens -> (B, D, gh, gw) patch map without the class token."""
        patch_tokens = tokens[:, self.num_prefix_tokens :]
        return patch_tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


class StaticSamePadConv2d(nn.Conv2d):
    """TensorFlow 'SAME' convolution with padding fixed at build time.

    timm's `Conv2dSame` computes its padding from the input size on every call (ceil arithmetic on
    symbolic sizes makes dynamo export slow and the graph larger). Inside `EfficientNetLite0Encoder`
    every strided conv sees a size divisible by its stride (the input is cropped to a multiple of 16
    and only four convs have stride 2), and for such sizes 'SAME' padding is the constant
    `max(kernel_eff - stride, 0)`, split as TensorFlow does (the extra pixel goes bottom/right).
    """

    def __init__(self, conv: Conv2dSame) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        pads = []
        for axis in (1, 0):  # F.pad order: (left, right, top, bottom)
            # Any size divisible by the stride gives the same total; 16 * stride is one such size.
            size = STRIDE * conv.stride[axis]
            total = get_same_padding(
                size, conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
            )
            pads += [total // 2, total - total // 2]
        self.same_pad = tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) with H, W divisible by the stride -> (B, C_out, H / s, W / s)."""
        return super().forward(F.pad(x, self.same_pad))


class ExportableReLU6(nn.Module):
    """ReLU6 that exports as `clamp(x, 0, 6)`, a core ATen op, and trains as `relu6`.

    `nn.ReLU6` is `hardtanh`, which torch.export decomposes op by op with symbolic-shape checks;
    with 32 of them this alone doubled the EfficientNet's dynamo export time. In eager mode the
    clamp's backward is four kernels (two compares, an and, a where) against hardtanh's one, 4-7x
    slower on the CPU; both compute the same function.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return torch.clamp(x, 0.0, 6.0)
        return F.relu6(x)


class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 (timm `tf_efficientnet_lite0`) with stride-16 features.

    timm's `features_only=True, output_stride=16` dilates the last stride-32 stage (blocks 5-6,
    dilation 2) so it stays at stride 16. `F` = output of the last stage (320 channels, blocks.6);
    `F_aux` = output of stage 4 (112 channels, blocks.4, the last stage whose stride is 16 without
    dilation). `aux_layer` is a ViT block index and does not apply here.

    The input is cropped to a multiple of 16 (bottom/right remainder dropped, as the ViT patch conv
    does), so the grid is (H // 16, W // 16) for every backbone, and TensorFlow 'SAME' padding
    becomes static (see `StaticSamePadConv2d`); ReLU6 exports as a clamp (see
    `ExportableReLU6`). Both swaps keep timm's parameter names and the function computed. The
    classifier-only tail of the ImageNet network (conv_head, bn2, classifier) is not part of the
    encoder.

    Attributes:
        body: timm `EfficientNetFeatures`; its state-dict layout is timm's `tf_efficientnet_lite0`.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.timm_name = "tf_efficientnet_lite0"
        self.body = timm.create_model(
            self.timm_name,
            pretrained=False,
            features_only=True,
            output_stride=STRIDE,
            out_indices=(3, 4),
            drop_rate=0.0,
            drop_path_rate=0.0,
        )
        self.aux_channels, self.out_channels = (int(c) for c in self.body.feature_info.channels())
        _make_export_friendly(self.body)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Encoder.forward`; D = 320, D_aux = 112."""
        height = x.shape[-2] // STRIDE * STRIDE
        width = x.shape[-1] // STRIDE * STRIDE
        aux, features = self.body(x[..., :height, :width])
        return features, aux


def _make_export_friendly(module: nn.Module) -> None:
    """Below `module`, replace timm's `Conv2dSame` by `StaticSamePadConv2d` (same weights) and
    `nn.ReLU6` by `ExportableReLU6`. Parameter names and values do not change."""
    for name, child in module.named_children():
        if isinstance(child, Conv2dSame):
            fixed = StaticSamePadConv2d(child)
            fixed.load_state_dict(child.state_dict())
            setattr(module, name, fixed)
        elif isinstance(child, nn.ReLU6):
            setattr(module, name, ExportableReLU6())
        else:
            _make_export_friendly(child)


def _vit(name: str, timm_name: str) -> Callable[[int], Encoder]:
    return lambda aux_layer: VitEncoder(name, timm_name, aux_layer)


# The one dict of variants: backbone key (cosa.config.BACKBONES) -> constructor(aux_layer).
BACKBONES: dict[str, Callable[[int], Encoder]] = {
    "vit_tiny_patch16": _vit("vit_tiny_patch16", "vit_tiny_patch16_224"),
    "vit_small_patch16": _vit("vit_small_patch16", "vit_small_patch16_224"),
    "vit_base_patch16": _vit("vit_base_patch16", "vit_base_patch16_224"),
    "efficientnet_lite0": lambda aux_layer: EfficientNetLite0Encoder("efficientnet_lite0"),
}


def build_encoder(name: str, aux_layer: int = -3) -> Encoder:
    """Build the encoder `name` with random weights (load weights with `load_pretrained`).

    Args:
        name: one of `BACKBONES`.
        aux_layer: ViT block whose tokens form `F_aux` (ignored by EfficientNet-Lite0).

    Raises:
        ConfigError: unknown name (the message lists the choices) or an invalid `aux_layer`.
    """
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (set model.backbone)"
        )
    return BACKBONES[name](aux_layer)
