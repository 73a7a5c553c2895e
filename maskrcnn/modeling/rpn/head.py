"""RpnMultiHead: one small conv head per FPN level, outputs flattened over all anchors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config


class RpnMultiHead(nn.Module):
    """Per level: conv3x3 + ReLU, then conv3x3 to 2 logits (bg, fg) and 2 x 4 deltas per base.

    ``forward([p2, p3, p4, p5])`` with p_l (B, C, H_l, W_l) returns logits (B, N, 2) and deltas
    (B, N, 2, 4), N = sum_l H_l * W_l * A_l, flattened level by level, pixel by pixel, base by base.
    """

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        self.num_bases = cfg.num_bases
        hidden = cfg.rpn_head_channels
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, hidden, 3, padding=1) for _ in self.num_bases)
        self.logits = nn.ModuleList(nn.Conv2d(hidden, a * 2, 3, padding=1) for a in self.num_bases)
        self.deltas = nn.ModuleList(nn.Conv2d(hidden, a * 2 * 4, 3, padding=1) for a in self.num_bases)
        for layer in [*self.logits, *self.deltas]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        for layer in self.deltas:
            # The spec's coding maps a box equal to its anchor to 0.5 (0 is a point at the anchor's
            # centre), so an untrained head starts by proposing the anchors themselves.
            nn.init.constant_(layer.bias, 0.5)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        batch = features[0].shape[0]
        logits, deltas = [], []
        for f, conv, to_logit, to_delta in zip(features, self.convs, self.logits, self.deltas):
            x = F.relu(conv(f))
            # (B, A*2, H, W) -> (B, H, W, A*2) -> (B, H*W*A, 2): pixel-major, base-minor.
            logits.append(to_logit(x).permute(0, 2, 3, 1).reshape(batch, -1, 2))
            deltas.append(to_delta(x).permute(0, 2, 3, 1).reshape(batch, -1, 2, 4))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)
