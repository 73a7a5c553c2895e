"""Benchmark: 3-D nuclei on synthetic Z-stacks never trained on, segmented by the built-in model.

    .venv/bin/python benchmarks/volume.py --out bench_out     # 12 stacks, about a minute on 2 cores

Stacks from maskrcnn.data.synthetic_3d (seed 1000 + i: the built-in model never saw a 3-D stack),
(Z, H, W) = (24, 160, 160), nuclei 14-28 px across, anisotropy 1.5, 2.5 and 4 (z step / pixel),
12 nuclei placed, 40% against an earlier one. Method: each plane by the 2-D model (the stack's
intensity range, one resize estimated on five of its planes), planes stitched by mask IoU at each
``--thresholds`` value (maskrcnn.prediction.volume). Metrics on voxels: acc@0.5 = TP / (TP + FP +
FN), F1@0.5 and the DSB2018-style mean accuracy over IoU 0.5..0.95, per stack and overall (the sum
of TP/FP/FN over stacks), and seconds per stack.

Output: <out>/volume.md and <out>/volume.json with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import THREADS, machine  # noqa: E402

SHAPE = (24, 160, 160)
ANISOTROPIES = (1.5, 2.5, 4.0)
DIAMETERS = (14.0, 20.0, 28.0)


def stacks(count: int, first_seed: int = 1000):
    """(Stack, image, truth) of ``count`` stacks cycling through the sizes and anisotropies; the
    benchmark's stacks are seeds 1000 on, training stacks (benchmarks/volume_finetune.py) 2000 on."""
    from maskrcnn.data.synthetic_3d import Stack, synth_stack

    for i in range(count):
        stack = Stack(diameter=DIAMETERS[i % 3], anisotropy=ANISOTROPIES[(i // 3) % 3], count=12)
        image, truth = synth_stack(SHAPE, np.random.default_rng(first_seed + i), stack)
        yield stack, image, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--stacks", type=int, default=12)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.25, 0.4])
    args = parser.parse_args()
    import torch

    from maskrcnn.metrics import match_instances
    from maskrcnn.prediction.predict import Predictor
    from maskrcnn.prediction.volume import segment_stack, stitch_planes, volume_overlaps

    torch.set_num_threads(THREADS)
    predictor = Predictor.from_weights("nuclei", device="cpu")
    rows = []
    for stack, image, truth in stacks(args.stacks):
        start = time.perf_counter()
        planes = segment_stack(predictor, image, threshold=1.1, min_planes=1)  # 1.1: the planes' own ids
        seconds = time.perf_counter() - start
        per_plane = planes.labels  # ids unique over the stack: every plane's instances apart
        start = time.perf_counter()
        ortho = segment_stack(predictor, image, method="ortho", anisotropy=stack.anisotropy).labels
        ortho_seconds = time.perf_counter() - start
        for threshold in [*args.thresholds, "ortho"]:
            begun = time.perf_counter()
            labels = ortho if threshold == "ortho" else stitch_planes(per_plane, threshold)
            stats = match_instances(volume_overlaps(truth, labels))
            at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
            rows.append(dict(diameter=stack.diameter, anisotropy=stack.anisotropy, threshold=threshold,
                             truth=int(truth.max()), found=int(labels.max()), tp=int(stats.tp[at50]),
                             fp=int(stats.fp[at50]), fn=int(stats.fn[at50]), acc50=float(stats.accuracy[at50]),
                             f1_50=float(stats.f1[at50]), dsb=float(stats.dsb_score),
                             seconds=ortho_seconds if threshold == "ortho" else
                             seconds + time.perf_counter() - begun))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(machine=machine(), shape=SHAPE, stacks=args.stacks, rows=rows)
    (out / "volume.json").write_text(json.dumps(report, indent=1))
    lines = [f"# 3-D nuclei on {args.stacks} synthetic stacks of {SHAPE} (Z, H, W)", "",
             f"{report['machine']['date']}; {report['machine']['cpu']}, torch threads {THREADS}.", "",
             "| method | acc@0.5 (pooled) | F1@0.5 | mean DSB2018-style | mean acc@0.5 at anisotropy "
             + " / ".join(map(str, ANISOTROPIES)) + " | s / stack |", "|---|---:|---:|---:|---:|---:|"]
    for threshold in [*args.thresholds, "ortho"]:
        mine = [r for r in rows if r["threshold"] == threshold]
        tp, fp, fn = (sum(r[k] for r in mine) for k in ("tp", "fp", "fn"))
        by_aniso = " / ".join(f"{np.mean([r['acc50'] for r in mine if r['anisotropy'] == a]):.3f}"
                              for a in ANISOTROPIES)
        name = "orthogonal views" if threshold == "ortho" else f"stitched, threshold {threshold}"
        lines.append(f"| {name} | {tp / (tp + fp + fn):.3f} | {2 * tp / (2 * tp + fp + fn):.3f} | "
                     f"{np.mean([r['dsb'] for r in mine]):.3f} | {by_aniso} | "
                     f"{np.mean([r['seconds'] for r in mine]):.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "volume.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
