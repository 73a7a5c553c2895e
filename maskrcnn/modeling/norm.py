"""The normalisation layer chosen by ``Config.norm``, for the backbone trunk and the mask head,
and BatchNorm folded into the convolutions for inference.

BatchNorm normalises over the batch, so under torch.distributed each process uses its own
batch's statistics (unless --sync-bn on CUDA) and a run depends on how the global batch is split.
GroupNorm normalises each image on its own: the same model trains the same on any number of
processes.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

MAX_GROUPS = 32  # Wu & He's default


def group_count(channels: int) -> int:
    """Groups for ``channels``: 32 when they divide evenly, else the largest divisor of 32 that does."""
    return math.gcd(MAX_GROUPS, channels)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """``channels -> module`` for ``kind`` "batch" or "group" (torchvision's ``norm_layer`` form)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    For inference only: the BatchNorm's running statistics and affine weights become the conv's
    weight and bias (one op instead of two, same values to float rounding), and the BatchNorm an
    Identity. Pairs are found as ``convN``/``bnN`` siblings (torchvision's ResNet blocks) and as
    consecutive (Conv2d, BatchNorm2d) entries of a Sequential (the stem, downsample paths and the
    mask head). GroupNorm depends on each image and stays. Returns ``module``.
    """
    if module.training:
        raise ValueError("fold_batchnorm is for eval-mode models (BatchNorm uses running statistics)")
    for parent in list(module.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
    return module


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Names of (Conv2d, BatchNorm2d) children of ``parent`` where the norm takes the conv's output."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        candidates = zip(names, names[1:])
    else:  # convN -> bnN, as in torchvision's BasicBlock / Bottleneck and the stem's conv1 / bn1
        candidates = [(f"conv{name[2:]}", name) for name in children if name.startswith("bn")]
    return [(c, b) for c, b in candidates
            if isinstance(children.get(c), nn.Conv2d) and isinstance(children.get(b), nn.BatchNorm2d)
            and children[c].out_channels == children[b].num_features]
