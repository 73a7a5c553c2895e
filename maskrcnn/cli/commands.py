"""What each ``maskrcnn`` subcommand does with its parsed flags (the parser is in cli.py).

Each ``cmd_*`` calls library functions and returns the exit code; a user error raises
``UserError``, which cli.main prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import statistics
import sys
from pathlib import Path

from ..errors import UserError

AMP_CHOICES = {"auto": None, "on": True, "off": False}  # train --amp -> TrainOptions.amp
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # stopped early by a signal, cleanly: train --resume / predict --skip-existing continue
SUMMARY_KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "box_ap50", "dsb_score")


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import Config
    from ..presets import builtin_config
    from ..runtime.distributed import DistContext
    from ..train import TrainOptions, train

    if (args.side_views or args.anisotropy is not None) and not args.three_d:
        raise UserError("--side-views and --anisotropy are for --3d data (Z-stacks with 3-D labels)")
    if args.three_d and args.z is not None:
        raise UserError("--3d learns from every z-slice; leave out --z")
    init = _train_init(args)
    cfg = Config.from_yaml(args.config) if args.config else None
    if cfg is None and not init:
        cfg = builtin_config()  # the built-in model's layout, from scratch
    if args.backbone:
        cfg = (cfg or builtin_config()).replace(backbone=args.backbone)
    dist = DistContext.from_environment(args.device)
    opts = TrainOptions(
        data=args.data, out=args.out, format=args.format, val=args.val, config=cfg, iters=args.iters,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        crop=args.crop, val_every=args.val_every, checkpoint_every=args.checkpoint_every, device=args.device,
        seed=args.seed, resume=args.resume, skip_bad=args.skip_bad, progress=not args.no_progress,
        sync_bn=args.sync_bn, amp=AMP_CHOICES[args.amp], image_dir=args.images, init=init,
        check_data=args.check_data, workers=args.workers, planes=_planes(args), three_d=args.three_d,
        side_views=args.side_views, anisotropy=args.anisotropy)
    try:
        result = train(opts, dist, command="maskrcnn " + shlex.join(args.argv))
    except BaseException as error:
        dist.close(wait=getattr(error, "every_rank", False))
        raise
    dist.close()
    if result.interrupted:
        if dist.is_main:
            print(f"maskrcnn: stopped by {result.stopped_by} at step {result.steps}; last.pt written to "
                  f"{result.last}; continue with: {_resume_command(args.argv, dist.active)}", file=sys.stderr)
        return EXIT_STOPPED
    if dist.is_main:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.final_metrics.items() if k in SUMMARY_KEYS)
        print(f"trained {result.steps} steps in {result.precision} (stopped by {result.stopped_by}); {metrics}")
        print(f"checkpoints: {result.last}" + (f", {result.best}" if result.best else ""))
    return 0


def _train_init(args: argparse.Namespace) -> str | None:
    """What --init resolves to: a name or file, None for 'none'. Unset, one-class data with no model
    flags starts from the built-in nuclei model (the best start we know); anything else from scratch."""
    from ..builtin import builtin_names
    from ..data.datasets import DEFAULT_CLASS_NAMES, open_dataset

    if args.init is not None:
        return None if args.init == "none" else args.init
    if args.resume or args.config or args.backbone or "nuclei" not in builtin_names():
        return None
    classes = (DEFAULT_CLASS_NAMES if args.three_d else  # Z-stacks' labels: one class, nucleus
               open_dataset(args.data, args.format, image_dir=args.images, skip_bad=args.skip_bad).class_names)
    if len(classes) != 2:
        return None
    print("maskrcnn: starting from the built-in nuclei model (--init none trains from scratch)", file=sys.stderr)
    return "nuclei"


def _resume_command(argv: list[str], distributed: bool) -> str:
    """The command that continues a stopped run: this one with --resume."""
    command = shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
    return f"torchrun [its options] -m maskrcnn {command}" if distributed else f"maskrcnn {command}"


def _planes(args: argparse.Namespace):
    """The plane of multi-dimensional images chosen by --channel, --z and --t (ConfigError if bad)."""
    from ..data.planes import Planes

    return Planes.from_text(args.channel, args.z, args.t)


def _check_tiling(args: argparse.Namespace) -> None:
    if args.tile and not 0 <= args.overlap < args.tile:
        raise UserError(f"--overlap must be in [0, --tile), got {args.overlap} for --tile {args.tile}")


def _predictor(args: argparse.Namespace):
    """The model of --weights (none: the built-in nuclei or he model, per image) with the run's
    precision, scale (--scale or --diameter), floor and --tta."""
    from ..builtin import builtin_names
    from ..prediction.choice import BRIGHTFIELD, FLUORESCENCE, open_predictor

    _check_tiling(args)
    missing = [name for name in (FLUORESCENCE, BRIGHTFIELD) if name not in builtin_names()]
    if args.weights is None and missing:
        raise UserError(f"no --weights given and this installation lacks the built-in {' and '.join(missing)} "
                        "model(s) it would choose from; pass --weights")
    return open_predictor(args.weights, args.device, args.precision, args.engine, scale=args.scale,
                          diameter=None if args.diameter == "auto" else args.diameter,
                          min_contrast=args.min_contrast, tta=args.tta, max_memory=args.max_memory,
                          hint="use --scale (e.g. 0.5 to halve the image) instead of --diameter")


def cmd_predict_3d(args: argparse.Namespace) -> int:
    from ..prediction.predict import expand_inputs
    from ..prediction.stacks import predict_stacks

    _check_3d(args)
    if args.zarr and importlib.util.find_spec("zarr") is None:
        raise UserError("--zarr writes OME-Zarr with zarr: pip install 'maskrcnn[slides]'")
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.inputs)}")
    run = predict_stacks(_predictor(args), paths, args.out, _planes(args), args.stitch_threshold,
                         progress=not args.no_progress, method=args.method_3d, anisotropy=args.anisotropy,
                         zarr=args.zarr)
    for path, why in run.failed:
        print(f"maskrcnn: skipped {path}: {why}", file=sys.stderr)
    nuclei = sum(e["nuclei"] for e in run.entries)
    print(f"{len(run.written)} stack(s) segmented in 3-D, {nuclei} nuclei; outputs in {Path(args.out)}/ "
          f"(3-D labels: *_labels.tif, volumes: *_instances.csv)")
    return EXIT_USER_ERROR if run.failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.three_d:
        return cmd_predict_3d(args)
    if args.zarr:
        raise UserError("--zarr is for --3d label volumes (2-D labels are TIFF; large images stream to tiled BigTIFF)")
    from ..prediction.predict import input_images, predict_files
    from ..prediction.ranks import share_threads
    from ..runtime.distributed import DistContext

    images = input_images(args.inputs)  # checked before the model loads (seconds): its errors come at once
    # under torchrun: this rank's share of the images (the device is checked where the model loads)
    dist = DistContext.from_environment(args.device) if "RANK" in os.environ else DistContext.single()
    try:
        if dist.active:
            share_threads(dist)
        predictor = _predictor(args)
        run = predict_files(predictor, images, args.out, tile=args.tile, overlap=args.overlap,
                            kaggle=args.kaggle, progress=not args.no_progress, skip_existing=args.skip_existing,
                            rois=args.rois, geojson=args.geojson, planes=_planes(args), dist=dist)
    except BaseException:
        dist.close(wait=False)
        raise
    dist.close()
    if not dist.is_main:  # rank 0 reports the whole run
        return EXIT_STOPPED if run.stopped_by else EXIT_USER_ERROR if run.failed else 0
    for path, why in run.failed:
        print(f"maskrcnn: skipped {path}: {why}", file=sys.stderr)
    if run.stopped_by:
        print(f"maskrcnn: stopped by {run.stopped_by} after {run.done} of {run.total} images (their outputs are "
              f"complete; {run.images_json} lists them); rerun with --skip-existing to continue", file=sys.stderr)
        return EXIT_STOPPED
    kept = f", {len(run.skipped)} skipped (outputs already there)" if run.skipped else ""
    print(f"{run.segmented} image(s) segmented{kept}; outputs in {Path(args.out)}/ "
          f"(overlays: *_overlay.png, COCO results: {run.coco_json.name})")
    if run.models:
        counts = ", ".join(f"{name} for {run.models.count(name)}" for name in sorted(set(run.models)))
        print(f"built-in model chosen per image (no --weights; brightfield -> he, fluorescence -> nuclei): {counts} "
              f"({run.images_json.name})")
    if run.diameters:
        low, high, mid = min(run.diameters), max(run.diameters), statistics.median(run.diameters)
        print(f"nucleus diameter estimated per image (--diameter auto): {low:.0f}-{high:.0f} px, median {mid:.0f}; "
              f"each image resized to its model's trained diameter ({run.images_json.name})")
    return EXIT_USER_ERROR if run.failed else 0


def _check_3d(args: argparse.Namespace) -> None:
    if args.z is not None:
        raise UserError("--3d segments every z-slice; leave out --z")
    if not 0.0 < args.stitch_threshold <= 1.0:
        raise UserError(f"--stitch-threshold must be in (0, 1], got {args.stitch_threshold}")
    if args.anisotropy is not None and not 0.0 < args.anisotropy <= 100.0:
        raise UserError(f"--anisotropy (z step / pixel size) must be in (0, 100], got {args.anisotropy}")


def cmd_evaluate_3d(args: argparse.Namespace) -> int:
    from ..data.stack_reader import stack_pairs
    from ..prediction.evaluate_3d import evaluate_stacks

    _check_3d(args)
    pairs = stack_pairs(args.data)  # before the model loads
    report = evaluate_stacks(_predictor(args), args.data, _planes(args), args.stitch_threshold,
                             method=args.method_3d, anisotropy=args.anisotropy, pairs=pairs)
    print(report.format_table())
    if args.out:
        report.to_json(args.out)
        print(f"report written to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.datasets import open_dataset
    from ..prediction.evaluate import evaluate_model

    if args.three_d:
        return cmd_evaluate_3d(args)
    reader = open_dataset(args.data, args.format, image_dir=args.images, planes=_planes(args))  # before the model
    predictor = _predictor(args)
    report = evaluate_model(predictor.model, predictor.normalizer, reader, device=predictor.device,
                            progress=not args.no_progress, tile=args.tile, overlap=args.overlap,
                            precision=predictor.precision, scale=predictor.scale, tta=predictor.tta,
                            max_memory=predictor.max_memory)
    print(report.format_table())
    if args.out:
        report.to_json(args.out)
        print(f"report written to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..builtin import resolve_weights
    from ..export.graph import export_checkpoint

    out = export_checkpoint(resolve_weights(args.weights), args.format, args.out, size=args.size)
    print(f"exported {args.weights} as {args.format} to {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..builtin import builtin_names, format_card

    names = builtin_names()
    if not names:
        print("no built-in models in this installation")
    for name in names:
        print(format_card(name))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..train.pretrain import PretrainOptions, pretrain, score_builtin_run, write_builtin

    opts = PretrainOptions(out=args.out, model=args.model, steps=args.steps, minutes=args.minutes, real=args.real,
                           real_images=args.real_images, real_share=args.real_share, seed=args.seed,
                           device=args.device, workers=args.workers, lr=args.lr, init=args.init,
                           progress=not args.no_progress)
    last = pretrain(opts)
    print(f"pretraining checkpoint: {last} (run the same command again to continue)")
    if args.publish:
        scores = score_builtin_run(last, opts)
        target = write_builtin(args.out, scores, opts)
        print(f"built-in model written: {target} ({target.stat().st_size / 2**20:.1f} MB); "
              f"scores: {scores or 'none (no --real sample to score on)'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, seed=args.seed, device=args.device)
    return 0
