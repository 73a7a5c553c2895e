"""Benchmark: fine-tuning on 3-D annotations (train --3d), judged on synthetic stacks never trained on.

    .venv/bin/python benchmarks/volume_finetune.py --out bench_out    # ~35 min on 2 cores
    .venv/bin/python benchmarks/volume_finetune.py --out bench_out --minutes 1 --train-stacks 3 --stacks 3

What a user with annotated Z-stacks does: ``maskrcnn train --3d --data STACKS --out RUN --max-minutes
10`` (one-class data: from the built-in nuclei model), with the z-planes only and with the side
views too (``--side-views``, the anisotropy read from each OME-TIFF), then ``maskrcnn evaluate --3d``
of ``RUN/best.pt`` on held-out stacks by both 3-D methods, beside the built-in model zero-shot.
Training stacks: maskrcnn.data.synthetic_3d seeds 2000 on; held-out stacks: seeds 1000 on, the ones
of benchmarks/volume.py (same sizes and anisotropies, other nuclei).

Output: a table on stdout, <out>/volume_finetune.json and <out>/volume_finetune.md, machine and date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import steps_of  # noqa: E402
from peers import machine, write_report  # noqa: E402
from volume import SHAPE, stacks  # noqa: E402

CLI = [sys.executable, "-m", "maskrcnn"]
METHODS = ("stitch", "ortho")


def write_stacks(folder: Path, count: int, first_seed: int) -> None:
    """A labels-layout folder of OME-TIFF stacks (voxel size recorded) and their 3-D labels."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (stack, image, truth) in enumerate(stacks(count, first_seed)):
        tifffile.imwrite(folder / "images" / f"s{i:02d}.ome.tif", image,
                         metadata={"axes": "ZYX", "PhysicalSizeZ": stack.anisotropy, "PhysicalSizeX": 1.0,
                                   "PhysicalSizeY": 1.0})
        tifffile.imwrite(folder / "masks" / f"s{i:02d}.tif", truth.astype("uint16"))


def evaluate(weights: str, held: Path, report: Path, method: str) -> dict:
    begun = time.perf_counter()
    subprocess.run(CLI + ["evaluate", "--3d", "--3d-method", method, "--weights", weights, "--data", str(held),
                          "--out", str(report), "--no-progress"], check=True, capture_output=True)
    seconds = time.perf_counter() - begun
    overall = json.loads(report.read_text())["overall"]
    return {"accuracy_50": overall["accuracy_50"], "f1_50": overall["f1_50"], "dsb_score": overall["dsb_score"],
            "seconds": seconds}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"3-D fine-tuning on {report['train_stacks']} annotated synthetic stacks, scored on "
             f"{report['stacks']} others of {tuple(SHAPE)} (Z, H, W) ({m['date']}, {m['cpu']}, "
             f"{report['minutes']} min of `maskrcnn train --3d` per row)", "",
             "| model | steps | stitched acc@0.5 | stitched DSB2018-style | ortho acc@0.5 | ortho DSB2018-style |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        s, o = r["stitch"], r["ortho"]
        lines.append(f"| {r['model']} | {r['steps']} | {s['accuracy_50']:.3f} | {s['dsb_score']:.3f} | "
                     f"{o['accuracy_50']:.3f} | {o['dsb_score']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--train-stacks", type=int, default=24)
    parser.add_argument("--stacks", type=int, default=12, help="held-out stacks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_stacks(root / "train", args.train_stacks, 2000)
        write_stacks(root / "held", args.stacks, 1000)
        rows = [{"model": "built-in nuclei, zero-shot", "steps": 0,
                 **{m: evaluate("nuclei", root / "held", root / f"zero_{m}.json", m) for m in METHODS}}]
        for name, flags in (("fine-tuned on z-planes", []), ("fine-tuned on z-planes + side views", ["--side-views"])):
            run = root / f"run{len(rows)}"
            subprocess.run(CLI + ["train", "--3d", *flags, "--data", str(root / "train"), "--out", str(run),
                                  "--max-minutes", str(args.minutes), "--no-progress"], check=True, capture_output=True)
            rows.append({"model": name, "steps": steps_of(run),
                         **{m: evaluate(str(run / "best.pt"), root / "held", run / f"{m}.json", m) for m in METHODS}})
    report = {"machine": machine(), "minutes": args.minutes, "train_stacks": args.train_stacks,
              "stacks": args.stacks, "rows": rows}
    write_report(args.out, "volume_finetune", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
