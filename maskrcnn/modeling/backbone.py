"""Backbone + FPN: an image batch (B, C, H, W) -> feature maps p2..p5 (B, fpn_channels, H/s, W/s).

The ResNets are torchvision's definitions; SE-ResNeXt-50 (the spec's backbone) is torchvision's
ResNeXt-50 32x4d with a squeeze-and-excitation block on each bottleneck; EfficientNet-Lite0 is
``maskrcnn.modeling.efficientnet`` (its stages ending at strides 4, 8, 16, 32 are c2..c5). The FPN is
torchvision.ops.FeaturePyramidNetwork without extra levels, so it yields exactly p2..p5.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FeaturePyramidNetwork, SqueezeExcitation

from ..config import Config
from ..errors import UserError
from . import efficientnet
from .norm import norm_layer


class SEBottleneck(resnet.Bottleneck):
    """ResNeXt bottleneck with squeeze-and-excitation on the residual branch before the sum."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        channels = self.conv3.out_channels
        self.se = SqueezeExcitation(channels, channels // 16)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def _make_resnet(name: str, norm: str = "batch", width: int = 64) -> resnet.ResNet:
    layer = norm_layer(norm)
    if name == "resnet18":
        net = resnet.resnet18(norm_layer=layer)
    elif name == "resnet34":
        net = resnet.resnet34(norm_layer=layer)
    elif name == "resnet50":
        net = resnet.resnet50(norm_layer=layer)
    elif name == "se_resnext50":
        net = resnet.ResNet(SEBottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, norm_layer=layer)
    else:
        raise UserError(f"unknown backbone {name!r}")
    return net if width == 64 else _narrowed(net, width)


def _narrowed(net: resnet.ResNet, width: int) -> resnet.ResNet:
    """The same ResNet with ``width`` channels in its first stage instead of 64 (2x per stage),
    built from torchvision's own blocks and initialised as torchvision initialises a ResNet."""
    block = type(net.layer1[0])
    depths = [len(stage) for stage in (net.layer1, net.layer2, net.layer3, net.layer4)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(net.conv1.in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = net._norm_layer(width)
    net.layer1 = net._make_layer(block, width, depths[0])
    net.layer2 = net._make_layer(block, 2 * width, depths[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * width, depths[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * width, depths[3], stride=2)
    net.fc = nn.Identity()  # the classifier is never used
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def _load_imagenet_weights(net: resnet.ResNet, path: str) -> None:
    """Initialise from a local torchvision state-dict file (never downloaded)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: backbone weights file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise UserError(f"{file}: not a loadable state dict ({type(err).__name__})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    # SE blocks are absent from plain ResNeXt weights; everything else must match.
    missing = [k for k in missing if ".se." not in k and not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"{file}: does not match backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _resnet_trunk(cfg: Config) -> tuple[nn.Sequential, list[nn.Module], list[int]]:
    """A ResNet as (stem, layer1..layer4, their widths)."""
    net = _make_resnet(cfg.backbone, cfg.norm, cfg.trunk_width)
    if cfg.backbone_weights:
        _load_imagenet_weights(net, cfg.backbone_weights)
    if cfg.in_channels == 1:
        net.conv1 = _grayscale_first_conv(net.conv1)
    if cfg.rpn_scales[0] == 2:  # the spec's stem: p2 at stride 2
        net.conv1.stride = (1, 1)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    widths = [layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
              for layer in layers]
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), layers, widths


def _efficientnet_trunk(cfg: Config) -> tuple[nn.Sequential, list[nn.Module], list[int]]:
    """EfficientNet-Lite0 as (stem, the four layers ending at strides 4, 8, 16, 32, their widths)."""
    norm = efficientnet.tf_batch_norm if cfg.norm == "batch" else norm_layer(cfg.norm)
    net = efficientnet.EfficientNetLite0(norm=norm, classifier=False)
    if cfg.backbone_weights:  # "imagenet": Config allows nothing else for this backbone
        efficientnet.load_imagenet_weights(net)
    if cfg.in_channels == 1:
        net.stem[0] = _grayscale_first_conv(net.stem[0])
    if cfg.rpn_scales[0] == 2:  # p2 at stride 2: a stride-1 stem, as for the ResNets
        net.stem[0].stride = (1, 1)
    bounds = [0, *(i + 1 for i in efficientnet.FEATURE_STAGES)]  # stages [0, 2), [2, 3), [3, 5), [5, 7)
    layers = [nn.Sequential(*net.stages[a:b]) for a, b in zip(bounds, bounds[1:])]
    return net.stem, layers, list(efficientnet.FEATURE_CHANNELS)


class Backbone(nn.Module):
    """ResNet or EfficientNet trunk (c2..c5) followed by an FPN, returning [p2, p3, p4, p5]."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        trunk = _efficientnet_trunk if cfg.backbone == "efficientnet_lite0" else _resnet_trunk
        self.stem, layers, widths = trunk(cfg)
        self.layers = nn.ModuleList(layers)
        self.fpn = FeaturePyramidNetwork(widths, cfg.fpn_channels)
        self.out_channels = cfg.fpn_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, C, H, W), H and W multiples of 32 -> [p2, p3, p4, p5]."""
        x = self.stem(images)
        features = OrderedDict()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            features[f"c{i + 2}"] = x
        return list(self.fpn(features).values())


def _grayscale_first_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A one-channel first conv; the RGB weights are summed, so a grey image gives the response the
    RGB conv gives to that image replicated to three channels."""
    if isinstance(conv, efficientnet.SameConv2d):  # EfficientNet's stem pads as TF's "SAME"
        new = efficientnet.SameConv2d(1, conv.out_channels, conv.kernel_size[0], conv.stride[0])
    else:
        new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
    return new
