"""Dynamo ONNX export of the networks with dynamic N, H, W, checked in onnxruntime at odd sizes.

The export module relies on this: the training forward and the deploy forward both trace without
baked sizes (the legacy exporter's silent failure mode, DEPLOYMENT.md), for both backbones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import cut_vit
from torch import nn
from torch.export import Dim

from cosa.config import ModelConfig
from cosa.model import CosaNet, DeployModel, build_model

ort = pytest.importorskip("onnxruntime")

# Two sizes that are not multiples of 16, with another batch size than the export example's.

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only

CHECK_SHAPES = ((1, 3, 333, 517), (3, 3, 200, 250))
OUTPUT_NAMES = (
    "logits",
    "mask",
    "cls_logits",
    "aux_cls_logits",
    "cam",
    "aux_cam",
    "seg",
    "features",
)


class DeployAndTrain(nn.Module):
    """Both forwards in one graph, so one export checks both: the deploy forward on raw pixels and
    the training forward on the same pixels (standing in for normalised input) at their odd size."""

    def __init__(self, net: CosaNet) -> None:
        super().__init__()
        self.net = net
        self.deploy = DeployModel(net)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*self.deploy(images), *self.net(images / 255))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit_tiny_patch16", "efficientnet_lite0"])
def test_dynamo_onnx_export_matches_torch_at_odd_sizes(backbone: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model(
        ModelConfig(backbone=backbone, decoder_channels=16), num_classes=3, load_pretrained=False
    )
    model = DeployAndTrain(cut_vit(net)).eval()
    path = tmp_path / "model.onnx"
    example = torch.rand(2, 3, 64, 96) * 255
    dynamic = {"images": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)

    for shape in CHECK_SHAPES:
        images = torch.rand(*shape) * 255
        with torch.no_grad():
            expected = model(images)
        got = session.run(None, {"images": images.numpy()})
        n, _, height, width = shape
        assert got[0].shape == (n, 4, height, width) and got[0].dtype == np.float32
        assert got[1].shape == (n, height, width) and got[1].dtype == np.int32
        assert got[4].shape == (n, 3, height // 16, width // 16)  # the training forward's grid
        for name, ours, ref in zip(OUTPUT_NAMES, got, expected, strict=True):
            if name == "mask":
                continue
            np.testing.assert_allclose(
                ours,
                ref.numpy(),
                rtol=1e-3,
                atol=1e-3 * ref.abs().max().item(),
                err_msg=f"{backbone} {name} at {shape}",
            )
        # The mask may differ only where two classes are tied within the float tolerance.
        top2 = np.sort(got[0], axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 1e-3
        np.testing.assert_array_equal(got[1][decisive], expected[1].numpy()[decisive])
        assert decisive.mean() > 0.95
