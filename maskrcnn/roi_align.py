"""Multi-level RoIAlign: each box is cropped from the FPN level whose anchor base size is nearest
to the box's size sqrt(w * h), as in the spec; the crops come back in the boxes' order."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def assign_levels(boxes: Tensor, base_sizes: Tensor) -> Tensor:
    """boxes (R, 4), base_sizes (L,) -> (R,) level index with the nearest base size."""
    size = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    return (size[:, None] - base_sizes[None]).abs().argmin(dim=1)


class MultiLevelRoiAlign:
    """Crops (R, C, S, S) from features [p2..p5] for per-image box lists."""

    def __init__(self, base_sizes: list[float], strides: list[int], output_size: int,
                 sampling_ratio: int = 2) -> None:
        self.base_sizes = torch.tensor(base_sizes, dtype=torch.float32)
        self.strides = list(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def __call__(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """features: L tensors (B, C, H_l, W_l); boxes: B tensors (R_b, 4) -> (sum R_b, C, S, S)."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = assign_levels(rois[:, 1:], self.base_sizes.to(rois.device))
        channels = features[0].shape[1]
        out = features[0].new_zeros(rois.shape[0], channels, self.output_size, self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                # aligned=False: feature pixel x is centred at x * stride, the spec's anchor centres.
                out[index] = roi_align(feature, rois[index], self.output_size, spatial_scale=1.0 / stride,
                                       sampling_ratio=self.sampling_ratio, aligned=False).to(out.dtype)
        return out
