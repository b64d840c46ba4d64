"""onnxruntime-only fused graph of a ViT deploy network (`model.ort.onnx`).

The plain FP32 export (`model.onnx`) spells every transformer block out in standard ONNX ops: the
attention as MatMul -> Softmax -> MatMul over explicitly sliced and transposed Q, K, V, the
LayerNorm/residual pairs and GELU as separate nodes. onnxruntime's CPU provider runs that graph
with one general MatMul per product and a materialised (N * heads, S, S) score tensor per layer,
which at batch 8 and 448 px (S = 785 tokens) is slower than torch's fused CPU attention.

`fuse_vit(src, dst, num_heads, hidden_size)` rewrites it with onnxruntime's contrib ops:

  * every self-attention sub-graph (QKV projection, scaled Q K^T, Softmax, x V, head merge) into
    three (D, D) MatMuls for Q, K, V and one `com.microsoft.MultiHeadAttention` (QKV bias, scale
    read from the graph, a flash-attention kernel on the CPU without the (N * heads, S, S) score
    tensor); the sequence length stays dynamic, so any H, W still runs. The sub-graph matched is
    the dynamo export of timm's `Attention` (qkv Linear -> reshape (N, S, 3, heads, head_dim) ->
    permute (2, 0, 3, 1, 4) -> unbind -> scaled_dot_product_attention -> transpose -> reshape);
  * then onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`, model type
    "vit") fuses residual + LayerNorm into `SkipLayerNormalization` and bias + GELU into
    `BiasGelu`.

Measured on ViT-S/16 at 448 px, 2 shared AVX2 cores (benchmarks/results/inference.md): attention
at batch 8 took 5.2 s as `com.microsoft.Attention` (no flash kernel on the CPU) and 2.5 s as
MultiHeadAttention; against torch eager, batch 1 went from 2.34x (model.onnx) to 2.6x and batch 8
from 1.04x to 1.11x (the GEMMs, ~64% of the time, are untouched by fusion).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from cosa.errors import ExportError
from cosa.export.onnx_export import check_graph

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
FUSED_OP_TYPES = ("MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "LayerNormalization")
"""Op types counted in `FusionSummary.fused_ops` (LayerNormalization: what is left unfused)."""


class NothingToFuseError(ExportError):
    """The graph holds no attention sub-graph this module recognises."""


@dataclass(frozen=True)
class FusionSummary:
    """What `fuse_vit` did (recorded in spec.json).

    Attributes:
        attention_layers: self-attention sub-graphs replaced by MultiHeadAttention.
        fused_ops: count per op type of FUSED_OP_TYPES in the written graph.
        nodes_before, nodes_after: node counts of the source and the fused graph.
    """

    attention_layers: int
    fused_ops: dict[str, int]
    nodes_before: int
    nodes_after: int


class _Graph:
    """Producer/consumer index over a graph's nodes and constant lookup."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        """The node producing `node.input[index]` if it is an `op_type`, else None."""
        if index >= len(node.input):
            return None
        parent = self.producer.get(node.input[index])
        return parent if parent is not None and parent.op_type == op_type else None

    def only_child(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        """The single consumer of `node`'s single output if it is an `op_type`, else None."""
        children = self.consumers.get(node.output[0], [])
        if len(children) != 1 or children[0].op_type != op_type:
            return None
        return children[0]

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def ints(self, node: onnx.NodeProto, name: str) -> list[int] | None:
        """An int or ints attribute of `node` as a list, None if absent."""
        for attr in node.attribute:
            if attr.name == name:
                value = helper.get_attribute_value(attr)
                return [int(v) for v in value] if isinstance(value, list) else [int(value)]
        return None

    def const_ints(self, name: str) -> list[int] | None:
        """A constant integer tensor as a flat list, None if `name` is not a constant."""
        value = self.constant(name)
        return None if value is None else [int(v) for v in value.reshape(-1)]


@dataclass
class _Attention:
    """One matched self-attention sub-graph."""

    x: str  # (N, S, D) input of the QKV projection
    weight: str  # (D, 3 * D) initializer
    bias: str  # (3 * D,) initializer
    scale: float
    output: str  # (N, S, D) merged heads
    anchor: onnx.NodeProto  # node the fused op is inserted before


def _qkv_slice(g: _Graph, name: str) -> tuple[onnx.NodeProto, int] | None:
    """(the 5-D permuted QKV tensor's producer, index) for `name` = qkv[index] (Slice + Squeeze)."""
    squeeze = g.producer.get(name)
    if squeeze is None or squeeze.op_type != "Squeeze":
        return None
    axes = g.const_ints(squeeze.input[1]) if len(squeeze.input) > 1 else None
    slice_ = g.parent(squeeze, 0, "Slice")
    if slice_ is None or axes != [0] or len(slice_.input) < 4:
        return None
    starts, ends, slice_axes = (g.const_ints(n) for n in slice_.input[1:4])
    steps = g.const_ints(slice_.input[4]) if len(slice_.input) > 4 else [1]
    if starts is None or ends is None or len(starts) != 1 or slice_axes != [0] or steps != [1]:
        return None
    if ends != [starts[0] + 1]:
        return None
    permuted = g.producer.get(slice_.input[0])
    return (permuted, starts[0]) if permuted is not None else None


def _through(g: _Graph, name: str, allowed: tuple[str, ...]) -> tuple[str, float]:
    """Walk up from `name` through single-input `allowed` ops; (reached name, product of scalar
    Mul constants passed)."""
    scale = 1.0
    while (node := g.producer.get(name)) is not None and node.op_type in allowed:
        if node.op_type == "Mul":
            value = g.constant(node.input[1])
            if value is None or value.size != 1:
                break
            scale *= float(value.reshape(()))
        name = node.input[0]
    return name, scale


def _match_attention(g: _Graph, softmax: onnx.NodeProto, hidden: int) -> _Attention | None:
    """Match the dynamo export of timm's `Attention` around `softmax` (see module docstring)."""
    if g.ints(softmax, "axis") not in ([-1], [3]):
        return None
    scores = g.parent(softmax, 0, "MatMul")
    context = g.only_child(softmax, "MatMul")
    if scores is None or context is None or context.input[0] != softmax.output[0]:
        return None
    merge = g.only_child(context, "Transpose")
    if merge is None or g.ints(merge, "perm") != [0, 2, 1, 3]:
        return None
    reshape = g.only_child(merge, "Reshape")
    if reshape is None:
        return None
    q_name, q_scale = _through(g, scores.input[0], ("Mul",))
    # K^T is exported as reshape/transpose/reshape of K, scaled like Q.
    k_name, k_scale = _through(g, scores.input[1], ("Mul", "Reshape", "Transpose"))
    parts = [p for n in (q_name, k_name, context.input[1]) if (p := _qkv_slice(g, n))]
    # Q, K, V must be slices 0, 1, 2 of one (3, N, heads, S, head_dim) permuted QKV tensor.
    if len(parts) != 3 or [index for _, index in parts] != [0, 1, 2]:
        return None
    permute = parts[0][0]
    if any(node is not permute for node, _ in parts) or permute.op_type != "Transpose":
        return None
    if g.ints(permute, "perm") != [2, 0, 3, 1, 4]:
        return None
    split = g.parent(permute, 0, "Reshape")
    add = g.parent(split, 0, "Add") if split is not None else None
    matmul = g.parent(add, 0, "MatMul") if add is not None else None
    if matmul is None or add is None:
        return None
    weight, bias = g.constant(matmul.input[1]), g.constant(add.input[1])
    if weight is None or bias is None or weight.shape != (hidden, 3 * hidden):
        return None
    if bias.shape != (3 * hidden,):
        return None
    return _Attention(
        x=matmul.input[0],
        weight=matmul.input[1],
        bias=add.input[1],
        scale=q_scale * k_scale,
        output=reshape.output[0],
        anchor=matmul,
    )


def _fuse_attention(model: onnx.ModelProto, num_heads: int, hidden: int) -> int:
    """Replace every matched attention sub-graph in place; return how many.

    Each becomes three MatMuls (Q, K, V columns of the QKV weight, (D, D) each) and one
    MultiHeadAttention that adds the QKV bias, splits heads, runs softmax(scale Q K^T) V (a
    flash-attention kernel on the CPU: no (N * heads, S, S) score tensor) and merges the heads
    into the (N, S, D) tensor the old sub-graph produced.
    """
    g = _Graph(model.graph)
    matches = [
        m
        for node in model.graph.node
        if node.op_type == "Softmax"
        if (m := _match_attention(g, node, hidden)) is not None
    ]
    for index, match in enumerate(matches):
        weight = g.constant(match.weight)  # (D, 3 * D), columns (3, heads, head_dim)
        assert weight is not None  # checked by _match_attention
        nodes, qkv = [], []
        for part, label in enumerate("qkv"):
            init = numpy_helper.from_array(
                np.ascontiguousarray(weight[:, part * hidden : (part + 1) * hidden]),
                f"{match.weight}_{label}",
            )
            model.graph.initializer.append(init)
            qkv.append(f"attention_{index}_{label}")
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [match.x, init.name],
                    [qkv[-1]],
                    name=f"attention_{index}_{label}_proj",
                )
            )
        nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                [*qkv, match.bias],
                [match.output],
                name=f"attention_{index}",
                domain=MS_DOMAIN,
                num_heads=num_heads,
                scale=match.scale,
            )
        )
        position = list(model.graph.node).index(match.anchor)
        for offset, node in enumerate(nodes):
            model.graph.node.insert(position + offset, node)
        # The old producer of `output` (the head-merging Reshape) goes; the rest of the old
        # sub-graph is then unread and removed below.
        model.graph.node.remove(g.producer[match.output])
    _remove_dead_nodes(model)
    return len(matches)


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def vit_attention_shape(model: nn.Module) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of the first timm ViT attention block in `model`, else None."""
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        heads = getattr(module, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int):
            return heads, qkv.in_features
    return None


def fuse_vit(src: Path, dst: Path, num_heads: int, hidden_size: int) -> FusionSummary:
    """Write the onnxruntime-fused graph of the ViT deploy ONNX `src` to `dst`.

    Args:
        src: a deploy-graph ONNX written by `export_onnx` from a timm ViT backbone.
        dst: destination `.onnx` (contrib ops: runs in onnxruntime only).
        num_heads: attention heads per block (6 for ViT-S).
        hidden_size: token width D (384 for ViT-S).

    Returns:
        What was fused (counts per op type).

    Raises:
        NothingToFuseError: no attention sub-graph matched (not a timm ViT export).
        ExportError: the fused graph fails `check_graph` (names, dynamic N/H/W).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    before = len(model.graph.node)
    layers = _fuse_attention(model, num_heads, hidden_size)
    if layers == 0:
        raise NothingToFuseError(
            f"{src}: no ViT self-attention sub-graph found to fuse; onnxruntime fusion applies to "
            "timm ViT backbones exported by cosa only"
        )
    options = FusionOptions("vit")
    options.enable_attention = False  # done above: its patterns do not match dynamo exports
    fused = optimize_by_fusion(model, "vit", num_heads, hidden_size, options).model
    if not any(o.domain == MS_DOMAIN for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    check_graph(fused, opset=opset, where=str(dst))
    onnx.save(fused, str(dst))
    counts = Counter(n.op_type for n in fused.graph.node)
    summary = FusionSummary(
        attention_layers=layers,
        fused_ops={op: counts.get(op, 0) for op in FUSED_OP_TYPES},
        nodes_before=before,
        nodes_after=len(fused.graph.node),
    )
    logger.info("fused %s: %s", dst, summary)
    return summary
