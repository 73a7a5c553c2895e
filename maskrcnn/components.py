"""8-connected components of binary maps, batched, in torch (CPU or GPU).

Three layers need them, so they sit beside the shared structures: each detection's mask keeps its
largest component (many small maps at once, maskrcnn.modeling.mask.paste), the diameter estimate
measures the objects of one thresholded image (one large map, maskrcnn.prediction.diameter), and
label images are checked for ids that mark separate regions (maskrcnn.data.labels).

Every pixel starts with its own id (its flat index + 1). Ids spread by a 3x3 maximum inside the
foreground, and between spreads each pixel jumps to the label of the pixel its id names: that
pixel is in the same component and its label is at least as large (labels only grow). Spreading
alone moves an id one pixel per step, so a component needs as many steps as it is long (76 for a
random-weight model's ragged 28 x 28 masks, about 100 for a large nucleus at full resolution); the
jumps make that a few rounds. Both stop at the same labels: each component's largest id.
The 3x3 maximum is two 1-D passes of ``torch.maximum``: on the CPU 12x faster than ``max_pool2d``
on (D, 1, 28, 28) maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROUNDS_PER_CHECK = 2  # spread-and-jump rounds between convergence checks (each reads every label)


def component_labels(binary: Tensor) -> Tensor:
    """(B, H, W) bool -> (B, H, W) int64: each 8-connected component of each map labelled by the
    largest flat index + 1 among its pixels (ids are not consecutive); 0 = background."""
    b, h, w = binary.shape
    if binary.numel() == 0:
        return torch.zeros(binary.shape, dtype=torch.int64, device=binary.device)
    dtype = torch.int32 if h * w < 2**31 - 1 else torch.int64
    inside = binary.to(dtype)
    labels = torch.arange(1, h * w + 1, device=binary.device, dtype=dtype).reshape(1, h, w) * inside
    while True:
        previous = labels
        for _ in range(ROUNDS_PER_CHECK):
            labels = _max_3x3(labels) * inside
            flat = labels.reshape(b, h * w)
            # background (0) reads pixel 0's label and is zeroed again by ``inside``
            labels = flat.gather(1, (flat - 1).clamp_(min=0).long()).reshape(b, h, w) * inside
        if torch.equal(labels, previous):
            return labels.long()


def _max_3x3(labels: Tensor) -> Tensor:
    """(B, H, W) -> each pixel's maximum over its 3x3 neighbourhood (zeros outside the map)."""
    padded = F.pad(labels, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])
