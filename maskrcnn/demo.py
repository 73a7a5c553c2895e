"""``maskrcnn demo``: the whole workflow on synthetic nuclei, in minutes on a laptop CPU.

Generates a training set and a held-out set, trains the default small model within a time
budget, evaluates on the held-out images and writes overlays of the predictions.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import nuclei_config
from .data.datasets import open_dataset
from .data.synthetic import write_synthetic_dataset
from .evaluate import evaluate_model
from .predict import Predictor, predict_files
from .train import TrainOptions, train

TRAIN_IMAGES, HELD_OUT_IMAGES, IMAGE_SIZE = 40, 8, 256
# nuclei_config at half width: on 2 CPU cores it makes about twice the steps per minute, which
# matters more than capacity for a few minutes of training on synthetic nuclei.
DEMO_WIDTHS = dict(fpn_channels=64, rpn_head_channels=64, rcnn_fc_channels=256, mask_head_channels=64,
                   rcnn_train_batch_size=32, mask_train_batch_size=16)
# The spec's own DSB2018 layout: p2 at stride 2 (its (B, 65280, 2) logits are a 256x256 image's).
# Nuclei of 6-12 px then cover 3-6 p2 cells instead of 1.5-3; training on 128x128 crops keeps a
# step as cheap as a 256x256 crop at stride 4.
DEMO_CONFIG = dict(DEMO_WIDTHS, rpn_scales=[2, 4, 8, 16])
DEMO_CROP = 128


def run_demo(out: Path, minutes: float = 10.0, seed: int = 0, device: str = "auto") -> dict[str, float]:
    started = time.monotonic()
    train_dir, test_dir = out / "data" / "train", out / "data" / "held_out"
    print(f"[1/4] synthetic nuclei: {TRAIN_IMAGES} training and {HELD_OUT_IMAGES} held-out images "
          f"({IMAGE_SIZE}x{IMAGE_SIZE}) in {out / 'data'}")
    write_synthetic_dataset(train_dir, TRAIN_IMAGES, IMAGE_SIZE, seed=seed)
    write_synthetic_dataset(test_dir, HELD_OUT_IMAGES, IMAGE_SIZE, seed=seed + 1)

    print(f"[2/4] training the small ResNet-18 model for {minutes:g} min")
    # validated once, at the end (a mid-run validation costs steps); the learning rate decays over
    # the steps the budget allows
    opts = TrainOptions(data=str(train_dir), out=str(out / "run"), format="labels",
                        config=nuclei_config(**DEMO_CONFIG), max_minutes=minutes, batch_size=2, crop=DEMO_CROP,
                        val_every=10**9, seed=seed, device=device, warmup_iters=50)
    result = train(opts)
    weights = result.best or result.last

    print(f"[3/4] evaluating {weights.name} on the held-out images")
    predictor = Predictor.from_checkpoint(weights, device)
    report = evaluate_model(predictor.model, predictor.normalizer, open_dataset(test_dir, "labels"),
                            device=predictor.device, progress=False)
    print(report.format_table())
    report.to_json(out / "held_out_report.json")

    print("[4/4] predicting the held-out images")
    run = predict_files(predictor, [str(test_dir / "images")], out / "predictions", progress=False)
    summary = report.summary()
    minutes_taken = (time.monotonic() - started) / 60
    print(f"\nheld-out mask AP50 {summary['mask_ap50']:.3f}, DSB2018 score {summary['dsb_score']:.3f} "
          f"({len(run.written)} images, {minutes_taken:.1f} min in all)")
    print(f"overlays: {out / 'predictions'}/*_overlay.png; training curves: {out / 'run' / 'curves.png'}")
    return summary
