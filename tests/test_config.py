"""Config: defaults, YAML round trip and one clear ConfigError per kind of mistake."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from maskrcnn.config import Config, ConfigError, aspect

from maskrcnn.presets import nuclei_config


def test_defaults_are_valid_and_follow_the_spec():
    cfg = Config()
    assert cfg.num_levels == 4
    assert cfg.num_bases == [3, 3, 3, 3]
    assert cfg.rpn_base_sizes == [8, 16, 32, 64]
    # The spec's (height, width) multipliers: 1:1, then sqrt(2) at ratio 2 and 0.5.
    for level in cfg.rpn_base_aspect_ratios:
        assert level[0] == (1.0, 1.0)
        assert level[1] == pytest.approx((1.0, 2.0))
        assert level[2] == pytest.approx((2.0, 1.0))


def test_aspect_gives_width_over_height_equal_to_ratio():
    h, w = aspect(3.0, 4.0)
    assert w / h == pytest.approx(4.0)
    assert math.sqrt(h * w) == pytest.approx(3.0)


def test_yaml_round_trip(tmp_path):
    cfg = Config(num_classes=3, class_names=["bg", "a", "b"], backbone="resnet18", in_channels=1,
                 pixel_mean=[0.5], pixel_std=[0.25], rpn_scales=[2, 4, 8, 16],
                 rpn_base_aspect_ratios=[[(1, 1)], [(1, 1), (2, 1)], [(1, 1)], [(0.5, 2.0)]],
                 rcnn_box_weights=(1, 2, 3, 4), rpn_train_fg_thresh_low=0.7, backbone_weights="w.pth")
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    loaded = Config.from_yaml(path)
    assert loaded == cfg
    assert loaded.to_yaml() == cfg.to_yaml()
    assert Config.from_yaml(_write(tmp_path, Config().to_yaml())) == Config()


def test_empty_yaml_gives_defaults(tmp_path):
    assert Config.from_yaml(_write(tmp_path, "")) == Config()


def test_per_level_lists_of_different_lengths():
    with pytest.raises(ConfigError, match="rpn_base_sizes, rpn_scales and rpn_base_aspect_ratios"):
        Config(rpn_base_sizes=[8, 16, 32])
    with pytest.raises(ConfigError, match="one entry per level"):
        Config(rpn_base_aspect_ratios=[[(1, 1)]] * 5)


@pytest.mark.parametrize("name", ["rpn_train_fg_thresh_low", "rpn_test_nms_overlap_threshold",
                                  "rcnn_train_fg_fraction", "mask_test_mask_threshold"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_threshold_outside_unit_interval(name, value):
    with pytest.raises(ConfigError, match=name):
        Config(**{name: value})


def test_thresholds_at_the_interval_ends_are_allowed():
    Config(rcnn_train_fg_fraction=0.0, mask_test_mask_threshold=1.0)


def test_num_classes_below_two():
    with pytest.raises(ConfigError, match="num_classes"):
        Config(num_classes=1, class_names=["background"])


def test_class_names_must_match_num_classes():
    with pytest.raises(ConfigError, match="class_names"):
        Config(num_classes=3)


@pytest.mark.parametrize("field_name, value", [
    ("rpn_train_fg_thresh_low", "0.5"),   # YAML gives a string for a quoted number
    ("num_classes", 2.5),
    ("num_classes", True),
    ("fpn_channels", [1, 2]),
    ("backbone", 18),
    ("rpn_base_sizes", ["8", "16", "32", "64"]),
    ("rcnn_box_weights", "1234"),          # a string is a sequence, but not of numbers
    ("rcnn_box_weights", 10.0),
    ("rpn_base_aspect_ratios", "1,1"),
    ("rpn_base_aspect_ratios", [[(1, "2")]] * 4),
])
def test_wrong_types(field_name, value):
    with pytest.raises(ConfigError, match=field_name):
        Config(**{field_name: value})


@pytest.mark.parametrize("text", [
    "rpn_train_fg_thresh_low: '0.5'\n",
    "num_classes: two\n",
    "rcnn_box_weights: [10, 10, five, 5]\n",
    "rcnn_box_weights: 10\n",
    "rpn_base_aspect_ratios: 5\n",
    "rpn_base_aspect_ratios: [[[1, x]], [[1, 1]], [[1, 1]], [[1, 1]]]\n",
])
def test_wrong_types_from_yaml_name_the_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=str(path)):
        Config.from_yaml(path)


def test_unknown_field_names(tmp_path):
    path = _write(tmp_path, "rpn_base_size: [8, 16, 32, 64]\nnum_classes: 2\n")
    with pytest.raises(ConfigError, match="unknown field.*rpn_base_size"):
        Config.from_yaml(path)
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        Config.from_dict({"colour": "red"})


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_yaml(tmp_path / "missing.yaml")


def test_replace_validates():
    cfg = Config()
    assert cfg.replace(num_classes=3, class_names=["bg", "a", "b"]).num_classes == 3
    with pytest.raises(ConfigError):
        cfg.replace(rpn_test_nms_overlap_threshold=2.0)


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_nuclei_yaml_is_the_cli_default():
    shipped = Path(__file__).resolve().parents[1] / "configs" / "nuclei.yaml"
    assert Config.from_yaml(shipped).to_dict() == nuclei_config().to_dict()


def test_switches_must_be_true_or_false():
    # YAML reads `yes`/`true` as a bool but "1" or "on" quoted as strings: only a real bool passes
    assert Config(train_sample_per_instance=False).train_sample_per_instance is False
    for value in ("true", 1, None):
        with pytest.raises(ConfigError, match="train_sample_per_instance has the wrong type"):
            Config(train_sample_per_instance=value)
