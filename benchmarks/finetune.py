"""Benchmark: fine-tuning the built-in model on a lab's own images, judged on images it never saw.

    .venv/bin/python benchmarks/finetune.py --out bench_out            # ~40 min: 10 min of training per image
    .venv/bin/python benchmarks/finetune.py --out bench_out --minutes 1 --images val_2023-05-31_misc_4

What a user does with the CLI defaults: for each held-out ``val_`` image of
``../shared/data/mnfinder-nuclei`` (never trained on by the built-in model), its left half becomes
a one-image dataset and ``maskrcnn train --data LEFT --out RUN --max-minutes 10`` fine-tunes the
built-in ``nuclei`` model on it (one-class data starts from it; ``best.pt`` is chosen by
validation inside the left half); ``maskrcnn evaluate`` then scores ``RUN/best.pt`` and, beside
it, the built-in model zero-shot (``--weights nuclei``, ``--diameter auto``) on the right half.
Nuclei cut by the split are kept, cut, in both halves (as a user annotating half an image would).

Output: a table on stdout, <out>/finetune.json and <out>/finetune.md, with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import machine, write_report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnfinder-nuclei"
CLI = [sys.executable, "-m", "maskrcnn"]


def halves(name: str, root: Path) -> tuple[Path, Path]:
    """Write the image's left and right halves as labels-layout datasets -> (left, right)."""
    image = tifffile.imread(DATA / "images" / f"{name}.tif")
    labels = tifffile.imread(DATA / "masks" / f"{name}.tif")
    middle = image.shape[1] // 2
    folders = []
    for side, columns in (("left", slice(None, middle)), ("right", slice(middle, None))):
        folder = root / name / side
        for sub, data in (("images", image), ("masks", labels)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(folder / sub / f"{name}_{side}.tif", data[:, columns])
        folders.append(folder)
    return folders[0], folders[1]


def evaluate(weights: str, data: Path, report: Path) -> dict:
    subprocess.run(CLI + ["evaluate", "--weights", weights, "--data", str(data), "--out", str(report),
                          "--no-progress"], check=True, capture_output=True)
    found = json.loads(report.read_text())
    return {"accuracy_50": found["summary"]["accuracy_50"], "dsb_score": found["dsb_score"],
            "mask_ap50": found["summary"]["mask_ap50"]}


def steps_of(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line).get("step", 0) for line in lines if line.strip())


def one_image(name: str, root: Path, minutes: float) -> dict:
    left, right = halves(name, root)
    run = root / name / "run"
    subprocess.run(CLI + ["train", "--data", str(left), "--out", str(run), "--max-minutes", str(minutes),
                          "--no-progress"], check=True, capture_output=True)
    return {"image": name, "zero_shot": evaluate("nuclei", right, root / name / "zero.json"),
            "fine_tuned": evaluate(str(run / "best.pt"), right, root / name / "tuned.json"),
            "steps": steps_of(run)}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Fine-tuning on the left half, scored on the right half ({m['date']}, {m['cpu']}, "
             f"{report['minutes']} min of `maskrcnn train` with the CLI defaults per image)", "",
             "| image (right half) | zero-shot acc@0.5 | zero-shot DSB2018 | fine-tuned acc@0.5 | "
             "fine-tuned DSB2018 | steps |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        z, f = r["zero_shot"], r["fine_tuned"]
        lines.append(f"| {r['image']} | {z['accuracy_50']:.3f} | {z['dsb_score']:.3f} | {f['accuracy_50']:.3f} | "
                     f"{f['dsb_score']:.3f} | {r['steps']} |")
    mean = report["mean"]
    lines += ["", f"Mean DSB2018 score {mean['zero_shot']:.3f} zero-shot -> {mean['fine_tuned']:.3f} fine-tuned."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--images", nargs="+", help="val_ image names (default: all)")
    args = parser.parse_args()
    names = args.images or sorted(p.stem for p in (DATA / "images").glob("val_*.tif"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_image(name, Path(tmp), args.minutes) for name in names]
    mean = {k: sum(r[k]["dsb_score"] for r in rows) / len(rows) for k in ("zero_shot", "fine_tuned")}
    report = {"machine": machine(), "minutes": args.minutes, "rows": rows, "mean": mean}
    write_report(args.out, "finetune", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
