"""Shared pieces of the benchmarks: the two models, fixed inputs and targets, one step of each kind.

Both systems are built with randomly initialised weights (never downloaded) from a fixed seed,
and set up so that inference returns exactly ``DETECTIONS`` instances per image:

* torchvision ``maskrcnn_resnet50_fpn``: ``box_score_thresh=0``, ``box_detections_per_img=100`` and
  ``min_size = max_size = image size`` so that its transform keeps the input resolution.
* ours ``MaskRCNN(Config(backbone=...))``: every pre-NMS score threshold 0, ``rcnn_test_max_detections
  = 100``, ``mask_test_nms_overlap_threshold = 1.0`` (mask NMS removes nothing); everything else is
  the Config default (e.g. 6000 / 3000 RPN pre / post NMS proposals, torchvision uses 1000 / 1000).

One benchmark-only weight tweak for ours: the RPN delta convs get weight 0 and bias 0.5, so every
proposal is exactly its anchor. Our RPN uses the spec's box coding, where a box equal to its
anchor encodes as (0.5, 0.5, 0.5, 0.5); with random weights (and the random backbone's large,
uncalibrated activations, std ~35) the decoded boxes are garbage (near-zero or inverted) and the
``rpn_test_nms_min_size`` filter drops nearly all of them, leaving 40-200 proposals instead of
the thousands a trained model keeps -- and then fewer than 100 detections. With proposals = anchors
(scored by the random objectness logits) the benchmark sees a trained model's proposal workload.
torchvision needs no tweak: its coding is zero-centred and clamped, and it keeps 1000 proposals.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskrcnn import Config, MaskRCNN, Target
from maskrcnn.runtime.distributed import cpu_has_fast_bfloat16
from maskrcnn.runtime.precision import autocast, training_amp

DETECTIONS = 100
SEED = 0
TRAIN_INSTANCES = 5  # instances per training image in the timed and memory-measured steps

OURS_TEST_OVERRIDES = dict(
    rpn_test_nms_pre_score_threshold=0.0,
    rcnn_test_nms_pre_score_threshold=0.0,
    mask_test_nms_pre_score_threshold=0.0,
    rcnn_test_max_detections=DETECTIONS,
    mask_test_nms_overlap_threshold=1.0,
    mask_test_mask_threshold=0.5,
)


# ----------------------------------------------------------------------------------------------
# models
def ours_config(backbone: str = "resnet50", **changes) -> Config:
    return Config(backbone=backbone, **{**OURS_TEST_OVERRIDES, **changes})


def build_ours(backbone: str = "resnet50", seed: int = SEED, **changes) -> MaskRCNN:
    torch.manual_seed(seed)
    model = MaskRCNN(ours_config(backbone, **changes))
    with torch.no_grad():
        for conv in model.rpn.head.deltas:  # see the module docstring
            conv.weight.zero_()
            conv.bias.fill_(0.5)
    return model


def build_torchvision(size: int, seed: int = SEED):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(seed)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                 box_score_thresh=0.0, box_detections_per_img=DETECTIONS,
                                 min_size=size, max_size=size)


def torchvision_input_size(model, image: torch.Tensor) -> tuple[int, int]:
    """The resolution torchvision's transform hands to its backbone (before padding)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        images, _ = model.transform([image])
    model.train(was_training)
    return tuple(images.image_sizes[0])


# ----------------------------------------------------------------------------------------------
# inputs
@dataclass
class Sample:
    image: torch.Tensor   # (3, S, S) float in [0, 1]
    target: Target        # ours
    tv_target: dict       # torchvision's dict form of the same target


def blob_sample(size: int, instances: int, generator: torch.Generator) -> Sample:
    """A synthetic 'nuclei' image: bright elliptical blobs on a dim noisy background."""
    ys = torch.arange(size, dtype=torch.float32)[:, None]
    xs = torch.arange(size, dtype=torch.float32)[None, :]
    masks = []
    for _ in range(instances):
        r = float(torch.empty(1).uniform_(size * 0.03, size * 0.08, generator=generator))
        ry = r * float(torch.empty(1).uniform_(0.7, 1.3, generator=generator))
        cx = float(torch.empty(1).uniform_(r + 2, size - r - 2, generator=generator))
        cy = float(torch.empty(1).uniform_(ry + 2, size - ry - 2, generator=generator))
        m = ((xs - cx) / r) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        masks.append(m)
    masks_t = torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
    image = 0.1 + 0.05 * torch.rand(3, size, size, generator=generator)
    if instances:
        brightness = torch.empty(instances, 3, 1, 1).uniform_(0.5, 0.9, generator=generator)
        image = torch.maximum(image, (masks_t[:, None].float() * brightness).amax(dim=0))
    target = Target.from_masks(masks_t)
    return Sample(image.clamp(0, 1), target, to_torchvision_target(target))


def to_torchvision_target(target: Target) -> dict:
    return {"boxes": target.boxes.float(), "labels": target.labels.long(),
            "masks": target.masks.to(torch.uint8)}


def from_torchvision_target(target: dict) -> Target:
    return Target(boxes=target["boxes"].float(), labels=target["labels"].long(),
                  masks=target["masks"].bool())


def make_samples(size: int, count: int, instances: int, seed: int = SEED) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed * 1000 + size)
    return [blob_sample(size, instances, generator) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# one step of each kind
def infer_ours(model, samples: list[Sample], precision: str = "fp32") -> int:
    with torch.inference_mode(), autocast(precision, "cpu"):
        results = model([s.image for s in samples]).results
    return len(results[0])


def infer_torchvision(model, samples: list[Sample]) -> int:
    with torch.inference_mode():
        results = model([s.image for s in samples])
    return int(results[0]["boxes"].shape[0])


def make_optimizer(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)


def train_step_ours(model, optimizer, samples: list[Sample], amp: bool | None = None) -> float:
    """One step as ``train`` runs it; ``amp`` (None: train's default on this CPU, see
    maskrcnn.runtime.precision.training_amp): the forward under CPU bfloat16 autocast."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_amp(amp, "cpu")):
        losses = model([s.image for s in samples], [s.target for s in samples]).losses
    loss = losses.total
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_step_torchvision(model, optimizer, samples: list[Sample]) -> float:
    optimizer.zero_grad(set_to_none=True)
    losses = model([s.image for s in samples], [s.tv_target for s in samples])
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    return float(loss.detach())


START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - START:6.0f}s] {message}", file=sys.stderr, flush=True)


def alternate(runs: dict, warmup: int, repeats: int) -> dict[str, dict]:
    """runs: name -> zero-argument callable returning a value. The order reverses every round, so
    load drift from other processes hits every system alike; median of the rounds after warm-up."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, list] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            elapsed, value = timed(runs[name])
            if round_ >= warmup:
                times[name].append(elapsed)
                values[name].append(value)
    return {n: {"median_s": statistics.median(times[n]), "times_s": times[n], "values": values[n]}
            for n in names}


def alternate_processes(factories: dict[str, tuple], warmup: int, repeats: int, visits: int = 2) -> dict[str, dict]:
    """Each system alone in a fresh process, as a user runs one engine: name -> (factory, args),
    a module-level ``factory(*args) -> (zero-argument callable, info dict)`` built in a spawned
    child with the parent's thread count. ``visits`` rounds, the order reversed every round (load
    drift hits all alike); each visit starts a child, runs ``warmup`` untimed and ``repeats``
    timed calls (timed inside the child) and ends it before the next system starts. Returns
    ``alternate``'s dict (the median over all visits) plus each system's ``info``.

    Why not one process, or all children alive at once: on the project's 2-core AMD EPYC
    (2026-12-07) eager torch took 2.6 s per 1024 image alone, 3.2 s when OpenVINO ran in the same
    process between its calls (3.2 s beside ONNX Runtime), and 2.5-4.6 s while an idle OpenVINO
    child merely held its memory; two torch children alternating did not slow each other."""
    names = list(factories)
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, list] = {n: [] for n in names}
    infos: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    for visit in range(visits):
        for name in names if visit % 2 == 0 else names[::-1]:
            mine, theirs = context.Pipe()
            factory, args = factories[name]
            child = context.Process(target=_serve, args=(theirs, factory, args, torch.get_num_threads()), daemon=True)
            child.start()
            try:
                infos[name] = _reply(mine, name)
                for call in range(warmup + repeats):
                    mine.send("run")
                    elapsed, value = _reply(mine, name)
                    if call >= warmup:
                        times[name].append(elapsed)
                        values[name].append(value)
            finally:
                mine.close()
                child.join(timeout=60)
                if child.is_alive():
                    child.kill()
    return {n: {"median_s": statistics.median(times[n]), "times_s": times[n], "values": values[n],
                "info": infos[n]} for n in names}


def _serve(conn, factory, args, threads: int) -> None:
    """The child of alternate_processes: build once, then time one call per "run" until the pipe closes."""
    torch.set_num_threads(threads)
    try:
        fn, info = factory(*args)
        conn.send(("ok", info))
        while True:
            try:
                conn.recv()
            except EOFError:
                return
            conn.send(("ok", timed(fn)))
    except Exception as err:  # the parent names the system and stops
        conn.send(("error", f"{type(err).__name__}: {err}"))


def _reply(conn, name: str):
    status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(f"{name}: {payload}")
    return payload


def write_report(out: str, name: str, report: dict, markdown: str) -> None:
    """OUT/NAME.json and OUT/NAME.md, the table also on stdout; the run's wall time in the JSON."""
    report["wall_s"] = time.perf_counter() - START
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2))
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)
    log(f"wrote {folder / (name + '.json')} and {folder / (name + '.md')}")


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------------------------
# machine
def cpu_features() -> list[str]:
    """The CPU flags that decide which kernels run: AVX2, AVX-512 and its bfloat16 / fp16, AMX."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in wanted if f in flags]


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torchvision

    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_features": cpu_features(),
        "native_bfloat16": cpu_has_fast_bfloat16(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
