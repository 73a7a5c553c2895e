"""Where the time goes: torch.profiler top ops and a per-stage breakdown, ours vs torchvision.

    .venv/bin/python benchmarks/profile_inference.py                 # 512, inference + one train step
    .venv/bin/python benchmarks/profile_inference.py --variants      # + ours with other Config values
    .venv/bin/python benchmarks/profile_inference.py --only-variants # just those (vs torchvision)
    .venv/bin/python benchmarks/profile_inference.py --size 256 --repeats 1 --no-torchvision

Same models, settings and inputs as benchmarks/run.py (see bench_common.py). The per-stage
breakdown times the model's own calls without editing the model: forward hooks on its submodules
and timing wrappers around the functions and helper objects that ``MaskRCNN.forward`` calls
(the stage modules' ``make_proposals``, ``make_detections``, ``make_instance_result`` and the mask
post-processing helpers it uses, the RoIAlign callables, the target makers and losses in training).
torchvision gets the same treatment (hooks on transform, backbone body / FPN, RPN head, RoI pools,
heads, and wrappers around its proposal filtering, detection post-processing, mask inference and
mask pasting). The stage times shown are those of the run with the median total among
``--repeats`` runs after one warm-up (so they add up); nested stages are indented under their
parent and "(rest)" is the parent's time not in a child. The heads show how many RoIs they got.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


# ----------------------------------------------------------------------------------------------
class StageTimer:
    """Accumulates wall time per stage name; stages may nest (a parent includes its children)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.runs: list[dict[str, float]] = []
        self.order: list[str] = []
        self.parent: dict[str, str | None] = {}
        self._stack: list[str] = []
        self._undo: list = []
        self.rows: dict[str, int] = {}  # RoIs into the heads (last run)

    def _enter(self, name: str) -> float:
        if name not in self.parent:
            self.parent[name] = self._stack[-1] if self._stack else None
            self.order.append(name)
        self._stack.append(name)
        return time.perf_counter()

    def _exit(self, name: str, start: float) -> None:
        self.current[name] += time.perf_counter() - start
        self._stack.pop()

    @contextmanager
    def stage(self, name: str):
        start = self._enter(name)
        try:
            yield
        finally:
            self._exit(name, start)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return wrapped

    # patching helpers, all undone by restore()
    def patch_attr(self, owner, attr: str, name: str) -> None:
        if not hasattr(owner, attr):
            return
        had_own = attr in vars(owner)
        original = getattr(owner, attr)
        setattr(owner, attr, self.wrap(name, original))
        self._undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def hook(self, module: torch.nn.Module, name: str, count_rois: bool = False) -> None:
        starts: list[float] = []

        def pre_hook(m, args) -> None:
            first = args[0] if args else None
            if count_rois and isinstance(first, torch.Tensor):
                self.rows[name] = int(first.shape[0])
            starts.append(self._enter(name))

        pre = module.register_forward_pre_hook(pre_hook)
        post = module.register_forward_hook(lambda m, a, o: self._exit(name, starts.pop()))
        self._undo += [pre.remove, post.remove]

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def end_run(self) -> None:
        self.runs.append(dict(self.current))
        self.current = defaultdict(float)

    # report
    def medians(self) -> dict[str, float]:
        return {n: statistics.median(r.get(n, 0.0) for r in self.runs) for n in self.order}

    def median_run(self) -> dict[str, float]:
        """The run with the median total: its stages add up, unlike per-stage medians."""
        runs = sorted(self.runs, key=lambda r: r.get("total", 0.0))
        return runs[(len(runs) - 1) // 2] if runs else {}

    def table(self, title: str) -> list[str]:
        run = self.median_run()
        med = {n: run.get(n, 0.0) for n in self.order}
        roots = [n for n in self.order if self.parent[n] is None]
        total = sum(med[n] for n in roots)
        lines = [f"{title}  (the median-total run of {len(self.runs)}, total {total * 1e3:.0f} ms)",
                 f"  {'stage':<44}{'ms':>9}{'%':>7}"]

        def emit(name: str, depth: int) -> None:
            ms = med[name] * 1e3
            rows = f"   ({self.rows[name]} RoIs)" if name in self.rows else ""
            lines.append(f"  {'  ' * depth + name:<44}{ms:9.1f}{100 * med[name] / max(total, 1e-9):7.1f}{rows}")
            children = [c for c in self.order if self.parent[c] == name]
            if children:
                rest = med[name] - sum(med[c] for c in children)
                for c in children:
                    emit(c, depth + 1)
                lines.append(f"  {'  ' * (depth + 1) + '(rest)':<44}{rest * 1e3:9.1f}"
                             f"{100 * rest / max(total, 1e-9):7.1f}")

        for r in roots:
            emit(r, 0)
        return lines


# ----------------------------------------------------------------------------------------------
def instrument_ours(model, timer: StageTimer, training: bool) -> None:
    import maskrcnn.modeling.mask.postprocess as post
    import maskrcnn.modeling.mask.stage as ms
    import maskrcnn.modeling.rcnn.stage as rs
    import maskrcnn.modeling.rpn.stage as ps

    timer.patch_attr(model, "prepare", "prepare (normalise + pad)")
    timer.hook(model.backbone, "backbone")
    timer.hook(model.backbone.stem, "resnet stem")
    for i, layer in enumerate(model.backbone.layers):
        timer.hook(layer, f"resnet layer{i + 1}")
    timer.hook(model.backbone.fpn, "fpn")
    timer.hook(model.rpn, "rpn stage")
    timer.hook(model.rpn.head, "rpn head")
    timer.patch_attr(model.rpn, "anchors", "anchors")
    timer.patch_attr(ps, "make_rpn_targets", "rpn targets")
    timer.patch_attr(ps, "rpn_loss", "rpn loss")
    timer.patch_attr(ps, "make_proposals", "proposals (decode + NMS)")
    timer.hook(model.rcnn, "rcnn stage")
    timer.patch_attr(rs, "make_rcnn_targets", "rcnn targets")
    timer.patch_attr(model.rcnn.crop, "crop", "rcnn crop (RoIAlign)")
    timer.hook(model.rcnn.head, "rcnn head", count_rois=True)
    timer.patch_attr(rs, "rcnn_loss", "rcnn loss")
    timer.patch_attr(rs, "make_detections", "rcnn detections (decode + NMS)")
    timer.hook(model.mask, "mask stage")
    timer.patch_attr(ms, "make_mask_targets", "mask targets")
    timer.patch_attr(model.mask.crop, "crop", "mask crop (RoIAlign)")
    timer.hook(model.mask.head, "mask head", count_rois=True)
    timer.patch_attr(ms, "mask_loss", "mask loss")
    timer.patch_attr(ms, "make_instance_result", "post-processing (make_instance_result)")
    for fn, label in [("largest_component", "largest_component"), ("mask_areas", "mask_areas"),
                      ("assemble_result", "assemble_result"), ("mask_nms", "mask_nms (mask IoU)"),
                      ("paste_label_image", "paste_label_image")]:
        timer.patch_attr(post, fn, label)


def instrument_torchvision(model, timer: StageTimer) -> None:
    import torchvision.models.detection.roi_heads as rh
    import torchvision.models.detection.transform as tr

    timer.hook(model.transform, "transform (normalise + resize + pad)")
    timer.hook(model.backbone, "backbone")
    timer.hook(model.backbone.body, "resnet body")
    timer.hook(model.backbone.fpn, "fpn")
    timer.hook(model.rpn, "rpn")
    timer.hook(model.rpn.head, "rpn head")
    timer.hook(model.rpn.anchor_generator, "anchors")
    timer.patch_attr(model.rpn, "filter_proposals", "filter_proposals (NMS)")
    timer.hook(model.roi_heads, "roi_heads")
    timer.hook(model.roi_heads.box_roi_pool, "box roi pool")
    timer.hook(model.roi_heads.box_head, "box head", count_rois=True)
    timer.hook(model.roi_heads.box_predictor, "box predictor")
    timer.patch_attr(model.roi_heads, "postprocess_detections", "postprocess_detections (NMS)")
    timer.hook(model.roi_heads.mask_roi_pool, "mask roi pool")
    timer.hook(model.roi_heads.mask_head, "mask head", count_rois=True)
    timer.hook(model.roi_heads.mask_predictor, "mask predictor")
    timer.patch_attr(rh, "maskrcnn_inference", "maskrcnn_inference")
    timer.patch_attr(model.transform, "postprocess", "postprocess (paste masks)")
    timer.patch_attr(tr, "paste_masks_in_image", "paste_masks_in_image")


def breakdown(model, instrument, step, repeats: int, title: str) -> tuple[list[str], dict[str, float]]:
    timer = StageTimer()
    instrument(model, timer)
    try:
        with timer.stage("total"):  # warm-up, not recorded (it fixes the stage nesting)
            step()
        timer.current.clear()
        for _ in range(repeats):
            with timer.stage("total"):
                step()
            timer.end_run()
    finally:
        timer.restore()
    return timer.table(title), timer.median_run()


def top_ops(step, rows: int, title: str) -> list[str]:
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return [f"{title}: top {rows} ops by self CPU time", table]


# ----------------------------------------------------------------------------------------------
INFER_VARIANTS = {
    "default": {},
    "rpn_test_post_nms_top_k=1000": dict(rpn_test_post_nms_top_k=1000),
    "rpn test top_k 1000/1000": dict(rpn_test_pre_nms_top_k=1000, rpn_test_post_nms_top_k=1000),
    "rcnn_fc_channels=512": dict(rcnn_fc_channels=512),
    "mask_head_channels=128": dict(mask_head_channels=128),
    "rpn 1000/1000 + mask_head 128": dict(rpn_test_pre_nms_top_k=1000, rpn_test_post_nms_top_k=1000,
                                          mask_head_channels=128),
}
TRAIN_VARIANTS = {
    "default": {},
    "mask_train_batch_size=32": dict(mask_train_batch_size=32),
    "mask_head_channels=128": dict(mask_head_channels=128),
    "mask_train_batch_size=32 + mask_head 128": dict(mask_train_batch_size=32, mask_head_channels=128),
}


def run_variants(size: int, repeats: int, samples, training: bool) -> list[str]:
    """Ours with other Config values vs torchvision, timed alternately (median of ``repeats``)."""
    kind = "training step" if training else "inference"
    variants = TRAIN_VARIANTS if training else INFER_VARIANTS
    lines = [f"Ours with other Config values vs torchvision, {kind} at {size} (alternating, median of {repeats}):",
             f"  {'variant':<42}{'ours ms':>9}{'tv ms':>8}{'ours/tv':>9}{'dets':>6}"]
    print("\n".join(lines), flush=True)
    tv = bc.build_torchvision(size).train(training)
    tv_opt = bc.make_optimizer(tv)
    for label, changes in variants.items():
        model = bc.build_ours("resnet50", **changes).train(training)
        opt = bc.make_optimizer(model)
        if training:
            runs = {"ours": lambda: bc.train_step_ours(model, opt, samples),
                    "tv": lambda: bc.train_step_torchvision(tv, tv_opt, samples)}
        else:
            runs = {"ours": lambda: bc.infer_ours(model, samples), "tv": lambda: bc.infer_torchvision(tv, samples)}
        times: dict[str, list[float]] = {"ours": [], "tv": []}
        count = ""
        for round_ in range(repeats + 1):  # the first round is a warm-up
            for name in (["ours", "tv"] if round_ % 2 == 0 else ["tv", "ours"]):
                t, value = bc.timed(runs[name])
                if round_:
                    times[name].append(t)
                if name == "ours" and not training:
                    count = value
        ours_ms, tv_ms = (statistics.median(times[k]) * 1e3 for k in ("ours", "tv"))
        lines.append(f"  {label:<42}{ours_ms:9.0f}{tv_ms:8.0f}{ours_ms / tv_ms:9.2f}{count:>6}")
        print(lines[-1], flush=True)
        del model, opt
    print(flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage breakdown (median)")
    parser.add_argument("--rows", type=int, default=25, help="ops in each profiler table")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--no-torchvision", action="store_true", help="profile ours only")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step profile")
    parser.add_argument("--variants", action="store_true",
                        help="also time ours with other Config values against torchvision")
    parser.add_argument("--only-variants", action="store_true", help="only the --variants timings")
    parser.add_argument("--out", help="also write the report to this folder (profile.txt, stages.json)")
    args = parser.parse_args(argv)

    size = args.size
    samples = bc.make_samples(size, 1, 5)
    report: list[str] = [f"machine: {json.dumps(bc.machine_info())}", f"size {size}x{size}, batch 1", ""]
    stages: dict[str, dict] = {}

    def emit(lines: list[str], echo: bool = True) -> None:
        if echo:
            print("\n".join(lines) + "\n", flush=True)
        report.extend(lines + [""])

    if args.only_variants:
        emit(run_variants(size, args.repeats, samples, training=False), echo=False)
        if not args.no_train:
            emit(run_variants(size, args.repeats, samples, training=True), echo=False)
        return 0

    ours = bc.build_ours(args.backbone).eval()
    step = lambda: bc.infer_ours(ours, samples)  # noqa: E731
    lines, stages["ours_inference"] = breakdown(ours, lambda m, t: instrument_ours(m, t, False), step,
                                                args.repeats, f"OURS inference stages ({args.backbone})")
    emit(lines)
    emit(top_ops(step, args.rows, "OURS inference"))

    if not args.no_torchvision:
        tv = bc.build_torchvision(size).eval()
        tv_step = lambda: bc.infer_torchvision(tv, samples)  # noqa: E731
        lines, stages["torchvision_inference"] = breakdown(tv, instrument_torchvision, tv_step, args.repeats,
                                                           "TORCHVISION inference stages")
        emit(lines)
        emit(top_ops(tv_step, args.rows, "TORCHVISION inference"))

    if not args.no_train:
        ours.train()
        opt = bc.make_optimizer(ours)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with timer_ref[0].stage("forward"):
                loss = ours([s.image for s in samples], [s.target for s in samples]).losses.total
            with timer_ref[0].stage("backward"):
                loss.backward()
            with timer_ref[0].stage("optimizer step"):
                opt.step()

        timer_ref = [StageTimer()]

        def instrument_train(m, t):
            timer_ref[0] = t
            instrument_ours(m, t, True)

        lines, stages["ours_train"] = breakdown(ours, instrument_train, train_step, args.repeats,
                                                f"OURS training step stages ({args.backbone})")
        emit(lines)
        emit(top_ops(lambda: bc.train_step_ours(ours, opt, samples), args.rows, "OURS training step"))
        if not args.no_torchvision:
            tv.train()
            tv_opt = bc.make_optimizer(tv)
            tv_train = lambda: bc.train_step_torchvision(tv, tv_opt, samples)  # noqa: E731
            lines, stages["torchvision_train"] = breakdown(tv, instrument_torchvision, tv_train, args.repeats,
                                                           "TORCHVISION training step stages (forward only "
                                                           "is split; total includes backward + step)")
            emit(lines)
            emit(top_ops(tv_train, args.rows, "TORCHVISION training step"))

    if args.variants or args.only_variants:
        emit(run_variants(size, args.repeats, samples, training=False), echo=False)
        if not args.no_train:
            emit(run_variants(size, args.repeats, samples, training=True), echo=False)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.txt").write_text("\n".join(report) + "\n")
        (out / "stages.json").write_text(json.dumps(stages, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
