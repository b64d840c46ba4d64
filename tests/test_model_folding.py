"""BatchNorm folded into the teacher's convolutions: the same outputs, never stale."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import scramble_norms
from torch import nn

from cosa.config import ModelConfig
from cosa.model import CosaNet, DeployModel, build_model, ema_update, make_teacher
from cosa.model.folding import FoldedNetwork, _ConvReLU6, _fused_conv_available, foldable_pairs

pytestmark = pytest.mark.usefixtures("no_network")  # weights come from local files only


def networks(seed: int = 0) -> tuple[CosaNet, CosaNet]:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="efficientnet_lite0", decoder_channels=8)
    student = build_model(cfg, num_classes=3, load_pretrained=False)
    scramble_norms(student, seed)
    return student, make_teacher(student, copy_heads=True)


def assert_same_outputs(folded: FoldedNetwork, net: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = net(x), folded(x)
    for name in expected._fields:
        want, got = getattr(expected, name), getattr(actual, name)
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * max(scale, 1.0), msg=name)


def test_every_batchnorm_of_the_efficientnet_folds_and_outputs_stay_equal() -> None:
    _, teacher = networks()
    folded = FoldedNetwork(teacher)
    norms = [n for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(norm for _, norm in folded.pairs) == sorted(norms)
    assert len(norms) == 48
    assert all(
        conv.endswith(("conv_stem", "conv_dw", "conv_pw", "conv_pwl")) for conv, _ in folded.pairs
    )
    x = torch.randn(2, 3, 64, 96)
    assert_same_outputs(folded, teacher, x)
    # The source's weights are untouched by folding and by the in-place activations.
    fresh = make_teacher(teacher, copy_heads=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert_same_outputs(folded, teacher, x)


@pytest.mark.skipif(not _fused_conv_available(), reason="needs PyTorch's oneDNN (CPU) build")
def test_relu6_runs_inside_the_folded_convolution_as_the_unfused_pass_computes_it() -> None:
    """Without autograd on the CPU each conv + ReLU6 is one oneDNN op and no clamp is left; with
    autograd on, the conv and an in-place clamp run instead, with the same outputs."""
    _, teacher = networks()
    folded = FoldedNetwork(teacher)
    relu6_convs = [m for m in folded.refreshed().modules() if isinstance(m, _ConvReLU6)]
    # The stem, the first block's depthwise conv, and the expansion and depthwise conv of the 15
    # blocks after it: every ReLU6 of the encoder.
    assert len(relu6_convs) == 32
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)  # as in training
    with torch.no_grad(), torch.profiler.profile() as prof:
        fused = folded(x)
    ops = [event.name for event in prof.events()]
    assert ops.count("mkldnn::_convolution_pointwise") == len(relu6_convs)
    assert "aten::clamp_" not in ops
    unfused = folded(x)  # autograd on
    for name in fused._fields:
        want = getattr(unfused, name)
        scale = float(want.abs().max())
        torch.testing.assert_close(getattr(fused, name), want, rtol=0, atol=1e-6 * max(scale, 1.0))


def test_the_fold_follows_ema_steps_and_loaded_weights() -> None:
    student, teacher = networks(0)
    folded = FoldedNetwork(teacher)
    x = torch.randn(2, 3, 64, 64)
    assert_same_outputs(folded, teacher, x)
    scramble_norms(student, 1)
    ema_update(teacher, student, momentum=0.5)  # parameters averaged, statistics copied
    assert_same_outputs(folded, teacher, x)
    other, _ = networks(2)
    teacher.load_state_dict(other.state_dict())
    assert_same_outputs(folded, teacher, x)
    assert_same_outputs(folded, other.eval(), x)


def test_the_fold_is_recomputed_only_when_its_inputs_change() -> None:
    student, teacher = networks()
    folded = FoldedNetwork(teacher)
    twin_conv = folded._pairs[0].folded
    folded.refresh()
    weight = twin_conv.weight
    folded.refresh()
    assert twin_conv.weight is weight
    ema_update(teacher, student, momentum=0.9)
    folded.refresh()
    assert twin_conv.weight is not weight


def test_a_copy_folds_its_own_source() -> None:
    """A deep copy of a training state (the run-time estimate makes one) folds its own teacher."""
    student, teacher = networks()
    folded = FoldedNetwork(teacher)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = folded(x).seg.clone()
    twin_teacher, twin_folded = copy.deepcopy((teacher, folded))
    scramble_norms(twin_teacher, 3)
    assert_same_outputs(twin_folded, twin_teacher, x)
    with torch.no_grad():
        assert torch.equal(folded(x).seg, before)


class _SharedConv(nn.Module):
    """A conv whose output feeds its BatchNorm and a skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_a_conv_with_a_second_consumer_is_not_folded() -> None:
    assert foldable_pairs(_SharedConv()) == []
    net = _SharedConv().eval()
    scramble_norms(net, 0)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(FoldedNetwork(net)(x), net(x), rtol=0, atol=0)


def test_a_conv_bias_is_folded_too() -> None:
    net = _Chain().eval()
    scramble_norms(net, 0)
    with torch.no_grad():
        net.conv.bias.uniform_(-1, 1)
    folded = FoldedNetwork(net)
    assert folded.pairs == [("conv", "norm")]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_network_in_train_mode_is_refused() -> None:
    net = _Chain()
    with pytest.raises(RuntimeError, match="eval-mode"):
        FoldedNetwork(net)(torch.randn(1, 3, 8, 8))


def test_the_refreshed_twin_deploys_as_the_source() -> None:
    """Evaluations hand the twin to `DeployModel`: the same logits as the teacher's own."""
    student, teacher = networks()
    folded = FoldedNetwork(teacher)
    images = torch.rand(2, 3, 50, 70) * 255
    with torch.no_grad():
        want = DeployModel(teacher).eval()(images)
        got = DeployModel(folded.refreshed()).eval()(images)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4 * float(want[0].abs().max()))
        assert (got[1] == want[1]).float().mean() > 0.999
        scramble_norms(student, 5)
        ema_update(teacher, student, momentum=0.0)  # the twin handed out before is stale now
        moved = DeployModel(teacher).eval()(images)
        assert float((moved[0] - want[0]).abs().max()) > 1e-2
        want = moved
        got = DeployModel(folded.refreshed()).eval()(images)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4 * float(want[0].abs().max()))
