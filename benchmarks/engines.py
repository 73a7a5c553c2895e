"""Benchmark: ``--engine torch`` vs ``openvino`` vs ``onnxruntime`` (and what ``auto`` picks), on the CPU.

    .venv/bin/python benchmarks/engines.py --out bench_out            # ~6-10 min on 2 cores
    .venv/bin/python benchmarks/engines.py --out bench_out --quick    # 256 only, 1 repeat, native ISA only

Two parts, each measured twice: with this CPU's own instruction set, and as a CPU without AVX-512
or native bfloat16 computes it (a child process with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``, which PyTorch's kernels, its oneDNN and OpenVINO's oneDNN all obey):

1. The built-in ``nuclei`` model as ``Predictor`` runs it (``Predictor.from_weights("nuclei",
   engine=...)``, default ``--precision auto``, the image at its own scale, whole): normalised
   synthetic fluorescence scenes of 512 and 1024 px -> instances, post-processing included.
2. The ResNet-50-FPN model of run.py (random weights, 100 detections, bench_common) as predict
   runs it (``for_inference``: BatchNorm folded, channels_last) by each engine, beside
   torchvision's ``maskrcnn_resnet50_fpn`` at 512 (its own eager inference).

Each system runs alone in a fresh process, as a user runs one engine (``bench_common.
alternate_processes``: engines sharing a process, or an idle engine process beside it, slowed
eager torch by 20-70%), visited twice in alternating order, each visit one warm-up and the repeats;
median of all timed calls, which are kept in the JSON; instance counts recorded (the engines must
agree). Output: a table on stdout, <out>/engines.json and <out>/engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from maskrcnn.data.synthetic_scenes import SceneReader  # noqa: E402
from maskrcnn.export.engines import engine_model, resolve_engine  # noqa: E402
from maskrcnn.modeling.model import for_inference  # noqa: E402
from maskrcnn.prediction.predict import Predictor  # noqa: E402

ENGINES = ("torch", "openvino", "onnxruntime")
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def builtin_runner(engine: str, size: int):
    """(one prediction of the built-in model by ``engine`` on the scene of ``size``, its precision)."""
    predictor = Predictor.from_weights("nuclei", "cpu", "auto", engine)
    image = predictor.normalizer(SceneReader.draw(size, np.random.default_rng(size))[0])
    return (lambda: len(predictor.predict_planned(image, None, scale=1.0))), {"precision": predictor.precision}


def builtin_rows(sizes: list[int], warmup: int, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        bc.log(f"built-in nuclei, {size}: {' / '.join(ENGINES)}")
        res = bc.alternate_processes({e: (builtin_runner, (e, size)) for e in ENGINES}, warmup, repeats)
        for e in ENGINES:
            rows.append({"part": "builtin", "system": e, "size": size, "ms": res[e]["median_s"] * 1e3,
                         "ratio_to_torch": res[e]["median_s"] / res["torch"]["median_s"],
                         "instances": sorted(set(res[e]["values"])), "precision": res[e]["info"]["precision"],
                         "times_ms": [round(t * 1e3, 1) for t in res[e]["times_s"]]})
    return rows


def resnet50_runner(system: str, size: int):
    """(one inference of run.py's ResNet-50-FPN model by ``system`` -- an engine, or "torchvision" --
    at ``size``, no info)."""
    samples = bc.make_samples(size, 1, 5)
    if system == "torchvision":
        model = bc.build_torchvision(size).eval()
        return (lambda: bc.infer_torchvision(model, samples)), {}
    eager = for_inference(bc.build_ours("resnet50"))
    model = eager if system == "torch" else engine_model(eager, system)
    return (lambda: bc.infer_ours(model, samples, "fp32")), {}


def resnet50_rows(size: int, warmup: int, repeats: int) -> list[dict]:
    systems = {f"ours, {e}": (resnet50_runner, (e, size)) for e in ENGINES}
    systems["torchvision"] = (resnet50_runner, ("torchvision", size))
    bc.log(f"ResNet-50-FPN, {size}: {' / '.join(systems)}")
    res = bc.alternate_processes(systems, warmup, repeats)
    tv = res["torchvision"]["median_s"]
    return [{"part": "resnet50", "system": name, "size": size, "ms": r["median_s"] * 1e3,
             "ratio_to_torchvision": r["median_s"] / tv, "instances": sorted(set(r["values"])),
             "times_ms": [round(t * 1e3, 1) for t in r["times_s"]]}
            for name, r in res.items()]


def measure(args) -> dict:
    sizes = [256] if args.quick else [512, 1024]
    repeats, warmup = (1, 0) if args.quick else (args.repeats, 1)
    return {"machine": bc.machine_info(), "auto": resolve_engine("auto", "cpu", precision="auto"),
            "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "rows": builtin_rows(sizes, warmup, repeats) + resnet50_rows(sizes[0], warmup, repeats)}


def child_avx2(args) -> dict:
    """The same measurement in a child process limited to AVX2."""
    cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, env={**os.environ, **AVX2_ENV}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the AVX2 run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(part: dict) -> list[str]:
    m = part["machine"]
    isa = "AVX2 only (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)" if part["isa"] != "native" else \
        f"native ({', '.join(m['cpu_features'])})"
    lines = [f"### {isa}", "", f"`--engine auto` picks **{part['auto']}** here (`--precision auto`).", "",
             "| built-in `nuclei`, Predictor | size | ms | x torch | instances | torch precision |",
             "|---|---:|---:|---:|---|---|"]
    for r in part["rows"]:
        if r["part"] == "builtin":
            lines.append(f"| {r['system']} | {r['size']} | {r['ms']:.0f} | {r['ratio_to_torch']:.2f} | "
                         f"{', '.join(map(str, r['instances']))} | {r['precision']} |")
    lines += ["", "| ResNet-50-FPN as predict runs it | size | ms | x torchvision | detections |",
              "|---|---:|---:|---:|---|"]
    for r in part["rows"]:
        if r["part"] == "resnet50":
            lines.append(f"| {r['system']} | {r['size']} | {r['ms']:.0f} | {r['ratio_to_torchvision']:.2f} | "
                         f"{', '.join(map(str, r['instances']))} |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    parts = [measure(args)] + ([] if args.quick else [child_avx2(args)])
    m = parts[0]["machine"]
    text = "\n".join([f"# Inference engines on the CPU ({m['date']})", "",
                      f"{m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch_version']} with "
                      f"{m['torch_threads']} threads (the engines use as many), load average at start "
                      f"{m['load_average_at_start']}.", ""] + [line for p in parts for line in table(p)])
    bc.write_report(args.out, "engines", {"parts": parts}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
