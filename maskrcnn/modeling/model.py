"""MaskRCNN: backbone -> RPN -> RCNN -> mask -> results, as in the spec's figure (docs/design.md).

Shape shorthand: B images, N anchors, R proposals, D detections, K classes, M mask size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..runtime.precision import float32_inside
from ..structures import BatchDetections, Losses, ModelOutput, Target
from .backbone import Backbone
from .mask.stage import MaskStage
from .norm import fold_batchnorm
from .rcnn.stage import RcnnStage
from .rpn.stage import RpnStage

SIZE_DIVISOR = 32  # the coarsest FPN stride: padded inputs keep every level's grid aligned


@dataclass
class RawDetections:
    """Inference up to, not including, the per-image post-processing: the exported graph's outputs.

    detections: the batch's detections (D rows, grouped by image); mask_probs (D, M, M).
    """

    detections: BatchDetections
    mask_probs: Tensor


class MaskRCNN(nn.Module):
    """``model(images, targets=None) -> ModelOutput``.

    images: a (B, C, H, W) float tensor or a list of (C, H, W) tensors of any sizes, values in
    [0, 1] (see ``maskrcnn.data.normalize``). In training mode ``targets`` (one Target per image)
    is required and the output holds the five losses; in eval mode it holds one InstanceResult per
    image, at that image's own size.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.rpn = RpnStage(cfg, self.backbone.out_channels)
        self.rcnn = RcnnStage(cfg, self.backbone.out_channels)
        self.mask = MaskStage(cfg, self.backbone.out_channels)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).reshape(-1, 1, 1), persistent=False)

    def forward(self, images: Tensor | list[Tensor], targets: list[Target] | None = None) -> ModelOutput:
        batch, sizes = self.prepare(images)
        if not self.training:
            with torch.no_grad():  # results are thresholded masks: nothing to differentiate
                raw = self.detect(batch, sizes)
            return ModelOutput(results=self.mask.results(raw.detections, raw.mask_probs, size_list(sizes)))
        if targets is None or len(targets) != batch.shape[0]:
            raise ValueError("training needs one Target per image")
        return ModelOutput(losses=self.losses(batch, sizes, [t.to(batch.device) for t in targets]))

    def prepare(self, images: Tensor | list[Tensor]) -> tuple[Tensor, Tensor]:
        """Zero-pad to a multiple of 32 and normalise -> (B, C, H', W') and the sizes (B, 2) (H, W).

        Written to trace: under ``torch.jit.trace`` the sizes are graph values, not constants.
        """
        if isinstance(images, Tensor) and images.dim() == 3:
            images = images[None]
        if len(images) == 0:
            raise ValueError("no images given")
        channels = self.cfg.in_channels
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != channels:
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; the model expects ({channels}, H, W)")
        sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        # rounded up with positive operands only: ONNX's integer division truncates toward zero
        height = (max(h for h, _ in sizes) + SIZE_DIVISOR - 1) // SIZE_DIVISOR * SIZE_DIVISOR
        width = (max(w for _, w in sizes) + SIZE_DIVISOR - 1) // SIZE_DIVISOR * SIZE_DIVISOR
        device = self.pixel_mean.device
        # Padded with 0 before normalising: black, as training crops are filled beyond an image's
        # edge (maskrcnn.data.augment). Zero after normalising would be pixel_mean, brighter than
        # the background of a fluorescence image: the built-in model outlined strips of it along
        # the padded bottom edge of the real sample as nuclei.
        batch = torch.stack([F.pad(image.to(device, torch.float32), [0, width - w, 0, height - h])
                             for image, (h, w) in zip(images, sizes)])
        batch = (batch - self.pixel_mean) / self.pixel_std
        size_tensor = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in sizes])
        return batch, size_tensor.to(device)

    def detect(self, batch: Tensor, sizes: Tensor) -> RawDetections:
        """Inference on a prepared batch (B, C, H', W') with sizes (B, 2): the one inference path,
        which ``maskrcnn.export.graph`` traces as it is."""
        features = self.backbone(batch)  # under --precision bf16 / fp16 autocast: the heavy part
        with float32_inside(batch.device.type):  # the RPN head in float32: see maskrcnn.runtime.precision
            proposals, _ = self.rpn([f.float() for f in features], sizes)
        detections, _ = self.rcnn(features, sizes, proposals)
        mask_probs, _ = self.mask(features, sizes, detections)
        return RawDetections(detections, mask_probs)

    def losses(self, batch: Tensor, sizes: Tensor, targets: list[Target]) -> Losses:
        """The five training losses of a prepared batch."""
        features = self.backbone(batch)
        proposals, (rpn_cls, rpn_reg) = self.rpn(features, sizes, targets)
        # One generator per image, from its Target's seed: an image samples the same boxes in a
        # batch of any size on any process (DDP then trains as one process on the global batch).
        generators = [t.sampling_generator() for t in targets]
        _, (rcnn_cls, rcnn_reg) = self.rcnn(features, sizes, proposals, targets, generators)
        _, mask = self.mask(features, sizes, proposals, targets, generators)
        return Losses(rpn_cls, rpn_reg, rcnn_cls, rcnn_reg, mask)


def for_inference(model: MaskRCNN) -> MaskRCNN:
    """``model`` put in eval mode and rewritten for fast inference, in place: BatchNorm folded into the
    convolutions and the weights in channels_last order, which oneDNN's CPU convolutions run
    fastest in (a conv with channels_last weights gives channels_last outputs, so the whole trunk
    follows). Same results up to float rounding; not for training (the BatchNorms are gone)."""
    fold_batchnorm(model.eval())
    return model.to(memory_format=torch.channels_last)


def size_list(sizes: Tensor) -> list[tuple[int, int]]:
    """(B, 2) sizes -> [(H, W)] as Python ints."""
    return [(int(h), int(w)) for h, w in sizes.tolist()]
