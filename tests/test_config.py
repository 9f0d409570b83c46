"""Config: presets, YAML, CLI overrides, unknown keys rejected, saved config round-trips."""

from __future__ import annotations

import pytest
import yaml

from liverlesion.config import Config, available_presets, config_from_dict, load_config
from liverlesion.errors import UserError


def test_defaults_and_presets():
    assert {"quick", "paper"} <= set(available_presets())
    assert load_config().model.backbone == "inception_v3"
    assert load_config(preset="paper").patch.size_px == 299
    assert load_config(preset="quick").patch.size_px < 299


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\npatch:\n  window_center: 40\n")
    cfg = load_config(p, overrides=["train.epochs=3", "model.backbone=resnet18", "train.deterministic=true"])
    assert cfg.train.epochs == 3 and cfg.patch.window_center == 40.0
    assert cfg.model.backbone == "resnet18" and cfg.train.deterministic is True


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("train:\n  epoch: 3\n", "unknown; valid keys here: .*epochs"),
        ("trian:\n  epochs: 3\n", "'trian' is unknown"),
        ("train:\n  epochs: three\n", "expected a value of type int"),
        ("train: 5\n", "expected a mapping"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("train: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_line_user_error(tmp_path, yaml_text, match):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(UserError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_bad_override_and_preset():
    with pytest.raises(UserError, match="section.key=value"):
        load_config(overrides=["epochs"])
    with pytest.raises(UserError, match="choose one of"):
        load_config(preset="nope")
    with pytest.raises(UserError, match="file not found"):
        load_config("/nonexistent/config.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(preset="quick", overrides=["train.seed=5"])
    cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert isinstance(again, Config)
