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
    """Crops (R, C, S, S) from features [p2..p5]: ``crop`` for a flat batch, ``__call__`` for
    per-image box lists (the training samplers' form)."""

    def __init__(self, base_sizes: list[float], strides: list[int], output_size: int,
                 sampling_ratio: int = 2) -> None:
        self.base_sizes = torch.tensor(base_sizes, dtype=torch.float32)
        self.strides = list(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def __call__(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """features: L tensors (B, C, H_l, W_l); boxes: B tensors (R_b, 4) -> (sum R_b, C, S, S)."""
        image = torch.cat([torch.full_like(b[:, 0], i, dtype=torch.int64) for i, b in enumerate(boxes)])
        return self.crop(features, torch.cat(boxes), image)

    def crop(self, features: list[Tensor], boxes: Tensor, image: Tensor) -> Tensor:
        """features: L tensors (B, C, H_l, W_l); boxes (R, 4) of images ``image`` (R,) -> (R, C, S, S).

        Every level runs, with no boxes too (an empty RoIAlign), so that nothing depends on the data
        and a trace holds for any box count. The crops come level by level and are put back in the
        boxes' order by one gather: not ``out[index] = crops``, whose setitem drops leading size-1
        dims, which a trace with exactly one box on a level would record as a fixed reshape.
        """
        rois = torch.cat([image[:, None].to(boxes.dtype), boxes], dim=1)
        levels = assign_levels(boxes, self.base_sizes.to(boxes.device))
        crops, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            # aligned=False: feature pixel x is centred at x * stride, the spec's anchor centres.
            crops.append(roi_align(feature, rois[index], self.output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=self.sampling_ratio, aligned=False))
            order.append(index)
        return torch.cat(crops)[torch.argsort(torch.cat(order))]
