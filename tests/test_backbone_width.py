"""The trunk width (Config.trunk_width: a narrowed ResNet) and the built-in model's layout
(builtin_config): validation, stage widths, weight counts, strides and a forward pass."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.modeling.backbone import Backbone
from maskrcnn.config import Config, ConfigError
from maskrcnn.presets import builtin_config
from maskrcnn.modeling.model import MaskRCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trunk_parameters(backbone: Backbone) -> int:
    """Weights of the ResNet trunk (stem and the four stages), the FPN left out."""
    return sum(p.numel() for module in (backbone.stem, backbone.layers) for p in module.parameters())


def stage_outputs(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """c2..c5 of the trunk."""
    x = backbone.stem(images)
    out = []
    for layer in backbone.layers:
        x = layer(x)
        out.append(x)
    return out


# --- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [0, -8, 4, 7, 12, 20, 65])
def test_trunk_width_must_be_a_positive_multiple_of_8(width):
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(trunk_width=width)


@pytest.mark.parametrize("width", [8, 16, 24, 32, 64, 128])
def test_multiples_of_8_are_accepted(width):
    assert Config(backbone="resnet18", trunk_width=width).trunk_width == width


def test_trunk_width_has_to_be_an_integer():
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(trunk_width=32.0)
    with pytest.raises(ConfigError, match="trunk_width"):
        Config.from_dict({"trunk_width": "32"})


def test_imagenet_weights_need_the_full_width():
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(trunk_width=32, backbone_weights="resnet50.pth")
    assert Config(trunk_width=64, backbone_weights="resnet50.pth").trunk_width == 64  # not loaded here
    with pytest.raises(ConfigError):
        Config().replace(trunk_width=16, backbone_weights="resnet50.pth")


def test_se_resnext_needs_a_multiple_of_16():
    """Its 32 groups have trunk_width / 16 channels each: 8 would leave a stage with no channels."""
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(backbone="se_resnext50", trunk_width=8)
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(backbone="se_resnext50", trunk_width=24)
    assert Config(backbone="se_resnext50", trunk_width=16).trunk_width == 16


def test_trunk_width_survives_yaml(tmp_path):
    cfg = Config(backbone="resnet18", trunk_width=40)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml").trunk_width == 40
    assert Config().trunk_width == 64  # the default is torchvision's ResNets


# --- narrowed trunks --------------------------------------------------------------------------------
def test_half_width_resnet18_stages_weights_and_strides():
    torch.manual_seed(0)
    narrow = Backbone(Config(backbone="resnet18", trunk_width=32, fpn_channels=32))
    full = Backbone(Config(backbone="resnet18", trunk_width=64, fpn_channels=32))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = stage_outputs(narrow, images)
        features = narrow(images)
    assert [c.shape[1] for c in stages] == [32, 64, 128, 256]
    assert [c.shape[1] for c in stage_outputs(full, images)] == [64, 128, 256, 512]
    ratio = trunk_parameters(narrow) / trunk_parameters(full)
    assert 0.2 < ratio < 0.3  # convolutions scale with width squared: about a quarter
    assert sum(p.numel() for p in narrow.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())
    assert len(features) == 4
    assert [tuple(f.shape) for f in features] == [(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(f).all() for f in features)
    assert all(f.std() > 0 for f in features)  # not a dead (zero-initialised) trunk


def test_half_width_with_the_stride_1_stem():
    backbone = Backbone(Config(backbone="resnet18", trunk_width=32, fpn_channels=32, rpn_scales=[2, 4, 8, 16]))
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 32, 64 // s, 64 // s) for s in (2, 4, 8, 16)]


def test_narrow_bottleneck_resnet50():
    narrow = Backbone(Config(backbone="resnet50", trunk_width=16, fpn_channels=16))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = stage_outputs(narrow, images)
        features = narrow(images)
    assert [c.shape[1] for c in stages] == [64, 128, 256, 512]  # expansion 4 on 16, 32, 64, 128
    assert narrow.layers[0][0].conv1.out_channels == 16
    assert [tuple(f.shape) for f in features] == [(1, 16, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert trunk_parameters(narrow) < 0.1 * 23.5e6  # torchvision's ResNet-50 trunk has ~23.5M


def test_narrow_se_resnext50_runs():
    narrow = Backbone(Config(backbone="se_resnext50", trunk_width=16, fpn_channels=16))
    with torch.no_grad():
        stages = stage_outputs(narrow, torch.rand(1, 3, 64, 64))
    assert [c.shape[1] for c in stages] == [64, 128, 256, 512]
    assert all(torch.isfinite(c).all() for c in stages)


def test_grayscale_narrow_trunk():
    backbone = Backbone(Config(backbone="resnet18", trunk_width=16, fpn_channels=16, in_channels=1,
                               pixel_mean=[0.5], pixel_std=[0.25]))
    assert backbone.stem[0].in_channels == 1 and backbone.stem[0].out_channels == 16
    with torch.no_grad():
        features = backbone(torch.rand(1, 1, 64, 64))
    assert features[0].shape == (1, 16, 16, 16)


# --- the built-in model's layout --------------------------------------------------------------------
def test_builtin_config_is_valid_and_small():
    cfg = builtin_config()
    cfg.validate()
    assert cfg.in_channels == 1 and len(cfg.pixel_mean) == len(cfg.pixel_std) == 1
    assert cfg.trunk_width == 32 and cfg.backbone == "resnet18" and cfg.rpn_scales == [2, 4, 8, 16]
    assert cfg.class_names == ["background", "nucleus"]
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert builtin_config(fpn_channels=32).fpn_channels == 32  # changes go on top
    with pytest.raises(ConfigError):
        builtin_config(trunk_width=12)


def test_builtin_model_fits_in_10_mb_and_predicts():
    torch.manual_seed(0)
    model = MaskRCNN(builtin_config())
    half_bytes = sum(p.numel() for p in model.parameters()) * 2
    assert half_bytes < 10e6
    assert model.backbone.stem[0].in_channels == 1
    model.eval()
    output = model([torch.rand(1, 64, 64)])
    assert output.losses is None and output.results is not None and len(output.results) == 1
    result = output.results[0]
    assert tuple(result.label_image.shape) == (64, 64)
    assert len(result.boxes) == len(result.scores) == len(result.labels)
