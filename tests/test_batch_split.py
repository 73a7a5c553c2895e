"""What makes N processes with B/N images train like one process with B images.

Every loss is the mean over images of a loss normalised within its image; each image samples
its RCNN/mask boxes with its own seed; ``norm: group`` normalises each image on its own; and the
distributed sampler gives each rank its positions of the same global batch. So a batch's losses
and gradients are the means of those of its images.
"""

from __future__ import annotations

import pytest
import torch

from maskrcnn.config import Config, ConfigError
from maskrcnn.runtime.distributed import DistContext, epoch_batches
from maskrcnn.errors import UserError
from maskrcnn.modeling.mask.loss import mask_loss
from maskrcnn.modeling.mask.targets import make_mask_targets
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.modeling.norm import group_count
from maskrcnn.modeling.rcnn.loss import rcnn_loss
from maskrcnn.modeling.rcnn.targets import make_rcnn_targets
from maskrcnn.modeling.rpn.loss import rpn_loss
from maskrcnn.modeling.rpn.targets import make_rpn_targets
from maskrcnn.structures import Proposals, Target

from conftest import tiny_config

TINY = tiny_config(rpn_train_pre_nms_top_k=300, rpn_train_post_nms_top_k=100,
                   rpn_train_nms_pre_score_threshold=0.0)  # an untrained RPN's proposals reach the heads


def boxes_target(boxes: list[list[int]], size: int = 64, seed: int | None = None) -> Target:
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    return Target.from_masks(masks, seed=seed)


def jittered_proposals(target: Target, count: int, generator: torch.Generator) -> Proposals:
    """``count`` boxes around each truth box (some foreground, some background) plus far boxes."""
    around = target.boxes.repeat_interleave(count, 0) + torch.randn(len(target) * count, 4, generator=generator) * 6
    far = torch.tensor([[100.0, 100.0, 120.0, 120.0], [0.0, 120.0, 30.0, 150.0]])
    boxes = torch.cat([around, far])
    return Proposals(boxes, torch.rand(len(boxes), generator=generator))


# --- losses: (1/B) sum_i loss_i -------------------------------------------------------------------
def test_rpn_loss_of_a_batch_is_the_mean_of_its_images_losses():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(400, 2, generator=g) * 30 + 5], dim=1)
    truths = [torch.tensor([[10.0, 10.0, 30.0, 30.0]]),                     # few foreground anchors
              torch.tensor([[5.0, 5.0, 60.0, 60.0], [40.0, 40.0, 90.0, 95.0], [0.0, 50.0, 40.0, 99.0]])]
    logits = torch.randn(2, 400, 2, generator=g)
    deltas = torch.randn(2, 400, 2, 4, generator=g)
    targets = make_rpn_targets(anchors, truths, 0.5, 0.3)
    assert targets.delta_weights[0].sum() != targets.delta_weights[1].sum()  # unequal counts matter
    batch = rpn_loss(logits, deltas, targets, 2.0, 3.0)
    alone = [rpn_loss(logits[i:i + 1], deltas[i:i + 1], make_rpn_targets(anchors, truths[i:i + 1], 0.5, 0.3), 2.0, 3.0)
             for i in range(2)]
    for part in range(2):
        assert batch[part].item() == pytest.approx((alone[0][part].item() + alone[1][part].item()) / 2, rel=1e-6)


def test_rcnn_and_mask_losses_of_a_batch_are_the_means_of_their_images_losses():
    cfg = Config(num_classes=3, class_names=["bg", "a", "b"], rcnn_train_batch_size=12, mask_train_batch_size=5,
                 mask_size=8, mask_crop_size=4)
    g = torch.Generator().manual_seed(1)
    targets = [boxes_target([[10, 10, 30, 30]], seed=1), boxes_target([[5, 5, 25, 40], [35, 30, 60, 60]], seed=2)]
    targets[1].labels[1] = 2
    proposals = [jittered_proposals(targets[0], 2, g), jittered_proposals(targets[1], 6, g)]
    rcnn_t = make_rcnn_targets(proposals, targets, cfg)
    fg = [(rcnn_t.labels[:12] > 0).sum(), (rcnn_t.labels[12:] > 0).sum()]
    assert fg[0] != fg[1]  # a global mean over foregrounds would weigh the images unequally
    logits, deltas = torch.randn(24, 3, generator=g), torch.randn(24, 3, 4, generator=g)
    batch = rcnn_loss(logits, deltas, rcnn_t)
    alone = [rcnn_loss(logits[s], deltas[s], make_rcnn_targets(proposals[i:i + 1], targets[i:i + 1], cfg))
             for i, s in enumerate([slice(0, 12), slice(12, 24)])]
    for part in range(2):
        assert batch[part].item() == pytest.approx((alone[0][part].item() + alone[1][part].item()) / 2, rel=1e-6)

    # An image without instances has no mask samples and adds 0: the batch loss is half the other's.
    empty = boxes_target([], seed=3)
    mask_t = make_mask_targets([proposals[1], jittered_proposals(empty, 1, g)], [targets[1], empty], cfg)
    assert [len(p) for p in mask_t.proposals] == [5, 0]
    mask_logits = torch.randn(5, 3, 8, 8, generator=g)
    alone = mask_loss(mask_logits, make_mask_targets(proposals[1:], targets[1:], cfg))
    assert mask_loss(mask_logits, mask_t).item() == pytest.approx(alone.item() / 2, rel=1e-6)


# --- sampling: each image with its own generator -------------------------------------------------
def two_images_to_sample(seeds: tuple[int, int]) -> tuple[list[Proposals], list[Target]]:
    g = torch.Generator().manual_seed(0)
    targets = [boxes_target([[10, 10, 30, 30], [40, 35, 60, 58]], seed=seeds[0]),
               boxes_target([[5, 5, 25, 40]], seed=seeds[1])]
    return [jittered_proposals(t, 20, g) for t in targets], targets


@pytest.mark.parametrize("make", [make_rcnn_targets, make_mask_targets])
def test_an_image_samples_the_same_boxes_alone_or_in_a_batch_whatever_the_global_rng(make):
    cfg = Config(rcnn_train_batch_size=8, mask_train_batch_size=6)
    proposals, targets = two_images_to_sample((11, 22))
    torch.manual_seed(1)
    batch = make(proposals, targets, cfg)
    for i in range(2):
        torch.manual_seed(100 + i)
        alone = make(proposals[i:i + 1], targets[i:i + 1], cfg)
        assert torch.equal(batch.proposals[i], alone.proposals[0])
    other = make(*two_images_to_sample((11, 23)), cfg)  # the seed decides
    assert torch.equal(other.proposals[0], batch.proposals[0])
    assert not torch.equal(other.proposals[1], batch.proposals[1])


def test_training_samples_carry_a_seed_of_seed_epoch_and_index(tmp_path):
    from maskrcnn.data.augment import Augment
    from maskrcnn.data.datasets import open_dataset
    from maskrcnn.data.torch_dataset import InstanceDataset
    from maskrcnn.data.normalize import Normalizer
    from maskrcnn.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path, 2, 48, seed=0)
    dataset = InstanceDataset(open_dataset(tmp_path), Normalizer(channels=3), Augment(crop_size=32), seed=5)
    seeds = [dataset[i][1].seed for i in range(2)]
    assert seeds == [dataset[i][1].seed for i in range(2)] and seeds[0] != seeds[1]
    dataset.set_epoch(1)
    assert [dataset[i][1].seed for i in range(2)] != seeds


# --- the whole model ------------------------------------------------------------------------------
def test_model_losses_and_gradients_of_a_batch_are_the_means_of_its_images(squares):
    """With ``norm: group``: what DDP computes from 2 ranks x 1 image is what 1 process computes
    from 2 images (oneDNN off: its batch-2 and batch-1 kernels round differently)."""
    torch.manual_seed(0)
    model = MaskRCNN(Config(**TINY, norm="group")).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [squares(64, 64, [(4, 4, 16), (30, 30, 20)]), squares(64, 64, [(40, 8, 12)])]
    targets[0].seed, targets[1].seed = 7, 8

    def losses_and_grads(indices):
        model.zero_grad()
        losses = model([images[i] for i in indices], [targets[i] for i in indices]).losses
        losses.total.backward()
        return losses.as_floats(), {n: p.grad.clone() for n, p in model.named_parameters()}

    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        (batch, grads), (l0, g0), (l1, g1) = (losses_and_grads(ix) for ix in ([0, 1], [0], [1]))
    finally:
        torch.backends.mkldnn.enabled = enabled
    for name, value in batch.items():
        assert value == pytest.approx((l0[name] + l1[name]) / 2, rel=1e-5, abs=1e-9), name
    for name, grad in grads.items():
        error = (grad - (g0[name] + g1[name]) / 2).abs().max()
        assert error <= 1e-4 * grad.abs().max() + 1e-12, name


def test_group_norm_replaces_every_batch_norm():
    model = MaskRCNN(Config(**{**TINY, "mask_head_channels": 48}, norm="group"))
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.GroupNorm in kinds and not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert {m.num_groups for m in model.mask.modules() if isinstance(m, torch.nn.GroupNorm)} == {16}
    assert [group_count(c) for c in (64, 2048, 48, 8, 7)] == [32, 32, 16, 8, 1]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in MaskRCNN(Config(**TINY)).modules())  # the default


def test_norm_is_validated():
    with pytest.raises(ConfigError, match="norm must be one of batch, group"):
        Config(norm="layer")
    with pytest.raises(ConfigError, match="norm: group cannot start from backbone_weights"):
        Config(norm="group", backbone_weights="resnet50.pth")


# --- data order and process-group glue ------------------------------------------------------------
@pytest.mark.parametrize("world_size, batch_size", [(2, 1), (2, 2), (3, 1), (4, 2)])
def test_rank_r_gets_the_positions_r_mod_n_of_the_single_process_batch(world_size, batch_size):
    n, global_batch = 11, world_size * batch_size
    for epoch in range(3):
        single = epoch_batches(n, global_batch, 0, 1, seed=4, epoch=epoch)
        ranks = [epoch_batches(n, batch_size, r, world_size, seed=4, epoch=epoch) for r in range(world_size)]
        assert all(len(r) == len(single) == -(-n // global_batch) for r in ranks)
        for step, batch in enumerate(single):
            for position, index in enumerate(batch.tolist()):
                assert ranks[position % world_size][step][position // world_size] == index
        assert set(single.flatten().tolist()) == set(range(n))  # every sample, padded by repeats
    shuffled = [epoch_batches(n, 1, 0, 1, seed=4, epoch=e).flatten().tolist() for e in range(3)]
    assert shuffled[0] != shuffled[1] != shuffled[2]  # a new order each epoch


def test_sync_bn_without_cuda_is_refused_before_training():
    with pytest.raises(UserError, match="--sync-bn needs CUDA"):
        DistContext.single().wrap(torch.nn.BatchNorm2d(4), sync_bn=True)
    model = torch.nn.BatchNorm2d(4)
    assert DistContext.single().wrap(model) is model  # one process: no wrapper


def test_single_process_context_reduces_nothing():
    context = DistContext.single()
    assert context.mean_floats({"a": 1.5}) == {"a": 1.5}
    assert context.all_gather_objects([3]) == [[3]]
