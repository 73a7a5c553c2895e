"""Real data, same budget: the built-in model, fine-tuning, from scratch, and torchvision's Mask R-CNN.

On the one real image in ../shared/data (696x520, 369 nuclei), every row is scored on its right
40%, which nothing here trains on (the built-in model's recipe uses at most the left 60%):

- the built-in ``nuclei`` model zero-shot (no training), with and without --tta;
- ours fine-tuned from it (``train --init nuclei``) on the left 60% for the budget;
- ours from scratch in the same (built-in) layout for the budget;
- torchvision's Mask R-CNN (ResNet-18-FPN from scratch, anchors as small as ours, 256x256 crops
  of the same augmentation stream, the same optimizer and schedule) for the budget.

Same metrics for all (COCO mask AP50/AP75, DSB2018 score, F1 at IoU 0.5).

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

from maskrcnn.presets import builtin_config
from maskrcnn.data import Augment, InstanceDataset, Normalizer, collate, open_dataset, write_image, write_label_image
from maskrcnn.data.views import RegionReader
from maskrcnn.metrics import PredictionRecord, encode_masks, evaluate, prediction_record, truth_record
from maskrcnn.prediction.predict import Predictor
from maskrcnn.train import TrainOptions, learning_rate, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018-labels"
SPLIT = 0.6
ROWS = ("zero-shot", "init", "scratch", "torchvision")
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


def split_real(out: Path):
    """Write the real sample's left SPLIT to OUT/left and the rest to OUT/right; the right's sample."""
    reader = open_dataset(SHARED, "labels")
    write_band(reader, 0.0, SPLIT, out / "left")
    write_band(reader, SPLIT, 1.0, out / "right")
    return open_dataset(out / "right", "labels")[0]


def ours_trained(out: Path, name: str, minutes: float, init: str | None, config) -> tuple[Predictor, int]:
    """Ours trained ``minutes`` on the left band (``init``: starting weights, None: from scratch), at
    ``train``'s default learning rate for that start (1e-3 from scratch, 1e-4 from ``init``)."""
    result = train(TrainOptions(data=str(out / "left"), out=str(out / name), format="labels", config=config,
                                init=init, max_minutes=minutes, batch_size=BATCH, val_fraction=0.0,
                                warmup_iters=WARMUP, seed=SEED, device="cpu", progress=False))
    return Predictor.from_checkpoint(result.last, "cpu"), result.steps


def scored(predictor: Predictor, sample, tta: bool = False):
    predictor.tta = tta
    return evaluate([truth_record(sample)], [prediction_record(sample.name, predictor(sample.image))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each system")
    parser.add_argument("--out", default="bench_out/dsb_real")
    parser.add_argument("--no-torchvision", action="store_true", help="leave out torchvision's row")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which systems to run")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: the real sample is not at {SHARED}")
        return 0
    out = Path(args.out)
    test = split_real(out)
    rows = {}

    if "zero-shot" in args.rows:
        zero_shot_rows(test, rows)
    if "init" in args.rows:
        print(f"ours: train --init nuclei, {args.minutes:g} min on the left {SPLIT:.0%}")
        tuned, steps = ours_trained(out, "ours_init", args.minutes, "nuclei", None)
        rows[f"ours, train --init nuclei ({args.minutes:g} min)"] = (scored(tuned, test), steps)
        rows[f"ours, train --init nuclei ({args.minutes:g} min), --tta"] = (scored(tuned, test, tta=True), steps)
    if "scratch" in args.rows:
        print(f"ours: from scratch (the built-in layout), {args.minutes:g} min")
        scratch, steps = ours_trained(out, "ours_scratch", args.minutes, None, builtin_config())
        rows[f"ours, from scratch ({args.minutes:g} min)"] = (scored(scratch, test), steps)
    if "torchvision" in args.rows and not args.no_torchvision:
        torchvision_row(out, test, args.minutes, rows)
    write_results(out, args.minutes, rows)
    return 0


def zero_shot_rows(test, rows: dict) -> None:
    print("ours: the built-in nuclei model, zero-shot (no training)")
    builtin = Predictor.from_weights("nuclei", "cpu")
    rows["ours, built-in nuclei, zero-shot"] = (scored(builtin, test), 0)
    rows["ours, built-in nuclei, zero-shot, --tta"] = (scored(builtin, test, tta=True), 0)


def torchvision_row(out: Path, test, minutes: float, rows: dict) -> None:
    print(f"torchvision: training {minutes:g} min on the same crops")
    torch.manual_seed(SEED)
    normalizer = Normalizer()
    data = InstanceDataset(open_dataset(out / "left", "labels"), normalizer, Augment(crop_size=CROP), seed=SEED)
    model = torchvision_model(CROP)
    tv_steps = train_torchvision(model, data, minutes)
    rows[f"torchvision MaskRCNN, from scratch ({minutes:g} min)"] = (
        evaluate([truth_record(test)], [torchvision_record(model, test.name, normalizer(test.image))]), tv_steps)


def write_results(out: Path, minutes: float, rows: dict) -> None:
    """rows: name -> (EvaluationReport, training steps); printed as a table and saved as OUT/results.json."""
    table = {name: {"steps": steps, "mask_ap50": r.summary()["mask_ap50"], "mask_ap75": r.summary()["mask_ap75"],
                     "mask_ap": r.summary()["mask_ap"], "dsb_score": r.dsb_score, "f1_50": r.summary()["f1_50"]}
             for name, (r, steps) in rows.items()}
    print(f"\n{'system':<52}{'steps':>7}{'AP50':>8}{'AP75':>8}{'AP':>8}{'DSB':>8}{'F1@.5':>8}")
    for name, row in table.items():
        print(f"{name:<52}{row['steps']:>7}{row['mask_ap50']:8.3f}{row['mask_ap75']:8.3f}{row['mask_ap']:8.3f}"
              f"{row['dsb_score']:8.3f}{row['f1_50']:8.3f}")
    (out / "results.json").write_text(json.dumps({"minutes": minutes, "results": table}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
