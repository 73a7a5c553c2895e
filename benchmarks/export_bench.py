"""Benchmark: inference latency of ours eager vs its TorchScript and ONNX Runtime exports (CPU).

    .venv/bin/python benchmarks/export_bench.py --out bench_out            # ~4 min on 2 cores
    .venv/bin/python benchmarks/export_bench.py --out bench_out --quick    # 256 only, 1 repeat

The model is run.py's "ours" ResNet-50-FPN (bench_common.build_ours: random weights, seed 0,
every pre-NMS threshold 0, 100 detections per image, proposals = anchors). It is exported with
``maskrcnn.export.graph.export_model`` (traced on a 256 x 256 example) to TorchScript and ONNX, and each
file is run through ``maskrcnn.export.deploy.load_exported``, i.e. exactly as ``maskrcnn predict
--weights model.pt|model.onnx`` runs it: graph plus the same post-processing as eager (mask
threshold, largest component, mask NMS, label image). Rows:

  ours              MaskRCNN eager, torch.inference_mode()
  ours-torchscript  the traced graph through torch.jit (same torch kernels)
  ours-onnxruntime  the ONNX graph through onnxruntime's CPU provider (its threads = torch's)

Batch 1, square images of 256, 512 and 1024 (bench_common.make_samples, 5 blobs). Each system
runs alone in a fresh process (``bench_common.alternate_processes``: ONNX Runtime or OpenVINO in
the same process slowed eager torch), visited twice in alternating order, each visit one warm-up
and the repeats; median of all timed calls. The detection counts of the three are recorded too.

Output: a table on stdout, <out>/export.json and <out>/export.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from maskrcnn.export.deploy import load_exported  # noqa: E402
from maskrcnn.export.graph import export_model  # noqa: E402

SYSTEMS = ("ours", "ours-torchscript", "ours-onnxruntime")
FILES = {"ours-torchscript": ("torchscript", "model.pt"), "ours-onnxruntime": ("onnx", "model.onnx")}
EXPORT_SIZE = 256


def export_both(model, folder: Path) -> tuple[dict, dict]:
    """Export ``model`` in both formats -> (name -> loaded ExportedModel, name -> export facts)."""
    facts = {}
    for name, (fmt, file) in FILES.items():
        start = time.perf_counter()
        path = export_model(model, {"channels": 3}, fmt, folder / file, size=EXPORT_SIZE)
        facts[name] = {"export_s": time.perf_counter() - start, "file_mb": path.stat().st_size / 2**20}
        bc.log(f"exported {fmt}: {facts[name]['export_s']:.0f} s, {facts[name]['file_mb']:.0f} MB")
    return facts


def runner(system: str, folder: str, size: int):
    """(one inference by ``system`` -- eager, or the export in ``folder`` as predict loads it -- at
    ``size``, no info); built in alternate_processes' child."""
    samples = bc.make_samples(size, 1, 5)
    if system == "ours":
        model = bc.build_ours("resnet50").eval()  # seed 0: the weights that were exported
    else:
        model = load_exported(Path(folder) / FILES[system][1])[0]
    return (lambda: bc.infer_ours(model, samples)), {}


def bench(sizes: list[int], warmup: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        facts = export_both(bc.build_ours("resnet50").eval(), Path(tmp))
        rows = []
        for size in sizes:
            bc.log(f"{size}: inference, {' / '.join(SYSTEMS)} (warm-up {warmup}, repeats {repeats} per visit)")
            res = bc.alternate_processes({n: (runner, (n, tmp, size)) for n in SYSTEMS}, warmup, repeats)
            for name in SYSTEMS:
                rows.append({"model": name, "size": size, "metric": "inference_ms",
                             "value": res[name]["median_s"] * 1e3,
                             "ratio_to_eager": res[name]["median_s"] / res["ours"]["median_s"],
                             "detections": sorted(set(res[name]["values"])),
                             "times_ms": [t * 1e3 for t in res[name]["times_s"]]})
    return {"rows": rows, "export": facts}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    by = {(r["model"], r["size"]): r for r in report["rows"]}
    sizes = s["sizes"]
    lines = ["# Exported models: inference latency, ours eager vs TorchScript vs ONNX Runtime (CPU)", "",
             f"- date: {m['date']}",
             f"- machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch_version']}, "
             f"{m['torch_threads']} threads (onnxruntime: the same), load average at start {m['load_average_at_start']}",
             f"- settings: ResNet-50-FPN, batch 1, random weights (seed {s['seed']}), {s['detections']} detections, "
             f"each system alone in a fresh process, 2 visits of {s['warmup']} warm-up + {s['repeats']} "
             f"timed calls, median, full predict path (graph + post-processing)",
             "", "| system | " + " | ".join(f"{z} ms (x eager)" for z in sizes) + " | detections |",
             "|---|" + "---:|" * len(sizes) + "---|"]
    for name in SYSTEMS:
        cells = [f"{by[name, z]['value']:.0f} ({by[name, z]['ratio_to_eager']:.2f})" for z in sizes]
        counts = ", ".join(str(by[name, z]["detections"]) for z in sizes)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {counts} |")
    lines += ["", "Export: " + "; ".join(f"{k} {v['export_s']:.0f} s, {v['file_mb']:.0f} MB"
                                       for k, v in report["export"].items()),
              "", f"Total wall time: {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out", help="output folder (export.json, export.md)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 only, 1 repeat, no warm-up")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes (default 256 512 1024)")
    parser.add_argument("--repeats", type=int, help="timed runs per system, size and visit (default 3)")
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 1)")
    parser.add_argument("--threads", type=int, help="torch (and onnxruntime) threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([256] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)

    report = {"machine": bc.machine_info(),
              "settings": {"sizes": sizes, "repeats": repeats, "warmup": warmup, "seed": bc.SEED,
                           "detections": bc.DETECTIONS, "batch": 1, "export_size": EXPORT_SIZE,
                           "ours_overrides": bc.OURS_TEST_OVERRIDES}}
    report.update(bench(sizes, warmup, repeats))
    report["wall_s"] = time.perf_counter() - bc.START  # markdown() reports it
    bc.write_report(args.out, "export", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
