"""Config: presets, strict overrides with suggestions, YAML round trip."""

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
