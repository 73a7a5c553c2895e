"""Learning check for ``train --amp`` (CPU bfloat16 autocast): held-out scores at equal steps.

    .venv/bin/python benchmarks/amp_check.py --out bench_out                  # ~25 min on 2 cores
    .venv/bin/python benchmarks/amp_check.py --out bench_out --iters 50 --seeds 0 --images val_2023-05-31_misc_4

Whether bfloat16 training learns as float32 does, asked as a user fine-tunes (benchmarks/finetune.py's
setting): for each held-out ``val_`` image of ``../shared/data/mnfinder-nuclei``, ``maskrcnn train``
with the CLI defaults (from the built-in ``nuclei`` model) on its left half for ``--iters`` steps,
with ``--amp on`` and ``--amp off``, for each seed; ``maskrcnn evaluate`` scores ``last.pt`` (the weights at
that step, not a validation pick) on the right half, which no run trains on. Meaningful only on a
CPU with native bfloat16 (elsewhere ``--amp`` is emulated: slower, and a different computation).

Output: per run mask AP50, DSB2018 score and seconds per step; the mean difference amp - fp32 over
images and seeds; <out>/amp_check.json and <out>/amp_check.md, with the machine and date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import CLI, DATA, evaluate, halves  # noqa: E402
from peers import machine, write_report  # noqa: E402

from maskrcnn.runtime.distributed import cpu_has_fast_bfloat16  # noqa: E402

PRECISIONS = ("fp32", "amp")


def one_run(left: Path, right: Path, run: Path, iters: int, seed: int, amp: bool) -> dict:
    """Train ``iters`` steps on ``left``, score the final weights on ``right``."""
    start = time.perf_counter()
    subprocess.run(CLI + ["train", "--data", str(left), "--out", str(run), "--iters", str(iters),
                          "--seed", str(seed), "--no-progress", "--amp", "on" if amp else "off"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    scores = evaluate(str(run / "last.pt"), right, run / "scores.json")
    return {**scores, "seconds_per_step": seconds / iters}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"`train` with and without `--amp`, {report['iters']} steps on the left half of each `val_` image, "
             f"`last.pt` scored on the right half ({m['date']}, {m['cpu']}, native bfloat16: "
             f"{report['native_bfloat16']})", "",
             "| image (right half) | seed | fp32 AP50 | amp AP50 | fp32 DSB2018 | amp DSB2018 | s/step fp32 / amp |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        f, a = r["fp32"], r["amp"]
        lines.append(f"| {r['image']} | {r['seed']} | {f['mask_ap50']:.3f} | {a['mask_ap50']:.3f} | "
                     f"{f['dsb_score']:.3f} | {a['dsb_score']:.3f} | "
                     f"{f['seconds_per_step']:.2f} / {a['seconds_per_step']:.2f} |")
    d = report["mean_difference"]
    lines += ["", f"Mean amp - fp32 over {len(report['rows'])} runs: AP50 {d['mask_ap50']:+.4f}, "
              f"DSB2018 {d['dsb_score']:+.4f}; seconds per step {d['step_time_ratio']:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--images", nargs="+", help="val_ image names (default: all)")
    args = parser.parse_args()
    names = args.images or sorted(p.stem for p in (DATA / "images").glob("val_*.tif"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            left, right = halves(name, Path(tmp))
            for seed in args.seeds:
                row = {"image": name, "seed": seed}
                for precision in PRECISIONS:
                    run = Path(tmp) / name / f"{precision}_{seed}"
                    row[precision] = one_run(left, right, run, args.iters, seed, precision == "amp")
                    print(name, seed, precision, row[precision], flush=True)
                rows.append(row)
    diff = {k: sum(r["amp"][k] - r["fp32"][k] for r in rows) / len(rows) for k in ("mask_ap50", "dsb_score")}
    diff["step_time_ratio"] = (sum(r["amp"]["seconds_per_step"] for r in rows)
                               / sum(r["fp32"]["seconds_per_step"] for r in rows))
    report = {"machine": machine(), "native_bfloat16": cpu_has_fast_bfloat16(), "iters": args.iters,
              "rows": rows, "mean_difference": diff}
    write_report(args.out, "amp_check", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
