"""Anchor boxes: one per (height, width) pair of a level at every feature pixel of that level.

Feature pixel (x, y) of a level with stride s is centred at (x * s, y * s) in the image, as in the
spec. Anchors are ordered level by level, pixel by pixel (row-major), base by base: the order of
the RPN head's flattened outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...config import Config


def make_bases(base_size: float, aspect_ratios: list[tuple[float, float]]) -> Tensor:
    """(A, 4) anchors centred on the origin: height = base_size * h, width = base_size * w."""
    hw = torch.tensor(aspect_ratios, dtype=torch.float64) * base_size
    half_h, half_w = hw[:, 0] / 2, hw[:, 1] / 2
    return torch.stack([-half_w, -half_h, half_w, half_h], dim=1)


def make_level_anchors(bases: Tensor, height: int, width: int, stride: int) -> Tensor:
    """(A, 4) bases on an (height, width) feature map of ``stride`` -> (height * width * A, 4)."""
    ys = torch.arange(height, dtype=torch.float64) * stride
    xs = torch.arange(width, dtype=torch.float64) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + bases.reshape(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator:
    """Anchors for given feature sizes, cached per (sizes, device) since image sizes repeat."""

    def __init__(self, cfg: Config) -> None:
        self.strides = list(cfg.rpn_scales)
        self.bases = [make_bases(size, ratios)
                      for size, ratios in zip(cfg.rpn_base_sizes, cfg.rpn_base_aspect_ratios)]
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """[(H_l, W_l)] per level -> (N, 4) float32 anchors, N = sum_l H_l * W_l * A_l."""
        if torch.jit.is_tracing():  # sizes are graph values: a cached constant would freeze them
            return self._make(feature_sizes, device)
        key = (tuple(tuple(int(v) for v in size) for size in feature_sizes), str(device))
        if key not in self._cache:
            if len(self._cache) > 32:  # bounded: tiled or multi-size prediction sees few sizes
                self._cache.clear()
            self._cache[key] = self._make(feature_sizes, device)
        return self._cache[key]

    def _make(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
        levels = [make_level_anchors(b, h, w, s) for b, (h, w), s in zip(self.bases, feature_sizes, self.strides)]
        return torch.cat(levels).float().to(device)

    def level_sizes(self, feature_sizes: list[tuple[int, int]]) -> list[int]:
        """Number of anchors on each level."""
        return [h * w * b.shape[0] for (h, w), b in zip(feature_sizes, self.bases)]
