"""RcnnHead: two fully connected layers, then per-class logits and per-class box deltas."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config


class RcnnHead(nn.Module):
    """crops (R, C, S, S) -> logits (R, K), deltas (R, K, 4)."""

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        self.num_classes = cfg.num_classes
        width = cfg.rcnn_fc_channels
        self.fc1 = nn.Linear(in_channels * cfg.rcnn_crop_size**2, width)
        self.fc2 = nn.Linear(width, width)
        self.logit = nn.Linear(width, cfg.num_classes)
        self.delta = nn.Linear(width, cfg.num_classes * 4)
        nn.init.normal_(self.logit.weight, std=0.01)
        nn.init.normal_(self.delta.weight, std=0.001)
        nn.init.zeros_(self.logit.bias)
        nn.init.zeros_(self.delta.bias)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.fc1(crops.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.logit(x), self.delta(x).reshape(-1, self.num_classes, 4)
