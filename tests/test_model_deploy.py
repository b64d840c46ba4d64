"""DeployModel: raw 0-255 RGB in, logits and mask at input size out, normalisation inside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cosa.config import ModelConfig
from cosa.model import CosaNet, DeployModel, build_model
from cosa.model.deploy import network_size

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module", params=["vit_tiny_patch16", "efficientnet_lite0"])
def net(request: pytest.FixtureRequest) -> CosaNet:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=request.param, decoder_channels=16)
    return build_model(cfg, num_classes=3, load_pretrained=False).eval()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((37, 53), (32, 48)),
        ((333, 517), (336, 512)),
        ((7, 5), (16, 16)),
        ((24, 40), (32, 48)),
        ((64, 96), (64, 96)),
    ],
)
def test_network_size_rounds_to_nearest_multiple_of_16(size: tuple, expected: tuple) -> None:
    assert network_size(*size) == expected


def test_outputs_at_input_size_and_mask_is_argmax_of_seg_stream(net: CosaNet) -> None:
    deploy = DeployModel(net).eval()
    images = torch.rand(2, 3, 37, 53) * 255
    with torch.no_grad():
        logits, mask = deploy(images)
        # The same computation by hand: normalise, resize to 32 x 48, seg stream, upsample.
        normalised = (images / 255 - IMAGENET_MEAN) / IMAGENET_STD
        resized = F.interpolate(normalised, size=(32, 48), mode="bilinear", align_corners=False)
        seg = net(resized).seg  # (2, 4, 2, 3)
        expected = F.interpolate(seg, size=(37, 53), mode="bilinear", align_corners=False)
    assert logits.shape == (2, 4, 37, 53) and logits.dtype == torch.float32
    assert mask.shape == (2, 37, 53) and mask.dtype == torch.int32
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(mask, logits.argmax(dim=1).to(torch.int32))
    assert torch.equal(mask, expected.argmax(dim=1).to(torch.int32))


def test_normalisation_inside_equals_prenormalised_input(net: CosaNet) -> None:
    deploy = DeployModel(net).eval()
    images = torch.rand(1, 3, 32, 48) * 255  # a multiple of 16: no resize before the network
    with torch.no_grad():
        logits, _ = deploy(images)
        seg = net.forward_seg((images / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    torch.testing.assert_close(
        logits,
        F.interpolate(seg, size=(32, 48), mode="bilinear", align_corners=False),
        rtol=1e-4,
        atol=1e-4,
    )


def test_tiny_input_and_state_dict_is_the_networks(net: CosaNet) -> None:
    deploy = DeployModel(net).eval()
    with torch.no_grad():
        logits, mask = deploy(torch.full((1, 3, 5, 3), 128.0))
    assert logits.shape == (1, 4, 5, 3) and mask.shape == (1, 5, 3)
    # Normalisation constants are code, not weights: checkpoints of the net load unchanged.
    assert set(deploy.state_dict()) == {f"net.{k}" for k in net.state_dict()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_runs_under_bf16_autocast(net: CosaNet) -> None:
    deploy = DeployModel(net).eval()
    images = torch.rand(2, 3, 45, 70) * 255
    with torch.no_grad():
        cpu_logits, _ = deploy(images)
        deploy.cuda()
        try:
            gpu_logits, gpu_mask = deploy(images.cuda())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net((images.cuda() / 255 - IMAGENET_MEAN.cuda()) / IMAGENET_STD.cuda())
        finally:
            deploy.cpu()
    # cuDNN may use TF32 for convolutions: compare relative to the logits' scale.
    scale = cpu_logits.abs().max().item()
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-2, atol=1e-2 * scale)
    assert gpu_mask.dtype == torch.int32
    assert out.seg.shape == (2, 4, 2, 4) and torch.isfinite(out.seg.float()).all()
