"""onnxruntime-fused ViT graph (`model.ort.onnx`): fused ops present, same numbers as PyTorch.

One export of a ViT-Ti cut to 2 blocks (as in test_export_pipeline.py), with every LayerNorm and
bias set to distinct random values: a random-init ViT has all-ones/all-zeros LayerNorm parameters,
identical across blocks, under which a fusion that wires the wrong block's parameters would still
match PyTorch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import KEEP_BLOCKS, save_net_checkpoint, shallow_loader

from cosa.config import ModelConfig
from cosa.errors import ExportError
from cosa.export import pipeline
from cosa.export.fusion import fuse_vit, vit_attention_shape
from cosa.export.onnx_export import check_graph
from cosa.export.pipeline import ExportOptions, ExportResult, export_artifacts
from cosa.export.spec import read_spec
from cosa.export.verify import FP32_TOLERANCE, compare, onnxruntime_runner, random_images
from cosa.export.verify import torch_runner as eager_runner
from cosa.model import DeployModel, build_model
from cosa.serving.runners import OnnxRuntimeRunner

CLASS_NAMES = ["background", "disc", "ring"]
PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
VERIFY_SHAPES = ((1, 48, 48), (2, 37, 53), (1, 50, 70))  # two sizes not multiples of 16


def write_checkpoint(path: Path, backbone: str = "vit_tiny_patch16") -> Path:
    cfg = ModelConfig(backbone=backbone, decoder_channels=16)
    torch.manual_seed(0)
    net = build_model(cfg, num_classes=len(CLASS_NAMES) - 1, load_pretrained=False)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0))
    return save_net_checkpoint(net, cfg, CLASS_NAMES, PALETTE, path)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ExportResult, DeployModel]]:
    root = tmp_path_factory.mktemp("fusion")
    checkpoint = write_checkpoint(root / "best.pt")
    options = ExportOptions(verify_shapes=VERIFY_SHAPES, ort_fusion="auto")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_deploy_model", shallow_loader)
        result = export_artifacts(checkpoint, root / "artifacts", options)
    model, _ = shallow_loader(checkpoint)
    yield result, model


def test_fused_graph_has_fused_ops_and_keeps_names_and_dynamic_dims(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, _ = exported
    proto = onnx.load(str(result.out / "model.ort.onnx"))
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["MultiHeadAttention"] == KEEP_BLOCKS
    assert ops["SkipLayerNormalization"] >= KEEP_BLOCKS  # residual + LayerNorm pairs
    assert ops["BiasGelu"] == KEEP_BLOCKS
    assert ops["Softmax"] == 0 and ops["Erf"] == 0  # nothing of the unfused blocks left
    check_graph(proto, opset=18)  # names `images` -> `logits`, `mask`; N, H, W symbolic


def test_fused_graph_matches_pytorch_at_other_shapes(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, model = exported
    # Independently of the pipeline's check: other odd sizes and batch 3, so the fused attention
    # sees sequence lengths and batches it was not verified at.
    images = random_images([(3, 29, 61), (1, 64, 17), (2, 45, 45)], seed=7)
    report = compare(
        onnxruntime_runner(result.out / "model.ort.onnx"),
        eager_runner(model),
        images,
        artifact="model.ort.onnx",
        reference_name="torch",
        images_name="random",
        tolerance=FP32_TOLERANCE,
    )
    assert report.max_abs_diff < 1e-4 and report.min_mask_agreement >= 0.999


def test_spec_records_fusion_and_its_verification(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, _ = exported
    spec = read_spec(result.out)
    assert spec.extra_artifacts == {"fp32": "model.onnx", "fp32_ort": "model.ort.onnx"}
    assert spec.artifact == "model.onnx"  # the portable graph stays the primary artifact
    assert spec.fusion is not None
    assert spec.fusion["attention_layers"] == KEEP_BLOCKS
    assert (spec.fusion["num_heads"], spec.fusion["hidden_size"]) == (3, 192)  # ViT-Ti
    assert spec.fusion["fused_ops"]["MultiHeadAttention"] == KEEP_BLOCKS
    entry = (spec.verification or {})["model.ort.onnx"]
    assert entry["reference"] == "torch eager fp32" and entry["passed"]
    assert [s["shape"][2:] for s in entry["shapes"]] == [[48, 48], [37, 53], [50, 70]]
    assert entry["max_abs_diff"] < 1e-4 and entry["min_mask_agreement"] >= 0.999


def test_onnxruntime_runner_prefers_the_fused_graph(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, _ = exported
    images = random_images([(2, 40, 56)], seed=3)[0]
    with (
        OnnxRuntimeRunner(result.out, return_logits=True) as fused,
        OnnxRuntimeRunner(result.out, return_logits=True, fused=False) as plain,
        OnnxRuntimeRunner(result.out / "model.onnx") as by_file,
    ):
        assert fused.path.name == "model.ort.onnx"
        assert plain.path.name == "model.onnx" and by_file.path.name == "model.onnx"
        a, b = fused.infer(images), plain.infer(images)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
    assert np.mean(a["mask"] == b["mask"]) >= 0.999


def test_fuse_vit_refuses_a_graph_without_vit_attention(
    exported: tuple[ExportResult, DeployModel], tmp_path: Path
) -> None:
    result, _ = exported
    fused = result.out / "model.ort.onnx"  # no Softmax left: nothing to fuse
    with pytest.raises(ExportError, match="no ViT self-attention"):
        fuse_vit(fused, tmp_path / "again.onnx", num_heads=3, hidden_size=192)


def test_ort_fusion_on_refuses_a_cnn_backbone_before_exporting(tmp_path: Path) -> None:
    cfg = ModelConfig(backbone="efficientnet_lite0", decoder_channels=16)
    net = build_model(cfg, num_classes=2, load_pretrained=False)
    assert vit_attention_shape(net) is None
    checkpoint = write_checkpoint(tmp_path / "cnn.pt", backbone="efficientnet_lite0")
    with pytest.raises(ExportError, match="needs a ViT backbone"):
        export_artifacts(checkpoint, tmp_path / "out", ExportOptions(ort_fusion="on"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="ort_fusion 'sometimes' is not one of"):
        ExportOptions(ort_fusion="sometimes")
