"""GPU benchmark (CUDA): ours vs torchvision, the CLI's default model, and the training step rate.

    python benchmarks/gpu.py --out bench_out            # about 4 minutes on one GPU (an H200)

Three tables, one process, one GPU:

1. ResNet-50-FPN, batch 1, ours vs torchvision's ``maskrcnn_resnet50_fpn`` (the settings of
   bench_common.py, as run.py uses on the CPU), at 512 and 1024: inference and a training step
   (forward, backward, SGD), each in float32 and in mixed precision. Mixed: bfloat16 autocast for
   both systems (for ours, inference as ``predict`` runs it: ``for_inference`` with
   ``--precision auto``; training as a bfloat16 ``--amp``). The systems alternate, medians after
   warm-up, each call ended by ``torch.cuda.synchronize``. Peak memory: the most CUDA memory
   allocated during one steady-state call above what was allocated before it.
2. The CLI's default model (the built-in ``nuclei`` model) as ``maskrcnn predict`` runs it:
   images per second at 512 and 1024 (synthetic nuclei images; decode and file writing not counted).
3. Training step rate of the built-in model's recipe (``maskrcnn pretrain``: synthetic scenes,
   128 crops, batch 2) with and without DataLoader workers, float32 and ``--amp``: steps per
   second, timed between steps after a warm-up, through the real training engine.

Output: OUT/gpu.json and OUT/gpu.md with the GPU, CPU cores and versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from maskrcnn.data.synthetic import synth_nuclei  # noqa: E402
from maskrcnn.modeling.model import for_inference  # noqa: E402
from maskrcnn.runtime.precision import autocast  # noqa: E402

MIXED = torch.bfloat16
DEVICE = "cuda"  # --device cpu: a quick dry run of this script where no GPU is (figures not comparable)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _synced(fn):
    def run():
        value = fn()
        _sync()
        return value
    return run


def _peak_mb(fn) -> float:
    """CUDA memory allocated at the peak of one call of ``fn`` above what was allocated before it."""
    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _on_cuda(samples: list[bc.Sample]) -> list[bc.Sample]:
    return [bc.Sample(s.image.to(DEVICE), s.target.to(DEVICE), {k: v.to(DEVICE) for k, v in s.tv_target.items()})
            for s in samples]


def pair_rows(size: int, warmup: int, repeats: int) -> list[dict]:
    """Ours vs torchvision at ``size``: inference and training step, float32 and mixed."""
    samples = _on_cuda(bc.make_samples(size, 1, 5))
    ours, tv = bc.build_ours().to(DEVICE), bc.build_torchvision(size).to(DEVICE)
    ours_eval = for_inference(bc.build_ours()).to(DEVICE).eval()
    tv_eval = bc.build_torchvision(size).to(DEVICE).eval()
    images = [s.image for s in samples]

    def infer_ours(mixed: bool):
        with torch.inference_mode(), autocast("bf16" if mixed else "fp32", DEVICE):
            return len(ours_eval(images).results[0])

    def infer_tv(mixed: bool):
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=MIXED, enabled=mixed):
            return int(tv_eval(images)[0]["boxes"].shape[0])

    opt_ours, opt_tv = bc.make_optimizer(ours), bc.make_optimizer(tv)

    def train(model, optimizer, mixed: bool, torchvision: bool):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=MIXED, enabled=mixed):
            if torchvision:
                loss = sum(model(images, [s.tv_target for s in samples]).values())
            else:
                loss = model(images, [s.target for s in samples]).losses.total
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    ours.train(), tv.train()
    rows = []
    for mode in ("inference", "train step"):
        for mixed in (False, True):
            if mode == "inference":
                runs = {"ours": lambda m=mixed: infer_ours(m), "torchvision": lambda m=mixed: infer_tv(m)}
            else:
                runs = {"ours": lambda m=mixed: train(ours, opt_ours, m, False),
                        "torchvision": lambda m=mixed: train(tv, opt_tv, m, True)}
            timed = bc.alternate({k: _synced(f) for k, f in runs.items()}, warmup, repeats)
            peaks = {k: _peak_mb(f) for k, f in runs.items()}
            ms = {k: 1000 * v["median_s"] for k, v in timed.items()}
            row = {"size": size, "mode": mode, "precision": "bf16 autocast" if mixed else "fp32",
                   "ours_ms": ms["ours"], "torchvision_ms": ms["torchvision"],
                   "ratio": ms["ours"] / ms["torchvision"], "ours_peak_mb": peaks["ours"],
                   "torchvision_peak_mb": peaks["torchvision"]}
            bc.log(f"{size} {mode} {row['precision']}: ours {ms['ours']:.1f} ms, torchvision "
                   f"{ms['torchvision']:.1f} ms ({row['ratio']:.2f}x); peak {peaks['ours']:.0f} vs "
                   f"{peaks['torchvision']:.0f} MB")
            rows.append(row)
    return rows


def predict_rows(sizes: list[int], warmup: int, repeats: int) -> list[dict]:
    """The built-in model as predict runs it (auto precision), images per second."""
    from maskrcnn.prediction.predict import Predictor

    predictor = Predictor.from_weights("nuclei", DEVICE)
    predictor.max_memory = 1 << 40  # the CPU-side budget is not what is measured here
    rows = []
    for size in sizes:
        image, _ = synth_nuclei(size, np.random.default_rng([3, size]))
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            result = predictor(image)
            _sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"size": size, "ms": 1000 * median, "images_per_s": 1 / median, "instances": len(result)})
        bc.log(f"predict nuclei {size}: {1000 * median:.1f} ms, {1 / median:.1f} images/s, {len(result)} instances")
    return rows


def train_rate_rows(configs: list[tuple[int, bool]], steps: int, warmup: int) -> list[dict]:
    """Steps per second of the pretraining recipe for each (workers, amp)."""
    from maskrcnn.presets import builtin_config
    from maskrcnn.data.synthetic_scenes import SceneReader
    from maskrcnn.train.pretrain import BUILTIN_CROP, SCENE_SIZE
    from maskrcnn.train import TrainOptions
    from maskrcnn.train.engine import Trainer
    from maskrcnn.train.hooks import HookBase

    class StepTimes(HookBase):
        def __init__(self):
            self.times = []

        def after_step(self):
            self.times.append(time.perf_counter())

    rows = []
    for workers, amp in configs:
        with tempfile.TemporaryDirectory() as out:
            opts = TrainOptions(data="synthetic scenes", reader=SceneReader(100_000, SCENE_SIZE, 0), out=out,
                                config=builtin_config(), iters=warmup + steps, batch_size=2, lr=1e-3,
                                crop=BUILTIN_CROP, val_fraction=0.0, val_every=10**9, device=DEVICE,
                                workers=workers, amp=amp, progress=False)
            trainer = Trainer(opts)
            timer = StepTimes()
            trainer.register(timer)
            trainer.run()
        span = timer.times[-1] - timer.times[warmup - 1]
        rate = steps / span
        rows.append({"workers": workers, "amp": amp, "steps_per_s": rate, "ms_per_step": 1000 / rate,
                     "images_per_s": 2 * rate})
        bc.log(f"train rate, workers {workers}, amp {amp}: {rate:.1f} steps/s")
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"GPU: {m['gpu']}; {m['cpu_cores']} CPU cores; torch {m['torch_version']}, torchvision "
             f"{m['torchvision_version']}; {m['date']}", "",
             "| size | mode | precision | ours ms | torchvision ms | ours / tv | peak MB ours / tv |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["pairs"]:
        lines.append(f"| {r['size']} | {r['mode']} | {r['precision']} | {r['ours_ms']:.1f} | "
                     f"{r['torchvision_ms']:.1f} | {r['ratio']:.2f}x | {r['ours_peak_mb']:.0f} / "
                     f"{r['torchvision_peak_mb']:.0f} |")
    lines += ["", "| built-in nuclei model, predict | ms | images/s |", "| --- | --- | --- |"]
    lines += [f"| {r['size']}x{r['size']} | {r['ms']:.1f} | {r['images_per_s']:.1f} |" for r in report["predict"]]
    lines += ["", "| pretraining recipe (128 crops, batch 2) | steps/s | ms/step |", "| --- | --- | --- |"]
    lines += [f"| workers {r['workers']}{', --amp' if r['amp'] else ''} | {r['steps_per_s']:.1f} | "
              f"{r['ms_per_step']:.1f} |" for r in report["train_rate"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tables", nargs="+", choices=("rate", "predict", "pairs"), default=["rate", "predict", "pairs"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = False  # True re-tunes for every new RoI count: torchvision train steps of 0.8 s at 512
    info = bc.machine_info()
    machine = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (CPU dry run)", "cpu_cores": os.cpu_count(), "cpu_model": info["cpu_model"],
               "torch_version": torch.__version__, "torchvision_version": info["torchvision_version"],
               "cuda": torch.version.cuda, "date": info["date"]}
    report = {"machine": machine, "pairs": [], "predict": [], "train_rate": []}
    if "rate" in args.tables:
        report["train_rate"] = train_rate_rows([(args.workers, False), (0, False), (args.workers, True)],
                                               args.train_steps, warmup=min(30, args.train_steps))
        bc.write_report(args.out, "gpu", report, markdown(report))  # each table as soon as it is measured
    if "predict" in args.tables:
        report["predict"] = predict_rows(args.sizes, 5, args.repeats)
        bc.write_report(args.out, "gpu", report, markdown(report))
    for size in args.sizes if "pairs" in args.tables else []:
        report["pairs"] += pair_rows(size, 5, args.repeats)
        bc.write_report(args.out, "gpu", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
