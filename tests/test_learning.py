"""End-to-end learning: a small model trained on the CPU finds the blobs of its training images.

This really trains (about a minute on two cores) and asserts on what it learned, and on what
bfloat16 inference keeps of it.
"""

from __future__ import annotations

import pytest
import torch

from maskrcnn import Config, MaskRCNN, Target
from maskrcnn.prediction.segment import segment
from maskrcnn.metrics import TruthRecord, encode_masks, evaluate, prediction_record

from conftest import consecutive_pairs, tiny_config, train_steps

# one thread: how every full run has trained it (an earlier module used to leave torch at one thread)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = 180
SIZE = 96


def blob_images(count: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[Target]]:
    """Noisy images of 3 to 6 non-touching bright discs (radius 6 to 14 px) and their masks."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, targets = [], []
    for _ in range(count):
        wanted = int(torch.randint(3, 7, (), generator=generator))
        masks: list[torch.Tensor] = []
        occupied = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for _ in range(200):
            if len(masks) == wanted:
                break
            r = float(torch.empty(()).uniform_(6, 14, generator=generator))
            cx, cy = (float(torch.empty(()).uniform_(r + 1, SIZE - r - 1, generator=generator)) for _ in range(2))
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            grown = (xx - cx) ** 2 + (yy - cy) ** 2 <= (r + 2) ** 2
            if not (grown & occupied).any():
                occupied |= disc
                masks.append(disc)
        noise = 0.05 * torch.randn(1, SIZE, SIZE, generator=generator)
        image = (0.1 + 0.8 * occupied.float()[None] + noise).clamp(0, 1)
        images.append(image.expand(3, -1, -1).contiguous())
        targets.append(Target.from_masks(torch.stack(masks)))
    return images, targets


def small_config() -> Config:
    return Config(**tiny_config(64, rcnn_fc_channels=256, rcnn_train_batch_size=32, mask_train_batch_size=16))


def matched_ious(result, target: Target) -> torch.Tensor:
    """Best mask IoU of each truth instance among the predicted ones (0 when nothing predicted)."""
    if len(result) == 0:
        return torch.zeros(len(target))
    predicted = torch.stack([result.label_image == i + 1 for i in range(len(result))])
    inter = (predicted[:, None] & target.masks[None]).flatten(2).sum(-1).float()
    union = (predicted[:, None] | target.masks[None]).flatten(2).sum(-1).float()
    return (inter / union).max(dim=0).values


@pytest.fixture(scope="module")
def trained() -> tuple[MaskRCNN, list[float], list[torch.Tensor], list[Target]]:
    """The small model after STEPS steps on four blob images: (model in eval mode, the step losses,
    the images, their targets)."""
    torch.manual_seed(0)
    images, targets = blob_images(4, torch.Generator().manual_seed(0))
    model = MaskRCNN(small_config())
    totals = train_steps(model, consecutive_pairs(images, targets), STEPS, lr=1e-3, weight_decay=1e-4)
    return model.eval(), totals, images, targets


def test_small_model_learns_blobs(trained):
    model, totals, images, targets = trained
    assert totals[-1] < 0.5 * totals[0]

    ious = torch.cat([matched_ious(r, t) for r, t in zip(model(images).results, targets)])
    matched = ious[ious >= 0.5]
    recall = matched.numel() / ious.numel()
    assert recall >= 0.8, f"recall {recall:.2f}"
    assert matched.mean() >= 0.7, f"mean matched mask IoU {matched.mean():.2f}"


def test_bfloat16_inference_scores_what_float32_scores_on_held_out_images(trained):
    """The --precision guard: bfloat16 autocast (what ``auto`` picks on CPUs with native bfloat16;
    emulated elsewhere, so checked on any CPU) gives mask AP50 and the DSB2018 score within 0.005
    of float32, on images the model never trained on."""
    model = trained[0]
    images, targets = blob_images(8, torch.Generator().manual_seed(1))
    truths = [TruthRecord(f"{i}", masks=encode_masks(t.masks.numpy())) for i, t in enumerate(targets)]
    scores = {}
    for precision in ("fp32", "bf16"):
        predictions = [prediction_record(f"{i}", segment(model, image, precision=precision))
                       for i, image in enumerate(images)]
        scores[precision] = evaluate(truths, predictions).summary()
    assert scores["fp32"]["mask_ap50"] >= 0.6, scores  # a model that finds most blobs: worth comparing
    for key in ("mask_ap50", "dsb_score"):
        assert abs(scores["bf16"][key] - scores["fp32"][key]) <= 0.005, (key, scores)
