"""Config: presets, strict overrides with suggestions, YAML round trip."""

import dataclasses
from pathlib import Path

import pytest

from cosa.config import (
    CosaConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    preset,
    resolve,
)
from cosa.errors import ConfigError


def test_presets_carry_the_paper_settings() -> None:
    voc, coco, ref = preset("voc"), preset("coco"), preset("reference")
    assert voc.model.backbone == "vit_base_patch16" and voc.data.crop_size == 448
    assert (voc.train.max_iters, voc.train.batch_size, voc.loss.warmup_iters) == (32000, 4, 6000)
    assert (voc.pseudo.high_threshold, voc.pseudo.low_threshold) == (0.70, 0.20)
    assert (coco.train.max_iters, coco.train.batch_size, coco.loss.warmup_iters) == (
        60000,
        8,
        10000,
    )
    assert (coco.pseudo.high_threshold, coco.pseudo.low_threshold) == (0.65, 0.25)
    assert voc.reliability.enabled and voc.thresholds.enabled and voc.separation.enabled
    assert not (ref.reliability.enabled or ref.thresholds.enabled or ref.separation.enabled)
    assert preset("demo").model.backbone == "efficientnet_lite0"


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="demo, voc, coco"):
        preset("cityscapes")
    with pytest.raises(ConfigError, match=r"unknown preset 'dmeo'.* \(did you mean 'demo'\?\)"):
        preset("dmeo")


def test_override_types_are_checked_and_converted() -> None:
    cfg = apply_overrides(
        CosaConfig(),
        {
            "train.max_iters": 10,
            "loss.seg_weight": 1,
            "pseudo.scales": [1.0, 0.5],
            "model.pretrained": None,
        },
    )
    assert (
        cfg.train.max_iters == 10
        and cfg.loss.seg_weight == 1.0
        and isinstance(cfg.loss.seg_weight, float)
    )
    assert cfg.pseudo.scales == (1.0, 0.5)
    with pytest.raises(ConfigError, match="expects an integer"):
        apply_overrides(CosaConfig(), {"train.max_iters": "ten"})
    with pytest.raises(ConfigError, match="true/false"):
        apply_overrides(CosaConfig(), {"reliability.enabled": "yes please"})


def test_unknown_key_suggests_the_closest_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'seg_weight'"):
        apply_overrides(CosaConfig(), {"loss.seg_wieght": 0.2})
    with pytest.raises(ConfigError, match=r"did you mean 'thresholds'"):
        apply_overrides(CosaConfig(), {"threshold.enabled": False})


def test_set_option_values_are_yaml(tmp_path: Path) -> None:
    cfg = resolve(
        "demo", None, ["train.max_iters=7", "separation.enabled=false", "pseudo.scales=[1.0]"]
    )
    assert cfg.train.max_iters == 7 and not cfg.separation.enabled and cfg.pseudo.scales == (1.0,)
    with pytest.raises(ConfigError, match="key=value"):
        resolve("demo", None, ["train.max_iters"])


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    cfg = apply_overrides(preset("voc"), {"train.seed": 3})
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert from_dict(load_yaml(tmp_path / "config.yaml")) == cfg
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  max_iter: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'max_iters'"):
        resolve("demo", tmp_path / "typo.yaml")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("separation.temperature", 0, "> 0"),
        ("reliability.temperature", -0.1, "> 0"),
        ("loss.crf_window", 4, "an odd integer >= 3"),
        ("loss.crf_dilation", 0, ">= 1"),
        ("loss.crf_sigma_rgb", 0, "> 0"),
        ("loss.crf_sigma_xy", -1, "> 0"),
        ("pseudo.scales", [1.0, 0.0], "a non-empty list of positive factors"),
        ("pseudo.scales", [], "a non-empty list of positive factors"),
        ("optim.ema_momentum", 1.5, "in [0, 1]"),
        ("train.amp", "fp8", "one of auto, bf16, fp16, off"),
        ("model.cam_pooling", "median", "one of max, mean"),
    ],
)
def test_out_of_range_values_fail_when_resolved(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve("demo", overrides=[f"{key}={value}"])
    assert f"{key}=" in str(err.value) and f"(must be {allowed})" in str(err.value)


def test_ordered_pairs_are_checked() -> None:
    with pytest.raises(ConfigError, match="pseudo.low_threshold=0.7 must be below"):
        apply_overrides(preset("demo"), {"pseudo.low_threshold": 0.7})
    with pytest.raises(ConfigError, match="thresholds.stride=200 above data.crop_size=160"):
        apply_overrides(preset("demo"), {"thresholds.stride": 200})


def test_every_preset_is_valid_and_every_number_has_a_range() -> None:
    from cosa.config import _RULES, validate

    for name in ("demo", "voc", "coco", "reference"):
        validate(preset(name))
    cfg = CosaConfig()
    ranged = set()
    for section in dataclasses.fields(cfg):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), item.name)
            if isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
                ranged.add(f"{section.name}.{item.name}")
    unchecked = ranged - set(_RULES) - {"model.aux_layer"}  # aux_layer: the backbone checks it
    assert not unchecked, unchecked
    keys = {
        f"{s.name}.{k.name}"
        for s in dataclasses.fields(cfg)
        for k in dataclasses.fields(getattr(cfg, s.name))
    }
    assert set(_RULES) <= keys
