"""Benchmark: ours (maskrcnn.MaskRCNN) vs torchvision maskrcnn_resnet50_fpn, in one process.

    .venv/bin/python benchmarks/run.py --out bench_out           # full run (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --out bench_out --quick   # smoke run: 256 only, 1 repeat

Both systems: ResNet-50-FPN, random weights from a fixed seed, batch 1, square images of 256, 512
and 1024 pixels, the same image and the same targets, exactly 100 detections per image at
inference (see bench_common.py for the settings, and the one RPN weight tweak for ours). The two
are timed alternately (ours first on even repeats, torchvision first on odd ones) so that load
drift from other processes hits both alike; each figure is the median of the repeats after the
warm-ups. A ResNet-18 row is given for ours (no torchvision peer), and the training throughput of
ours on synthetic nuclei (256 x 256, batch 4, 20 instances per image).

Metrics
  inference_ms   one image through model.eval() under torch.inference_mode(), masks pasted
  train_step_ms  forward + backward + SGD step (momentum 0.9) on one image with 5 instances, ours
                 as train runs it by default (bfloat16 autocast on CPUs with native bfloat16;
                 train_step_fp32_ms there: --amp off)
  peak memory    the peak resident-memory increase of one steady-state step, each in a fresh
                 child process (see peak_memory.py for the method)

Output: a table on stdout, <out>/results.json and <out>/results.md, with the machine (CPU model,
cores, torch version and threads) and the date.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from maskrcnn.presets import builtin_config, nuclei_config  # noqa: E402
from maskrcnn.modeling.model import for_inference  # noqa: E402
from maskrcnn.runtime.precision import autocast_dtype, training_amp  # noqa: E402
import large  # noqa: E402
import loader  # noqa: E402
from peak_memory import measure_memory, peak  # noqa: E402

THROUGHPUT_BATCH = 4
THROUGHPUT_SIZE = 256
THROUGHPUT_INSTANCES = 20



# ----------------------------------------------------------------------------------------------
def row(model: str, size, metric: str, ours, theirs=None, **extra) -> dict:
    ratio = (ours / theirs) if (ours is not None and theirs) else None
    return {"model": model, "size": size, "metric": metric, "ours": ours, "torchvision": theirs,
            "ratio": ratio, **extra}


TRAIN_PRECISION = {True: "bfloat16 autocast (train's default here)", False: "float32"}


def bench_pair(size: int, warmup: int, repeats: int, memory: bool) -> list[dict]:
    """ResNet-50-FPN, ours vs torchvision, at one image size."""
    name = "ResNet-50-FPN"
    samples = bc.make_samples(size, 1, bc.TRAIN_INSTANCES)
    ours, tv = bc.build_ours("resnet50").eval(), bc.build_torchvision(size).eval()
    tv_size = bc.torchvision_input_size(tv, samples[0].image)
    if tuple(tv_size) != (size, size):
        raise RuntimeError(f"torchvision's transform resizes {size} to {tv_size}")

    # ours as predict runs it: BatchNorm folded, channels_last, --precision auto (bfloat16 autocast
    # on CPUs with native bfloat16, float32 elsewhere)
    fast = for_inference(copy.deepcopy(ours))
    bc.log(f"{name} {size}: inference (warm-up {warmup}, repeats {repeats})")
    inf = bc.alternate({"ours": lambda: bc.infer_ours(ours, samples),
                        "ours_auto": lambda: bc.infer_ours(fast, samples, precision="auto"),
                        "torchvision": lambda: bc.infer_torchvision(tv, samples)}, warmup, repeats)
    counts = {k: sorted(set(v["values"])) for k, v in inf.items()}
    for k, c in counts.items():
        if c != [bc.DETECTIONS]:
            bc.log(f"WARNING: {k} returned {c} detections at {size}, expected {bc.DETECTIONS}")

    bc.log(f"{name} {size}: training step")
    ours.train(), tv.train()
    opt_ours, opt_tv = bc.make_optimizer(ours), bc.make_optimizer(tv)
    # ours as train runs it by default: bfloat16 autocast where the CPU has it natively (then float32
    # too, as train --amp off runs it), float32 elsewhere
    steps = {"ours": lambda: bc.train_step_ours(ours, opt_ours, samples),
             "torchvision": lambda: bc.train_step_torchvision(tv, opt_tv, samples)}
    if training_amp(None, "cpu"):
        steps["ours_fp32"] = lambda: bc.train_step_ours(ours, opt_ours, samples, amp=False)
    train = bc.alternate(steps, warmup, repeats)
    del ours, fast, tv, opt_ours, opt_tv
    gc.collect()

    rows = [
        row(name, size, "detections_per_image", counts["ours"][0] if len(counts["ours"]) == 1 else None,
            counts["torchvision"][0] if len(counts["torchvision"]) == 1 else None, counts=counts),
        row(name, size, "inference_ms", inf["ours"]["median_s"] * 1e3, inf["torchvision"]["median_s"] * 1e3,
            times_ms={k: [t * 1e3 for t in v["times_s"]] for k, v in inf.items()}),
        row(name, size, "inference_auto_ms", inf["ours_auto"]["median_s"] * 1e3,
            inf["torchvision"]["median_s"] * 1e3, precision=str(autocast_dtype("auto", "cpu") or "float32")),
        row(name, size, "train_step_ms", train["ours"]["median_s"] * 1e3,
            train["torchvision"]["median_s"] * 1e3, precision=TRAIN_PRECISION[training_amp(None, "cpu")],
            times_ms={k: [t * 1e3 for t in v["times_s"]] for k, v in train.items()}),
    ]
    if "ours_fp32" in train:
        rows.append(row(name, size, "train_step_fp32_ms", train["ours_fp32"]["median_s"] * 1e3,
                        train["torchvision"]["median_s"] * 1e3, precision=TRAIN_PRECISION[False]))
    if memory:
        for mode in ("infer", "train"):
            bc.log(f"{name} {size}: peak memory, {mode} (child processes)")
            m_ours, m_tv = measure_memory("ours", mode, size), measure_memory("torchvision", mode, size)
            rows.append(row(name, size, f"peak_mem_{mode}_mb", peak(m_ours), peak(m_tv),
                            detail={"ours": m_ours, "torchvision": m_tv}))
            if mode == "infer":
                m_auto = measure_memory("ours_auto", mode, size)
                rows.append(row(name, size, "peak_mem_infer_auto_mb", peak(m_auto), peak(m_tv),
                                detail={"ours_auto": m_auto, "torchvision": m_tv}))
    return rows


def bench_ours_only(backbone: str, label: str, size: int, warmup: int, repeats: int,
                    memory: bool) -> list[dict]:
    samples = bc.make_samples(size, 1, bc.TRAIN_INSTANCES)
    model = bc.build_ours(backbone).eval()
    bc.log(f"{label} {size}: inference + training step (ours only)")
    inf = bc.alternate({"ours": lambda: bc.infer_ours(model, samples)}, warmup, repeats)
    model.train()
    opt = bc.make_optimizer(model)
    train = bc.alternate({"ours": lambda: bc.train_step_ours(model, opt, samples)}, warmup, repeats)
    del model, opt
    gc.collect()
    counts = sorted(set(inf["ours"]["values"]))
    rows = [
        row(label, size, "detections_per_image", counts[0] if len(counts) == 1 else None, counts=counts),
        row(label, size, "inference_ms", inf["ours"]["median_s"] * 1e3,
            times_ms={"ours": [t * 1e3 for t in inf["ours"]["times_s"]]}),
        row(label, size, "train_step_ms", train["ours"]["median_s"] * 1e3,
            times_ms={"ours": [t * 1e3 for t in train["ours"]["times_s"]]}),
    ]
    if memory:
        for mode in ("infer", "train"):
            m = measure_memory("ours", mode, size, backbone)
            rows.append(row(label, size, f"peak_mem_{mode}_mb", peak(m), detail={"ours": m}))
    return rows


def bench_default_model(warmup: int, repeats: int) -> list[dict]:
    """What a user gets: the CLI's default layout (``builtin_config``, the built-in nuclei model's:
    half-width ResNet-18 trunk, p2 at stride 2, one channel) and ``nuclei_config`` (p2 at stride 4,
    full width, the previous default), so the stride-2 layout's cost on large images is in the
    table. Predict: images per second at 512 and 1024 as ``maskrcnn predict`` runs it (folded,
    channels_last, --precision auto; 100 detections per image, as above); train: steps per second,
    batch 2, at each layout's default crop (128 and 256: the same number of p2 cells)."""
    rows = []
    for label, cfg, crop in (("builtin_config (CLI default)", builtin_config(), 128),
                             ("nuclei_config (p2 at stride 4)", nuclei_config(), 256)):
        fields = {**cfg.to_dict(), **bc.OURS_TEST_OVERRIDES}
        model = for_inference(bc.build_ours(**fields))
        for size in (512, 1024):
            samples = _channels(bc.make_samples(size, 1, bc.TRAIN_INSTANCES), cfg.in_channels)
            bc.log(f"{label} {size}: predict")
            inf = bc.alternate({"ours": lambda: bc.infer_ours(model, samples, precision="auto")}, warmup, repeats)
            rows.append(row(label, size, "predict_images_per_s", 1.0 / inf["ours"]["median_s"]))
        model = bc.build_ours(**fields).train()
        opt = bc.make_optimizer(model)
        instances = bc.TRAIN_INSTANCES // 4 if crop == 128 else bc.TRAIN_INSTANCES
        samples = _channels(bc.make_samples(crop, 2, instances), cfg.in_channels)
        bc.log(f"{label} {crop}: training step, batch 2")
        train = bc.alternate({"ours": lambda: bc.train_step_ours(model, opt, samples)}, warmup, repeats)
        rows.append(row(label, crop, "train_steps_per_s_batch2", 1.0 / train["ours"]["median_s"]))
    return rows


def _channels(samples: list[bc.Sample], channels: int) -> list[bc.Sample]:
    """The samples with one-channel images (their channel mean, as the Normalizer makes) if asked."""
    if channels == 3:
        return samples
    return [dataclasses.replace(s, image=s.image.mean(dim=0, keepdim=True)) for s in samples]


def synthetic_nuclei(size: int, count: int, instances: int) -> tuple[list[bc.Sample], str]:
    """Synthetic nuclei from maskrcnn.data.synthetic.synth_nuclei (``instances`` placed, fewer after
    occlusion), or bench_common's blobs when that module is unavailable."""
    try:
        import numpy as np
        from maskrcnn.data.synthetic import synth_nuclei
    except ImportError:
        return bc.make_samples(size, count, instances, seed=bc.SEED + 1), "blobs (bench_common.blob_sample)"
    samples = []
    for i in range(count):
        image, labels = synth_nuclei(size, np.random.default_rng([bc.SEED, i]), n_range=(instances, instances))
        ids = np.unique(labels)
        ids = ids[ids > 0]
        masks = torch.from_numpy(labels[None] == ids[:, None, None])
        scale = 255.0 if image.dtype == np.uint8 else float(max(int(image.max()), 1))
        img = torch.from_numpy(image.astype(np.float32) / scale)
        img = img[None].expand(3, -1, -1).contiguous() if img.dim() == 2 else img.permute(2, 0, 1).contiguous()
        target = bc.Target.from_masks(masks)
        samples.append(bc.Sample(img, target, bc.to_torchvision_target(target)))
    return samples, "maskrcnn.data.synthetic.synth_nuclei"


def bench_throughput(warmup: int, repeats: int) -> dict:
    samples, source = synthetic_nuclei(THROUGHPUT_SIZE, THROUGHPUT_BATCH, THROUGHPUT_INSTANCES)
    model = bc.build_ours("resnet50").train()
    opt = bc.make_optimizer(model)
    bc.log(f"throughput: ours ResNet-50-FPN, {THROUGHPUT_SIZE}x{THROUGHPUT_SIZE}, batch {THROUGHPUT_BATCH}")
    res = bc.alternate({"ours": lambda: bc.train_step_ours(model, opt, samples)}, warmup, repeats)["ours"]
    return {"model": "ResNet-50-FPN (ours)", "size": THROUGHPUT_SIZE, "batch": THROUGHPUT_BATCH,
            "instances_per_image": [len(x.target) for x in samples], "data": source,
            "step_ms": res["median_s"] * 1e3, "images_per_s": THROUGHPUT_BATCH / res["median_s"],
            "times_ms": [t * 1e3 for t in res["times_s"]]}


# ----------------------------------------------------------------------------------------------
# output
_METRIC_LABELS = {
    "detections_per_image": "detections / image",
    "inference_ms": "inference latency (ms)",
    "inference_auto_ms": "inference, as predict runs it (ms)",
    "train_step_ms": "train step (ms)",
    "train_step_fp32_ms": "train step, --amp off (float32) (ms)",
    "peak_mem_infer_mb": "peak mem, inference (MB)",
    "peak_mem_infer_auto_mb": "peak mem, inference as predict runs it (MB)",
    "predict_images_per_s": "predict, images / s (as predict runs it)",
    "train_steps_per_s_batch2": "train steps / s (batch 2)",
    "peak_mem_train_mb": "peak mem, train step (MB)",
}


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| model | size | metric | ours | torchvision | ours / tv |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        digits = 2 if "_per_s" in r["metric"] else 0  # rates are small numbers
        lines.append(f"| {r['model']} | {r['size']} | {_METRIC_LABELS.get(r['metric'], r['metric'])} | "
                     f"{_fmt(r['ours'], digits)} | {_fmt(r['torchvision'], digits)} | {_fmt(r['ratio'], 2)} |")
    return lines


def markdown(report: dict) -> str:
    m, s, t = report["machine"], report["settings"], report.get("throughput")
    out = ["# Mask R-CNN benchmark: ours vs torchvision", "",
           f"- date: {m['date']}",
           f"- machine: {m['cpu_model']} (features: {', '.join(m.get('cpu_features') or ['none listed'])}; "
           f"native bfloat16: {m.get('native_bfloat16')}), {m['logical_cores']} logical cores "
           f"({m['usable_cores']} usable), torch {m['torch_version']} / torchvision "
           f"{m['torchvision_version']}, {m['torch_threads']} intra-op threads, load average at start "
           f"{m['load_average_at_start']}",
           f"- settings: batch 1, sizes {s['sizes']}, median of {s['repeats']} runs after "
           f"{s['warmup']} warm-up(s) ({s['repeats_1024']} at 1024, for ResNet-18 and for throughput), "
           f"random weights (seed {s['seed']}), {s['detections']} detections per image, "
           f"quick={s['quick']}",
           f"- peak memory: {s['memory_method']}",
           "", *table_lines(report["rows"]), ""]
    short = sorted({r["size"] for r in report["rows"] if r["metric"] == "detections_per_image"
                    and r["ours"] != s["detections"]})
    if short:
        out += [f"Ours returned fewer than {s['detections']} instances at {short}: its post-processing "
                "(mask.postprocess.assemble_result) drops an instance whose mask is hidden entirely behind "
                "better-scoring ones in the label image; the random heads give many overlapping boxes.", ""]
    if t:
        out += [f"Training throughput, ours ({t['model']}), synthetic nuclei {t['size']}x{t['size']}, "
                f"batch {t['batch']}, instances per image {t['instances_per_image']} ({t['data']}): "
                f"**{t['images_per_s']:.2f} images/s** ({t['step_ms']:.0f} ms per step).", ""]
    if report.get("loader"):
        feeds = {"ResNet-50-FPN at 256": t["images_per_s"]} if t else {}
        feeds |= {f"{r['model']} at {r['size']}": 2 * r["ours"] for r in report["rows"]
                  if r["metric"] == "train_steps_per_s_batch2"}
        out += loader.markdown(report["loader"], feeds) + [""]
    if report.get("large"):
        out += large.markdown(report["large"]) + [""]
    out.append(f"Total benchmark wall time: {report['wall_s']:.0f} s.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out", help="output folder (results.json, results.md)")
    parser.add_argument("--quick", action="store_true", help="smoke run: size 256 only, 1 repeat, no warm-up")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes (default 256 512 1024)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5)")
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-resnet18", action="store_true", help="skip ours' ResNet-18 rows")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    parser.add_argument("--no-default-model", action="store_true",
                        help="skip the rows of the CLI default layouts (builtin_config, nuclei_config)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--no-large", action="store_true", help="skip the large / dense image rows")
    parser.add_argument("--large-weights", type=Path,
                        help="nuclei checkpoint for the large-image rows (default: one trained here)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = args.sizes or ([256] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    # 1024 is slow (several seconds a step on 2 cores): fewer repeats there, unless asked otherwise.
    repeats_big = args.repeats or (1 if args.quick else 3)
    memory = not args.no_memory

    def reps(size: int) -> int:
        return repeats_big if size >= 1024 else repeats

    report = {
        "machine": bc.machine_info(),
        "settings": {"sizes": sizes, "repeats": repeats, "warmup": warmup, "repeats_1024": repeats_big,
                     "warmup_1024": warmup, "seed": bc.SEED, "detections": bc.DETECTIONS, "batch": 1,
                     "quick": args.quick, "train_instances": bc.TRAIN_INSTANCES,
                     "ours_overrides": bc.OURS_TEST_OVERRIDES,
                     "ours_rpn_tweak": "RPN delta convs: weight 0, bias 0.5 (proposals = anchors)",
                     "torchvision": "maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, "
                                    "box_score_thresh=0, box_detections_per_img=100, min_size=max_size=size)",
                     "memory_method": ("peak RSS increase of one steady-state step in a fresh child process "
                                       "(VmHWM reset via /proc/self/clear_refs after a warm-up step; glibc "
                                       "mmap threshold fixed at 128 KiB); cold first step in detail.cold_mb")
                     if memory else "not measured"},
        "rows": [],
    }
    bc.log(f"machine: {report['machine']['cpu_model']}, threads {torch.get_num_threads()}")
    for size in sizes:
        report["rows"] += bench_pair(size, warmup, reps(size), memory)
    # The ResNet-18 rows and the throughput (a batch-4 step is ~4x a batch-1 step) are secondary:
    # 3 repeats unless asked otherwise, to keep `make bench` under ~15 minutes on 2 cores.
    if not args.no_resnet18:
        for size in sizes:
            report["rows"] += bench_ours_only("resnet18", "ResNet-18-FPN (ours)", size, warmup,
                                              min(reps(size), repeats_big), memory)
    if not args.no_default_model:
        report["rows"] += bench_default_model(warmup, repeats_big)
    if not args.no_throughput:
        report["throughput"] = bench_throughput(warmup, repeats_big)
        report["loader"] = loader.bench_loader(bc.log)
    if not (args.no_large or args.quick):
        report["large"] = large.bench_large(Path(args.out), args.large_weights, bc.log)
    report["wall_s"] = time.perf_counter() - bc.START  # markdown() reports it
    bc.write_report(args.out, "results", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
