"""MaskHead: four conv3x3+norm+ReLU (``Config.norm``: BatchNorm or GroupNorm), a stride-2
deconvolution, and a 1x1 conv to one mask per class."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config
from ..norm import norm_layer


class MaskHead(nn.Module):
    """crops (R, C, S, S) -> mask logits (R, K, 2S, 2S)."""

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        width = cfg.mask_head_channels
        norm = norm_layer(cfg.norm)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1, bias=False),
                       norm(width), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.up = nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1, bias=False)
        self.logit = nn.Conv2d(width, cfg.num_classes, kernel_size=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, crops: Tensor) -> Tensor:
        return self.logit(F.relu(self.up(self.convs(crops))))
