"""Benchmark: 3-D nuclei on synthetic Z-stacks never trained on, segmented by the built-in model.

    .venv/bin/python benchmarks/volume.py --out bench_out     # 12 stacks, about 4 minutes on 2 cores

Stacks from maskrcnn.data.synthetic_3d (seed 1000 + i: the built-in model never saw a 3-D stack),
(Z, H, W) = (24, 160, 160), nuclei 14-28 px across, anisotropy 1.5, 2.5 and 4 (z step / pixel),
12 nuclei placed, 40% against an earlier one. Method: each plane by the 2-D model (the stack's
intensity range, one resize estimated on five of its planes), planes stitched by mask IoU at each
``--thresholds`` value (maskrcnn.prediction.volume), refined along z (maskrcnn.prediction.zprofile;
one row without, at the default threshold), and the orthogonal views. ``--first-seed 3000``: the
stacks the refinement's thresholds were chosen on. Metrics on voxels: acc@0.5 = TP / (TP + FP +
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
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--weights", default="nuclei", help="the model (default: the built-in nuclei), e.g. a "
                                                           "train --3d run's best.pt")
    args = parser.parse_args()
    import torch

    from maskrcnn.metrics import match_instances
    from maskrcnn.prediction.predict import Predictor
    from maskrcnn.prediction.volume import (STITCH_THRESHOLD, refine_volume, segment_stack, stack_intensity,
                                            stitch_planes, volume_overlaps)

    torch.set_num_threads(THREADS)
    predictor = Predictor.from_weights(args.weights, device="cpu")
    rows, methods = [], [*args.thresholds, "unrefined", "ortho", "ortho unrefined"]
    for stack, image, truth in stacks(args.stacks, args.first_seed):
        start = time.perf_counter()
        # threshold 1.1, unrefined: the planes' own ids, unique over the stack (every instance apart)
        per_plane = segment_stack(predictor, image, threshold=1.1, min_planes=1, refine=False).labels
        seconds = time.perf_counter() - start
        intensity = stack_intensity(predictor.normalizer, image)
        normalised = np.stack([predictor.normalizer(plane, intensity).mean(0).numpy() for plane in image])
        start = time.perf_counter()
        ortho_raw = segment_stack(predictor, image, method="ortho", anisotropy=stack.anisotropy, refine=False).labels
        ortho_seconds = time.perf_counter() - start
        begun = time.perf_counter()
        ortho = refine_volume(ortho_raw.copy(), normalised)
        refine_seconds = time.perf_counter() - begun
        for threshold in methods:
            begun = time.perf_counter()
            if str(threshold).startswith("ortho"):
                labels = ortho if threshold == "ortho" else ortho_raw
            elif threshold == "unrefined":
                labels = stitch_planes(per_plane, STITCH_THRESHOLD)
            else:
                labels = stitch_planes(per_plane, threshold, images=normalised)
            stats = match_instances(volume_overlaps(truth, labels))
            at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
            rows.append(dict(diameter=stack.diameter, anisotropy=stack.anisotropy, threshold=threshold,
                             truth=int(truth.max()), found=int(labels.max()), tp=int(stats.tp[at50]),
                             fp=int(stats.fp[at50]), fn=int(stats.fn[at50]), acc50=float(stats.accuracy[at50]),
                             f1_50=float(stats.f1[at50]), dsb=float(stats.dsb_score),
                             seconds=ortho_seconds + (refine_seconds if threshold == "ortho" else 0)
                             if str(threshold).startswith("ortho") else seconds + time.perf_counter() - begun))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(machine=machine(), shape=SHAPE, stacks=args.stacks, first_seed=args.first_seed,
                  weights=args.weights, rows=rows)
    (out / "volume.json").write_text(json.dumps(report, indent=1))
    lines = [f"# 3-D nuclei on {args.stacks} synthetic stacks of {SHAPE} (Z, H, W), seeds {args.first_seed} on, "
             f"model {args.weights}", "",
             f"{report['machine']['date']}; {report['machine']['cpu']}, torch threads {THREADS}.", "",
             "| method | acc@0.5 (pooled) | F1@0.5 | mean DSB2018-style | mean acc@0.5 at anisotropy "
             + " / ".join(map(str, ANISOTROPIES)) + " | s / stack |", "|---|---:|---:|---:|---:|---:|"]
    for threshold in methods:
        mine = [r for r in rows if r["threshold"] == threshold]
        tp, fp, fn = (sum(r[k] for r in mine) for k in ("tp", "fp", "fn"))
        by_aniso = " / ".join(f"{np.mean([r['acc50'] for r in mine if r['anisotropy'] == a]):.3f}"
                              for a in ANISOTROPIES)
        names = {"ortho": "orthogonal views, refined", "ortho unrefined": "orthogonal views, not refined",
                 "unrefined": f"stitched, threshold {STITCH_THRESHOLD}, not refined"}
        name = names.get(threshold, f"stitched, threshold {threshold}, refined")
        lines.append(f"| {name} | {tp / (tp + fp + fn):.3f} | {2 * tp / (2 * tp + fp + fn):.3f} | "
                     f"{np.mean([r['dsb'] for r in mine]):.3f} | {by_aniso} | "
                     f"{np.mean([r['seconds'] for r in mine]):.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "volume.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
