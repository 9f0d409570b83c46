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
        (
            "train:\n  epoch: 3\n",
            "'train.epoch' is unknown; did you mean train.epochs\\? valid keys here: .*epochs",
        ),
        ("trian:\n  epochs: 3\n", "'trian' is unknown; did you mean train\\?"),
        ("patch:\n  size: 160\n", "'patch.size' is unknown; did you mean patch.size_px\\?"),
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
    with pytest.raises(UserError, match="choose one of: paper, quick, or default"):
        load_config(preset="nope")
    # `--preset default` is the built-in defaults by name, as the help and README call them
    assert load_config(preset="default").to_dict() == load_config().to_dict()
    with pytest.raises(UserError, match="file not found"):
        load_config("/nonexistent/config.yaml")


@pytest.mark.parametrize(
    "content, match",
    [
        ("train:\n  epochs: 3\n".encode("utf-16"), "not UTF-8 text"),  # saved by a Windows editor
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),  # the wrong file in the slot
        (None, "is a folder"),
    ],
)
def test_config_file_that_is_not_utf8_text_is_one_line_user_error(tmp_path, content, match):
    p = tmp_path / "c.yaml"
    p.mkdir() if content is None else p.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(preset="quick", overrides=["train.seed=5"])
    cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.class_weighting=lose", "train.class_weighting"),
        ("train.optimizer=adam", "train.optimizer"),
        ("train.recipe=magic", "train.recipe"),
        ("model.fusion=deep", "model.fusion"),
        ("model.tta=rotate", "model.tta"),
        ("eval.threshold=1.5", "eval.threshold"),
        ("train.epochs=0", "train.epochs"),
        ("model.dropout=1.0", "model.dropout"),
        ("patch.size_px=4", "patch.size_px"),
        ("train.val_fraction=0", "train.val_fraction"),
        ("train.devices=two", "train.devices"),
        ("model.fusion_weight=1.5", "model.fusion_weight"),
        ("model.fusion_weight=-0.1", "model.fusion_weight"),
        ("model.fusion_weight=nan", "model.fusion_weight"),
        ("model.fusion_weight=half", "model.fusion_weight"),
    ],
)
def test_every_value_is_validated_when_the_config_is_loaded(override, named):
    from liverlesion.config import load_config as load

    with pytest.raises(UserError) as e:
        load(overrides=[override])
    msg = str(e.value)
    assert named in msg and "\n" not in msg


def test_fusion_weight_is_a_number_or_auto_from_yaml_or_the_command_line(tmp_path):
    from liverlesion.config import fixed_fusion_weight
    from liverlesion.config import load_config as load

    assert fixed_fusion_weight(load().model) == 0.2
    assert fixed_fusion_weight(load(overrides=["model.fusion_weight=AUTO"]).model) is None
    (tmp_path / "c.yaml").write_text("model:\n  fusion_weight: 0.35\n")  # a YAML float
    cfg = load(tmp_path / "c.yaml")
    assert fixed_fusion_weight(cfg.model) == 0.35
    cfg.save(tmp_path / "saved.yaml")
    assert fixed_fusion_weight(load(tmp_path / "saved.yaml").model) == 0.35


def test_presets_validate_and_choose_the_recipes():
    from liverlesion.config import load_config as load

    quick, paper = load(preset="quick"), load(preset="paper")
    assert (
        quick.patch.size_px >= 160 and quick.train.recipe == "lpft" and quick.model.fusion == "radiomics_vote"
    )
    assert paper.train.recipe == "end_to_end" and paper.model.fusion == "none" and paper.patch.size_px == 299


def test_saved_configs_from_before_patch_stacks_keep_one_stack(tmp_path):
    # checkpoints and run folders written before patch.stacks cut one 2.5-D stack per lesion: a saved
    # config without the key must reproduce that, not take today's default (three stacks)
    import yaml

    from liverlesion.config import Config, config_from_dict, load_config, load_run_config

    assert Config().patch.stacks == 1
    saved = Config().to_dict()
    assert config_from_dict(saved).patch.stacks == 1  # a new checkpoint keeps what it was trained with
    del saved["patch"]["stacks"]
    assert config_from_dict(saved).patch.stacks == 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).patch.stacks == 0
    assert load_config(path).patch.stacks == 1  # a user's YAML without the key gets the default
    path.write_text("patch: [1, 2\n")
    with pytest.raises(UserError, match=r"config.yaml: not valid YAML .*fix or delete the file"):
        load_run_config(path)


def test_saved_configs_from_before_min_delta_stop_on_any_fall_of_the_loss(tmp_path):
    # a run folder written before train.min_delta must resume (--resume) with the stopping it began with
    from liverlesion.config import Config, config_from_dict

    assert Config().train.min_delta == 0.002
    saved = Config().to_dict()
    assert config_from_dict(saved).train.min_delta == 0.002
    del saved["train"]["min_delta"]
    assert config_from_dict(saved).train.min_delta == 0.0
