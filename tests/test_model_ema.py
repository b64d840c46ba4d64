"""The assignment network: creation from the student and the EMA update."""

from __future__ import annotations

import pytest
import torch

from cosa.config import ModelConfig
from cosa.errors import ConfigError
from cosa.model import CosaNet, build_model, ema_update, make_teacher

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only


def student(backbone: str = "efficientnet_lite0", num_classes: int = 3) -> CosaNet:
    cfg = ModelConfig(backbone=backbone, decoder_channels=8)
    return build_model(cfg, num_classes=num_classes, load_pretrained=False)


def heads(net: CosaNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("encoder.")}


def test_teacher_copies_encoder_and_reinitialises_heads() -> None:
    torch.manual_seed(0)
    net = student()
    teacher = make_teacher(net, copy_heads=False)
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(teacher.encoder.state_dict()[key], value), key
    own, theirs = heads(net), heads(teacher)
    assert own.keys() == theirs.keys()
    assert all(not torch.equal(own[k], theirs[k]) for k in own)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in net.parameters())  # the student is untouched


def test_teacher_can_copy_heads() -> None:
    net = student()
    teacher = make_teacher(net, copy_heads=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in teacher.state_dict().items())


def test_ema_update_formula_and_buffers() -> None:
    torch.manual_seed(0)
    net = student()
    teacher = make_teacher(net, copy_heads=False)
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1, 1)
        net.encoder.body.bn1.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    ema_update(teacher, net, momentum=0.9)
    for name, param in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(net.named_parameters())[name]
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6)
    # Buffers (BatchNorm statistics) are copied, not averaged.
    assert torch.equal(teacher.encoder.body.bn1.running_mean, torch.full((32,), 0.25))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_update_on_known_values() -> None:
    net = student()
    teacher = make_teacher(net, copy_heads=True)
    with torch.no_grad():
        net.classifier.classifier.weight.fill_(1.0)
        teacher.classifier.classifier.weight.fill_(3.0)
    ema_update(teacher, net, momentum=0.75)  # 0.75 * 3 + 0.25 * 1
    assert torch.all(teacher.classifier.classifier.weight == 2.5)
    ema_update(teacher, net, momentum=1.0)
    assert torch.all(teacher.classifier.classifier.weight == 2.5)
    ema_update(teacher, net, momentum=0.0)
    assert torch.all(teacher.classifier.classifier.weight == 1.0)


def test_teacher_never_gets_gradients() -> None:
    net = student()
    teacher = make_teacher(net, copy_heads=False)
    x = torch.randn(2, 3, 32, 48, requires_grad=True)
    out = teacher(x)
    (out.seg.sum() + out.cls_logits.sum()).backward()
    assert x.grad is not None  # the graph ran; only the teacher's weights are excluded
    assert all(p.grad is None for p in teacher.parameters())


def test_mismatched_networks_raise() -> None:
    net = student(num_classes=3)
    other = student(num_classes=3)
    other.decoder.extra = torch.nn.Conv2d(1, 1, 1)  # a parameter the student lacks
    with pytest.raises(ConfigError, match="different parameters"):
        ema_update(other, net, momentum=0.99)
