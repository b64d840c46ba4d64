"""CosaNet, encoders and heads: shapes at odd sizes, head semantics, fidelity to timm, groups."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cosa.config import BACKBONES as CONFIG_BACKBONES
from cosa.config import ModelConfig
from cosa.errors import ConfigError
from cosa.model import BACKBONE_CHOICES, CosaNet, build_encoder, build_model
from cosa.model.backbone import ExportableReLU6

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only

BACKBONES_UNDER_TEST = ("vit_tiny_patch16", "efficientnet_lite0")


@pytest.fixture(scope="module")
def nets() -> dict[str, CosaNet]:
    """One tiny network per backbone (3 classes), shared read-only by the tests of this file."""
    torch.manual_seed(0)
    return {
        name: build_model(
            ModelConfig(backbone=name, decoder_channels=16), num_classes=3, load_pretrained=False
        ).eval()
        for name in BACKBONES_UNDER_TEST
    }


def test_backbone_choices_match_config() -> None:
    assert set(BACKBONE_CHOICES) == set(CONFIG_BACKBONES)


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_encoder("resnet50", aux_layer=-3)
    message = str(info.value)
    assert "'resnet50'" in message
    for name in CONFIG_BACKBONES:
        assert name in message


def test_aux_layer_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"aux_layer=12 .*\[-12, 11\]"):
        build_encoder("vit_tiny_patch16", aux_layer=12)


def test_zero_classes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        CosaNet(ModelConfig(backbone="vit_tiny_patch16", decoder_channels=8), num_classes=0)


@pytest.mark.parametrize("backbone", BACKBONES_UNDER_TEST)
def test_output_shapes_at_odd_size(nets: dict[str, CosaNet], backbone: str) -> None:
    net = nets[backbone]
    x = torch.randn(1, 3, 333, 517)
    with torch.no_grad():
        out = net(x)
    dim = net.encoder.out_channels
    assert out.cls_logits.shape == (1, 3)
    assert out.aux_cls_logits.shape == (1, 3)
    assert out.cam.shape == (1, 3, 20, 32)  # floor(333 / 16), floor(517 / 16)
    assert out.aux_cam.shape == (1, 3, 20, 32)
    assert out.seg.shape == (1, 4, 20, 32)
    assert out.features.shape == (1, dim, 20, 32)
    assert net.encoder.stride == 16


@pytest.mark.parametrize("backbone", BACKBONES_UNDER_TEST)
def test_heads_follow_gmp_then_classifier(nets: dict[str, CosaNet], backbone: str) -> None:
    net = nets[backbone]
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out = net(x)
        _, aux_features = net.encoder(x)
        seg_only = net.forward_seg(x)
    weight = net.classifier.classifier.weight[:, :, 0, 0]  # (C, D)
    pooled = out.features.amax(dim=(2, 3))  # global MAX pool, (B, D)
    torch.testing.assert_close(out.cls_logits, pooled @ weight.T)
    torch.testing.assert_close(out.cam, torch.einsum("cd,bdhw->bchw", weight, out.features))
    aux_weight = net.aux_classifier.classifier.weight[:, :, 0, 0]
    torch.testing.assert_close(out.aux_cls_logits, aux_features.amax(dim=(2, 3)) @ aux_weight.T)
    torch.testing.assert_close(out.aux_cam, torch.einsum("cd,bdhw->bchw", aux_weight, aux_features))
    torch.testing.assert_close(seg_only, out.seg)


def test_mean_cam_pooling_makes_image_logits_the_mean_of_the_cam() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", decoder_channels=16, cam_pooling="mean")
    net = build_model(cfg, num_classes=3, load_pretrained=False).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 48, 80))
    # GAP then a linear 1x1 classifier = the spatial mean of the CAM logits (max pooling is not).
    torch.testing.assert_close(out.cls_logits, out.cam.mean(dim=(2, 3)))
    torch.testing.assert_close(out.aux_cls_logits, out.aux_cam.mean(dim=(2, 3)))
    assert not torch.allclose(
        out.cls_logits,
        out.features.amax(dim=(2, 3)) @ net.classifier.classifier.weight[:, :, 0, 0].T,
    )


def test_unknown_cam_pooling_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.cam_pooling must be one of max, mean, got 'avg'"):
        CosaNet(ModelConfig(backbone="efficientnet_lite0", cam_pooling="avg"), num_classes=3)


def test_large_fov_layout() -> None:
    cfg = ModelConfig(backbone="efficientnet_lite0", decoder_channels=32, decoder_dilation=5)
    net = CosaNet(cfg, num_classes=20)
    convs = [m for m in net.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [
        (32, 320, 3, 3),
        (32, 32, 3, 3),
        (21, 32, 1, 1),
    ]
    assert [c.dilation for c in convs[:2]] == [(5, 5), (5, 5)]
    assert all(c.bias is None for c in convs)
    assert net.classifier.classifier.bias is None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.decoder.modules())


def test_vit_features_match_timm_and_aux_is_block_10_without_norm(
    nets: dict[str, CosaNet],
) -> None:
    encoder = nets["vit_tiny_patch16"].encoder  # built with aux_layer=-3
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(encoder.vit.state_dict())
    captured = {}
    hook = encoder.vit.blocks[9].register_forward_hook(
        lambda m, i, o: captured.setdefault("b10", o)
    )
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            features, aux = encoder(x)
            expected = reference.forward_features(x)[:, 1:]  # patch tokens after the final norm
    finally:
        hook.remove()
    assert encoder.aux_block == 9
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected)
    torch.testing.assert_close(aux.flatten(2).transpose(1, 2), captured["b10"][:, 1:])


def test_vit_pos_embed_is_frozen_and_resized_bicubically(nets: dict[str, CosaNet]) -> None:
    encoder = nets["vit_tiny_patch16"].encoder
    assert not encoder.vit.pos_embed.requires_grad
    assert encoder.vit.cls_token.requires_grad
    grid = encoder.vit.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(20, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        resized = encoder._position_embedding(20, 32)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))


def test_efficientnet_static_same_padding_equals_timm(nets: dict[str, CosaNet]) -> None:
    encoder = nets["efficientnet_lite0"].encoder
    reference = timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=False,
        features_only=True,
        output_stride=16,
        out_indices=(3, 4),
    ).eval()
    reference.load_state_dict(encoder.body.state_dict())
    x = torch.randn(2, 3, 70, 101)  # cropped to 64 x 96 inside the encoder
    with torch.no_grad():
        features, aux = encoder(x)
        ref_aux, ref_features = reference(x[..., :64, :96])  # timm's dynamic 'SAME' padding
    assert (encoder.out_channels, encoder.aux_channels) == (320, 112)
    assert features.shape == (2, 320, 4, 6)
    torch.testing.assert_close(features, ref_features)
    torch.testing.assert_close(aux, ref_aux)


def test_relu6_trains_as_relu6_and_exports_as_a_clamp() -> None:
    """The same function both ways; torch.export sees the core clamp op, eager mode relu6 (whose
    backward is one kernel)."""
    act = ExportableReLU6()
    x = torch.tensor([-1.0, 0.0, 2.5, 6.0, 7.0], requires_grad=True)
    y = act(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 2.5, 6.0, 6.0]), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # hardtanh's: open interval
    assert "hardtanh" in y.grad_fn.name().lower()
    program = torch.export.export(act, (torch.randn(2, 3),))
    ops = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert ops == [torch.ops.aten.clamp.default]


def test_param_groups_cover_trainable_params_once(nets: dict[str, CosaNet]) -> None:
    net = nets["vit_tiny_patch16"]
    groups = net.param_groups(lr=1e-4, head_lr_scale=10.0, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["encoder", "classifiers", "decoder"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-3])
    assert all(g["weight_decay"] == 0.01 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert id(net.encoder.vit.pos_embed) not in set(ids)
    head_ids = {id(p) for m in (net.classifier, net.aux_classifier) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_ids
    torch.optim.AdamW(groups)  # accepted as is
