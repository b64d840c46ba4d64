"""BatchNorm folded into the convolution before it, for a network that only ever runs in eval mode.

The assignment network (teacher) is never trained by back-propagation and always runs in eval
mode, so each BatchNorm is a per-channel affine map `y = (x - mean) * s + beta`,
`s = gamma / sqrt(var + eps)`, that can be folded into the convolution feeding it:
`W' = W * s` (per output channel) and `b' = (b - mean) * s + beta`. Where ReLU6 follows the
BatchNorm, the folded pass runs it inside the convolution (oneDNN's fused conv + ReLU6 on the CPU)
or, where that cannot run, in place right after it; on the CPU the demo's teacher pass is 1.8x
faster (docs/benchmarks.md).

`FoldedNetwork` keeps the original network as the one owner of the weights (checkpoints, EMA and
`cosa eval` use it unchanged) and runs a twin that shares every tensor except the folded
convolutions' weights and biases. Those are recomputed whenever a tensor they derive from has
changed (tracked through PyTorch's in-place version counters and data pointers), so an EMA step
or a `load_state_dict` can never leave the twin stale.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn

from cosa.model.backbone import ExportableReLU6, StaticSamePadConv2d

log = logging.getLogger(__name__)

_FOLDABLE_NORMS = (nn.BatchNorm2d, BatchNormAct2d)

Net = TypeVar("Net", bound=nn.Module)


def _fused_conv_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution (x86 and ARM CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


class _ConvReLU6(nn.Module):
    """A twin's convolution, its BatchNorm folded into its weights, and the ReLU6 that followed.

    Without autograd, on float32 CPU tensors, conv + bias + ReLU6 run as one oneDNN primitive
    (`mkldnn::_convolution_pointwise`, the op torch.compile's CPU backend emits for this pattern):
    the activation is applied as each output block is written, not in a second pass over the
    whole map (0.82x the time of conv then clamp over the demo teacher's 32 such layers,
    0.43-0.97x per layer, with the same values: benchmarks/fused_relu6.py). Anywhere else (CUDA,
    autograd, tracing, another conv type) the conv runs as itself and ReLU6 in place, which is
    safe because the conv's output has no other consumer.

    Attributes:
        conv: the twin's conv, whose weight and bias the fold rewrites.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        # Plain and statically padded convs only: a subclass may change what forward computes.
        self._fusable = (
            type(conv) in (nn.Conv2d, StaticSamePadConv2d)
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and _fused_conv_available()
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'): the conv, then ReLU6."""
        if (
            self._fusable
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            conv = self.conv
            if isinstance(conv, StaticSamePadConv2d):
                x = F.pad(x, conv.same_pad)
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                conv.weight,
                conv.bias,
                list(conv.padding),
                list(conv.stride),
                list(conv.dilation),
                conv.groups,
                "hardtanh",
                [0.0, 6.0],
                "",
            )
        return self.conv(x).clamp_(0.0, 6.0)


class _LeafTracer(torch.fx.Tracer):
    """Keeps convolutions, BatchNorms and activations whole, so the graph shows who feeds whom."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(
            m, (nn.Conv2d, *_FOLDABLE_NORMS, ExportableReLU6)
        ) or super().is_leaf_module(m, module_qualified_name)


def foldable_pairs(network: nn.Module) -> list[tuple[str, str]]:
    """`(conv, norm)` qualified names where the conv's output feeds only that BatchNorm.

    The network is traced with torch.fx; a module that cannot be traced (data-dependent Python,
    for instance) is searched child by child, so one untraceable head does not hide the encoder.
    Norms of other types than `nn.BatchNorm2d` and timm's `BatchNormAct2d` (whose dropout and
    activation are kept), or without running statistics, are left alone.
    """
    return list(_pairs_below(network, ""))


def _pairs_below(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    if not any(isinstance(m, _FOLDABLE_NORMS) for m in module.modules()):
        return
    try:
        graph = _LeafTracer().trace(module)
    except Exception as error:  # fx raises many types on untraceable Python; go one level down
        log.debug("not folding inside %s as a whole (%s); trying its children", prefix, error)
        for name, child in module.named_children():
            yield from _pairs_below(child, f"{prefix}{name}.")
        return
    modules = dict(module.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_norm(modules[node.target]):
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
            and modules[source.target].out_channels == modules[node.target].num_features
        ):
            yield f"{prefix}{source.target}", f"{prefix}{node.target}"


def _is_foldable_norm(module: nn.Module) -> bool:
    return (
        type(module) in _FOLDABLE_NORMS
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def _has_relu6(norm: nn.Module) -> bool:
    """Whether `norm` ends in ReLU6 (timm's `BatchNormAct2d` with the backbone's ReLU6)."""
    return isinstance(norm, BatchNormAct2d) and isinstance(norm.act, ExportableReLU6)


def _after_norm(norm: nn.Module) -> nn.Module:
    """What is left of `norm` (eval mode) once its affine map, and any ReLU6, live in the conv."""
    if isinstance(norm, BatchNormAct2d):
        return norm.drop if _has_relu6(norm) else nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


@dataclass
class _Pair:
    conv: nn.Conv2d  # in the source network
    norm: nn.BatchNorm2d
    folded: nn.Conv2d  # in the twin

    def sources(self) -> Iterator[Tensor]:
        yield self.conv.weight
        if self.conv.bias is not None:
            yield self.conv.bias
        if self.norm.weight is not None:
            yield self.norm.weight
            yield self.norm.bias
        yield self.norm.running_mean
        yield self.norm.running_var

    @torch.no_grad()
    def refresh(self) -> None:
        """Write `W * s` and `(b - mean) * s + beta` into the twin's conv."""
        scale = torch.rsqrt(self.norm.running_var + self.norm.eps)  # (C_out,)
        if self.norm.weight is not None:
            scale = scale * self.norm.weight
        weight = self.conv.weight * scale.view(-1, *([1] * (self.conv.weight.dim() - 1)))
        shift = (
            -self.norm.running_mean
            if self.conv.bias is None
            else self.conv.bias - self.norm.running_mean
        )
        bias = shift * scale
        if self.norm.bias is not None:
            bias = bias + self.norm.bias
        self.folded._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        self.folded._parameters["bias"] = nn.Parameter(bias, requires_grad=False)


class FoldedNetwork(Generic[Net]):
    """Runs eval-mode `source` with its conv -> BatchNorm pairs folded; outputs equal the source's
    up to float rounding.

    Call it as the source: `FoldedNetwork(teacher)(x)`. Build it once the source is on its device:
    parameters that are not folded are the source's own tensors, so in-place updates of the source
    (EMA, `load_state_dict`) reach the twin directly; the folded ones are recomputed on the first
    call after any of their inputs changed. With nothing to fold (a ViT) the call is the source's.

    Attributes:
        source: the network that owns the weights.
        pairs: `(conv, norm)` qualified names that are folded.
    """

    def __init__(self, source: Net) -> None:
        self.source = source
        self.pairs = foldable_pairs(source)
        self._pairs: list[_Pair] = []
        self._seen: tuple[tuple[int, int], ...] = ()
        self._twin: Net = source
        if not self.pairs:
            return
        self._twin = copy.deepcopy(source)
        source_modules = dict(source.named_modules())
        twin_modules = dict(self._twin.named_modules())
        for name, module in twin_modules.items():
            # Shared, not copied: the folded convs get their own weights at the first refresh.
            module._parameters.update(source_modules[name]._parameters)
            module._buffers.update(source_modules[name]._buffers)
        for conv_name, norm_name in self.pairs:
            norm, twin_conv = source_modules[norm_name], twin_modules[conv_name]
            _replace(twin_modules, norm_name, _after_norm(norm))
            if _has_relu6(norm):
                _replace(twin_modules, conv_name, _ConvReLU6(twin_conv))
            self._pairs.append(_Pair(source_modules[conv_name], norm, twin_conv))

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        """Where and at which in-place version each folded input is: any change means stale."""
        return tuple((t.data_ptr(), t._version) for pair in self._pairs for t in pair.sources())

    def refresh(self) -> None:
        """Recompute the folded weights if any of their inputs changed since the last call."""
        stamp = self._stamp()
        if stamp == self._seen:
            return
        for pair in self._pairs:
            pair.refresh()
        self._seen = stamp

    def refreshed(self) -> Net:
        """The folded twin, current with the source now: a network of the source's class to hand
        to code that needs one (an evaluation between two steps). It goes stale when the source
        changes next; call this again then.

        Raises:
            RuntimeError: the source is in train mode (BatchNorm then normalises with the batch's
                statistics, which cannot be folded).
        """
        if self.source.training:
            raise RuntimeError("FoldedNetwork runs an eval-mode network; call source.eval() first")
        self.refresh()
        return self._twin

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The source's forward on the folded twin (see `refreshed` for the errors)."""
        return self.refreshed()(*args, **kwargs)


def _replace(modules: dict[str, nn.Module], name: str, replacement: nn.Module) -> None:
    """Put `replacement` where the submodule `name` is (`modules`: the root's `named_modules()`)."""
    parent, _, attribute = name.rpartition(".")
    setattr(modules[parent], attribute, replacement)
