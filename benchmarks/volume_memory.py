"""Benchmark: one large Z-stack (default 100 x 1024 x 1024) through ``maskrcnn predict --3d``, peak memory.

    .venv/bin/python benchmarks/volume_memory.py --out bench_out     # ~5 min on 2 cores
    .venv/bin/python benchmarks/volume_memory.py --out bench_out --depth 10 --side 256   # a quick look
    .venv/bin/python benchmarks/volume_memory.py --out bench_out --evaluate   # evaluate --3d instead

The stack is a mosaic of 4 x 4 synthetic stacks (maskrcnn.data.synthetic_3d, nuclei about 20 px
across, anisotropy 2, written as an OME-TIFF with its voxel size) so that it is made in seconds.
``maskrcnn predict --3d`` runs in a child process with the default memory budget (--max-memory
unset: 2 GB) and the peak resident memory of that child (getrusage of the children, i.e. VmHWM) is
reported beside the budget, with the time, the nuclei found and whether the labels were kept on
disk (images.json). The 3-D acc@0.5 against the mosaic's truth is reported too.

Output: <out>/volume_memory.md and <out>/volume_memory.json with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import machine, write_report  # noqa: E402

CLI = [sys.executable, "-m", "maskrcnn"]


def mosaic(depth: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(depth, side, side) uint16 stack and int32 truth from 4 x 4 synthetic stacks, ids kept apart."""
    from maskrcnn.data.synthetic_3d import Stack, synth_stack

    part = side // 4
    image = np.zeros((depth, side, side), np.uint16)
    truth = np.zeros((depth, side, side), np.int32)
    count = max(4, round(part * part * depth * 2 / 40000))  # about as dense as benchmarks/volume.py's stacks
    for k in range(16):
        y, x = divmod(k, 4)
        tile, labels = synth_stack((depth, part, part), np.random.default_rng(3000 + k),
                                   Stack(diameter=20.0, count=count, anisotropy=2.0))
        window = (slice(None), slice(y * part, (y + 1) * part), slice(x * part, (x + 1) * part))
        image[window] = tile
        truth[window] = np.where(labels > 0, labels + truth.max(), 0)
    return image, truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--evaluate", action="store_true",
                        help="measure `maskrcnn evaluate --3d` on the stack and its truth instead of predict")
    args = parser.parse_args()
    if args.evaluate:
        return evaluate_memory(args)
    from maskrcnn.metrics import match_instances
    from maskrcnn.prediction.volume import volume_overlaps

    image, truth = mosaic(args.depth, args.side)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.ome.tif"
        tifffile.imwrite(path, image, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 1.0,
                                                "PhysicalSizeY": 1.0})
        del image
        env = {k: v for k, v in os.environ.items() if k != "MASKRCNN_MAX_MEMORY"}  # the default budget
        begun = time.perf_counter()
        subprocess.run(CLI + ["predict", str(path), "--3d", "--out", str(Path(tmp) / "pred"), "--no-progress"],
                       check=True, env=env)
        seconds = time.perf_counter() - begun
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        entry = json.loads((Path(tmp) / "pred" / "images.json").read_text())[0]
        labels = tifffile.imread(next((Path(tmp) / "pred").glob("*_labels.tif")))
    stats = match_instances(volume_overlaps(truth, labels))
    at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
    report = {"machine": machine(), "shape": [args.depth, args.side, args.side], "peak_rss_bytes": peak,
              "budget_bytes": 2_000_000_000, "seconds": seconds, "nuclei": entry["nuclei"],
              "truth": int(len(np.unique(truth)) - 1), "labels_on_disk": entry.get("labels_on_disk"),
              "acc50": float(stats.accuracy[at50]), "dsb": float(stats.dsb_score)}
    m = report["machine"]
    text = (f"`maskrcnn predict --3d` on one {args.depth} x {args.side} x {args.side} synthetic stack "
            f"({m['date']}, {m['cpu']}, default budget 2 GB): peak RSS {peak / 1e9:.2f} GB, "
            f"{seconds:.0f} s, {report['nuclei']} nuclei found of {report['truth']} (acc@0.5 {report['acc50']:.3f}), "
            f"labels kept on disk: {report['labels_on_disk']}.\n")
    write_report(args.out, "volume_memory", report, text)
    return 0


def evaluate_memory(args) -> int:
    """``maskrcnn evaluate --3d`` on the mosaic (stack and 3-D truth as TIFFs) in a child process with
    the default budget: its peak RSS, time and scores."""
    image, truth = mosaic(args.depth, args.side)
    with tempfile.TemporaryDirectory() as tmp:
        for sub, array in (("images", image), ("masks", truth)):
            (Path(tmp) / sub).mkdir()
            tifffile.imwrite(Path(tmp) / sub / "big.ome.tif", array, metadata={
                "axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0})
        count = int(len(np.unique(truth)) - 1)
        del image, truth
        env = {k: v for k, v in os.environ.items() if k != "MASKRCNN_MAX_MEMORY"}  # the default budget
        begun = time.perf_counter()
        subprocess.run(CLI + ["evaluate", "--3d", "--data", tmp, "--weights", "nuclei", "--no-progress",
                              "--out", str(Path(tmp) / "report.json")], check=True, env=env)
        seconds = time.perf_counter() - begun
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        overall = json.loads((Path(tmp) / "report.json").read_text())["overall"]
    report = {"machine": machine(), "shape": [args.depth, args.side, args.side], "peak_rss_bytes": peak,
              "budget_bytes": 2_000_000_000, "seconds": seconds, "truth": count, "overall": overall}
    m = report["machine"]
    text = (f"`maskrcnn evaluate --3d` on one {args.depth} x {args.side} x {args.side} synthetic stack and its "
            f"truth ({m['date']}, {m['cpu']}, default budget 2 GB): peak RSS {peak / 1e9:.2f} GB, {seconds:.0f} s, "
            f"{overall['predicted']} nuclei found of {count} (acc@0.5 {overall['accuracy_50']:.3f}).\n")
    write_report(args.out, "volume_memory_evaluate", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
