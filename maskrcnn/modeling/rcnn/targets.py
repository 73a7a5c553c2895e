"""RCNN targets: truth boxes join the proposals, then a balanced fg/bg sample per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...config import Config
from ...structures import Proposals, Target
from ..boxes import rcnn_encode
from ..sampling import candidates_with_truth, match_boxes, per_instance_weights, sample_balanced


@dataclass
class RcnnTargets:
    proposals: list[Tensor]  # B tensors (S_b, 4): the sampled boxes of each image
    labels: Tensor           # (S,) int64 class of each sampled box, 0 = background; image by image
    deltas: Tensor           # (S, 4) RCNN-coded regression targets (zero for background)


@torch.no_grad()
def make_rcnn_targets(proposals: list[Proposals], targets: list[Target], cfg: Config,
                      generators: list[torch.Generator | None] | None = None) -> RcnnTargets:
    """Sample ``rcnn_train_batch_size`` boxes per image, ``rcnn_train_fg_fraction`` foreground.

    Foreground: IoU with a truth box >= ``rcnn_train_fg_thresh_low``; background: IoU in
    [``rcnn_train_bg_thresh_low``, ``rcnn_train_bg_thresh_high``). Each image is sampled from its
    own proposals, with its own generator (default: one from each target's seed); with
    ``train_sample_per_instance`` every truth instance is about equally likely among the foregrounds.
    """
    if generators is None:
        generators = [t.sampling_generator() for t in targets]
    boxes, labels, deltas = [], [], []
    for props, target, generator in zip(proposals, targets, generators):
        candidates = candidates_with_truth(props.boxes, target.boxes, cfg.rcnn_train_min_size)
        if len(target):
            iou, assign = match_boxes(candidates, target.boxes.to(candidates))
        else:  # nothing to find: every candidate is background
            iou = candidates.new_zeros(candidates.shape[0])
            assign = torch.zeros_like(iou, dtype=torch.long)
        fg = torch.nonzero(iou >= cfg.rcnn_train_fg_thresh_low).squeeze(1)
        bg = torch.nonzero((iou < cfg.rcnn_train_bg_thresh_high) & (iou >= cfg.rcnn_train_bg_thresh_low)).squeeze(1)
        fg_weights = per_instance_weights(assign[fg]) if cfg.train_sample_per_instance else None
        fg, bg = sample_balanced(fg, bg, cfg.rcnn_train_batch_size, cfg.rcnn_train_fg_fraction,
                                 generator, fg_weights)
        fg_truth = assign[fg]
        boxes.append(torch.cat([candidates[fg], candidates[bg]]))
        labels.append(torch.cat([target.labels.to(fg.device)[fg_truth], bg.new_zeros(bg.shape[0])]))
        fg_deltas = rcnn_encode(candidates[fg], target.boxes.to(candidates)[fg_truth], cfg.rcnn_box_weights)
        deltas.append(torch.cat([fg_deltas, candidates.new_zeros(bg.shape[0], 4)]))
    return RcnnTargets(proposals=boxes, labels=torch.cat(labels), deltas=torch.cat(deltas))
