"""Real data, same budget: ours vs torchvision's Mask R-CNN on the real DSB2018 sample.

Both train on the left 60% of the one real image in ../shared/data (696x520, 369 nuclei) for the
same wall-clock budget, on the same random 256x256 crops (the same augmentation stream, same
seed), with the same ResNet-18-FPN backbone from scratch, the same optimizer and schedule, and
are evaluated on the right 40% with the same metrics (COCO mask AP50/AP75, DSB2018 score).

    .venv/bin/python benchmarks/dsb_real.py --minutes 10 --out bench_out/dsb_real
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from maskrcnn.config import nuclei_config
from maskrcnn.data import Augment, InstanceDataset, Normalizer, collate, open_dataset, write_image, write_label_image
from maskrcnn.data.views import RegionReader
from maskrcnn.metrics import PredictionRecord, encode_masks, evaluate, prediction_record, truth_record
from maskrcnn.predict import Predictor
from maskrcnn.train import TrainOptions, learning_rate, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018-labels"
SPLIT = 0.6
CROP, BATCH, LR, WARMUP, SEED = 256, 2, 1e-3, 50, 0


def write_band(reader, start: float, stop: float, root: Path) -> None:
    """The band [start, stop) of every image, written in the labels layout."""
    band = RegionReader(reader, start, stop)
    for i in range(len(band)):
        sample = band[i]
        labels = np.zeros(sample.image.shape[:2], np.int32)
        for k, mask in enumerate(sample.masks, start=1):
            labels[mask] = k
        write_image(root / "images" / f"{reader.names[i]}.png", sample.image)
        write_label_image(root / "masks" / f"{reader.names[i]}.png", labels)


def torchvision_model(crop: int) -> TorchvisionMaskRCNN:
    """torchvision's Mask R-CNN on the same backbone, with anchors as small as ours (8..128 px)."""
    torch.manual_seed(SEED)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return TorchvisionMaskRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors, min_size=crop, max_size=2048,
                               box_detections_per_img=1000, rpn_post_nms_top_n_test=2000,
                               rpn_pre_nms_top_n_test=4000, box_score_thresh=0.3,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def train_torchvision(model: TorchvisionMaskRCNN, data: InstanceDataset, minutes: float) -> int:
    """The loop of maskrcnn.train on torchvision's model: same batches, crops, optimizer, schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    deadline, step, epoch = time.monotonic() + minutes * 60, 0, 0
    model.train()
    while time.monotonic() < deadline:
        data.set_epoch(epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED * 100_003 + epoch))
        order = order.repeat(math.ceil(BATCH / len(order)))[:max(BATCH, len(order))]
        for batch in order.split(BATCH):
            if time.monotonic() >= deadline:
                break
            images, targets = collate([data[i] for i in batch.tolist()])
            tv_targets = [{"boxes": t.boxes, "labels": t.labels, "masks": t.masks.to(torch.uint8)} for t in targets]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, LR, WARMUP, None)
            loss = sum(model(images, tv_targets).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            step += 1
        epoch += 1
    return step


def torchvision_record(model: TorchvisionMaskRCNN, name: str, image: torch.Tensor) -> PredictionRecord:
    model.eval()
    with torch.inference_mode():
        out = model([image])[0]
    masks = (out["masks"][:, 0] > 0.5).numpy()
    order = np.argsort(-out["scores"].numpy())
    label_image = np.zeros(image.shape[1:], np.int32)
    for rank in order[::-1]:  # paint lowest score first, so the higher score owns overlaps
        label_image[masks[rank]] = rank + 1
    return PredictionRecord(name, label_image=label_image, masks=encode_masks(masks),
                            labels=out["labels"].numpy(), boxes=out["boxes"].numpy(), scores=out["scores"].numpy())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each system")
    parser.add_argument("--out", default="bench_out/dsb_real")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: the real sample is not at {SHARED}")
        return 0
    out = Path(args.out)
    reader = open_dataset(SHARED, "labels")
    write_band(reader, 0.0, SPLIT, out / "left")
    write_band(reader, SPLIT, 1.0, out / "right")
    test = open_dataset(out / "right", "labels")

    print(f"ours: training {args.minutes:g} min on the left {SPLIT:.0%}")
    result = train(TrainOptions(data=str(out / "left"), out=str(out / "ours"), format="labels", config=nuclei_config(),
                                max_minutes=args.minutes, batch_size=BATCH, lr=LR, crop=CROP, val_fraction=0.0,
                                warmup_iters=WARMUP, seed=SEED, device="cpu", progress=False))
    predictor = Predictor.from_checkpoint(result.last, "cpu")
    ours = evaluate([truth_record(test[0])], [prediction_record(test[0].name, predictor(test[0].image))])

    print(f"torchvision: training {args.minutes:g} min on the same crops")
    torch.manual_seed(SEED)
    normalizer = Normalizer()
    data = InstanceDataset(open_dataset(out / "left", "labels"), normalizer, Augment(crop_size=CROP), seed=SEED)
    model = torchvision_model(CROP)
    tv_steps = train_torchvision(model, data, args.minutes)
    theirs = evaluate([truth_record(test[0])], [torchvision_record(model, test[0].name, normalizer(test[0].image))])

    rows = {"ours": (ours, result.steps), "torchvision": (theirs, tv_steps)}
    table = {name: {"steps": steps, "mask_ap50": r.summary()["mask_ap50"], "mask_ap75": r.summary()["mask_ap75"],
                     "mask_ap": r.summary()["mask_ap"], "dsb_score": r.dsb_score, "f1_50": r.summary()["f1_50"]}
             for name, (r, steps) in rows.items()}
    print(f"\n{'system':<12}{'steps':>7}{'AP50':>8}{'AP75':>8}{'AP':>8}{'DSB':>8}{'F1@.5':>8}")
    for name, row in table.items():
        print(f"{name:<12}{row['steps']:>7}{row['mask_ap50']:8.3f}{row['mask_ap75']:8.3f}{row['mask_ap']:8.3f}"
              f"{row['dsb_score']:8.3f}{row['f1_50']:8.3f}")
    (out / "results.json").write_text(json.dumps({"minutes": args.minutes, "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
