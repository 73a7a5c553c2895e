"""The ``maskrcnn`` command: train, predict, evaluate, export, demo.

The CLI only parses flags and calls library functions. A user error (bad data, bad config, a
missing file) prints one line, ``maskrcnn: error: FILE: PROBLEM``, and exits with code 2.

Exit codes: 0 done; 2 (EXIT_USER_ERROR) a user error, or predict images that could not be read;
75 (EXIT_STOPPED, BSD's EX_TEMPFAIL) train or predict stopped early by SIGINT, SIGTERM or SIGUSR1
after finishing the step or image in progress, with one line saying how to continue; 130
(EXIT_INTERRUPTED) stopped at once: a second Ctrl-C, or a signal before training began.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from pathlib import Path

from .config import BACKBONES
from .data.datasets import FORMATS as DATA_FORMATS
from .distributed import DEVICES
from .errors import UserError
from .export import FORMATS as EXPORT_FORMATS
from .precision import PRECISIONS
from .tiling import TILE_OVERLAP

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # stopped early by a signal, cleanly: train --resume / predict --skip-existing continue
EXIT_INTERRUPTED = 130  # stopped at once (KeyboardInterrupt); files written atomically stay as they were


PRECISION_HELP = ("numeric precision: auto = bfloat16 on CPUs with native bfloat16 (AVX512-BF16 or AMX) "
                  "and on CUDA, float32 elsewhere; exported models always run float32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints the whole usage first) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"maskrcnn: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskrcnn", description="Mask R-CNN instance segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a dataset",
                           description="Train on DSB2018, label-image or COCO data. Writes last.pt, best.pt, "
                                       "metrics.jsonl and curves.png to --out.")
    train.add_argument("--data", required=True, help="dataset folder, or COCO JSON file")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--format", choices=DATA_FORMATS, help="dataset layout (detected if omitted)")
    train.add_argument("--images", help="image folder for --format coco (default: beside the JSON)")
    train.add_argument("--config", help="YAML config; flags given here override it")
    train.add_argument("--val", help="validation dataset (default: a held-out split of --data)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=_positive_int, help="optimizer steps")
    budget.add_argument("--epochs", type=_positive_int, help="passes over the training set")
    train.add_argument("--max-minutes", type=_positive_float, help="stop cleanly after this wall-clock time")
    train.add_argument("--batch-size", type=_positive_int, default=2)
    train.add_argument("--lr", type=_positive_float, default=1e-3)
    train.add_argument("--crop", type=_positive_int, default=256, help="training crop size in pixels")
    train.add_argument("--backbone", choices=BACKBONES)
    train.add_argument("--val-every", type=_positive_int, default=200, help="validate and checkpoint every N steps")
    train.add_argument("--checkpoint-every", type=_positive_int,
                       help="also write last.pt every N steps, without validating (what --resume loses at most)")
    train.add_argument("--device", choices=DEVICES, default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (listed in RUN_DIR)")
    train.add_argument("--sync-bn", action="store_true",
                       help="synchronised BatchNorm across processes (CUDA only; on the CPU use `norm: group`)")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision: CUDA float16 with loss scaling, CPU bfloat16; losses stay float32")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=cmd_train)

    predict = sub.add_parser("predict", help="segment images with a trained model",
                             description="Writes per image NAME_labels.png, NAME_overlay.png and "
                                         "NAME_instances.csv, and results_coco.json for all images.")
    predict.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--weights", required=True,
                         help="checkpoint (.pt from maskrcnn train), or a file from maskrcnn export "
                              "(.onnx: onnxruntime, TorchScript .pt: torch.jit; CPU)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--tile", type=_positive_int, help="tile size for large images")
    predict.add_argument("--overlap", type=int, default=TILE_OVERLAP, help="tile overlap in pixels (> 2x object size)")
    predict.add_argument("--kaggle", action="store_true", help="also write a DSB2018 run-length submission.csv")
    predict.add_argument("--skip-existing", action="store_true",
                         help="skip images whose outputs are all in --out already (continue a stopped run); "
                              "the run's files still cover every image")
    predict.add_argument("--device", choices=DEVICES, default="auto")
    predict.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(run=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a model on an annotated dataset",
                              description="COCO box/mask AP and the microscopy metrics (DSB2018 score, "
                                          "precision, recall, F1, PQ at IoU 0.5..0.95).")
    evaluate.add_argument("--weights", required=True, help="checkpoint, or a file from maskrcnn export")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--format", choices=DATA_FORMATS)
    evaluate.add_argument("--images", help="image folder for --format coco")
    evaluate.add_argument("--out", help="JSON report path (default: print only)")
    evaluate.add_argument("--tile", type=_positive_int)
    evaluate.add_argument("--overlap", type=int, default=TILE_OVERLAP, help="tile overlap in pixels")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    export = sub.add_parser("export", help="write a trained model as TorchScript or ONNX",
                            description="The whole inference path (normalisation, backbone, proposals, "
                                        "detections, mask head) with dynamic height and width, plus the "
                                        "config, class names and normaliser; predict --weights runs it.")
    export.add_argument("--weights", required=True, help="checkpoint (.pt from maskrcnn train)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="output file (.onnx for onnx, .pt for torchscript)")
    export.add_argument("--size", type=_positive_int, default=256,
                        help="side of the example image traced (height and width stay dynamic)")
    export.set_defaults(run=cmd_export)

    demo = sub.add_parser("demo", help="synthetic nuclei: generate, train, evaluate, predict",
                          description="The whole workflow on synthetic nuclei, in a few minutes on a CPU.")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--minutes", type=_positive_float, default=10.0, help="training time budget")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", choices=DEVICES, default="auto")
    demo.set_defaults(run=cmd_demo)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"maskrcnn: warning: {message}\n"  # not the source line that raised it: users act on the message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the line saying how to continue
    warnings.simplefilter("default")
    format_warning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.run(args)
    except UserError as err:
        print(f"maskrcnn: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # the file system refused: no permission, disk full, ...
        if err.filename is None:
            raise
        print(f"maskrcnn: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # from maskrcnn.signals it names the signal
        print("maskrcnn: interrupted" + (f" by {err}" if str(err) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = format_warning  # main() may run inside a larger program (tests)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import Config, nuclei_config
    from .distributed import DistContext
    from .train import TrainOptions, train

    cfg = Config.from_yaml(args.config) if args.config else nuclei_config()
    if args.backbone:
        cfg = cfg.replace(backbone=args.backbone)
    dist = DistContext.from_environment(args.device)
    opts = TrainOptions(
        data=args.data, out=args.out, format=args.format, val=args.val, config=cfg, iters=args.iters,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        crop=args.crop, val_every=args.val_every, checkpoint_every=args.checkpoint_every, device=args.device,
        seed=args.seed, resume=args.resume, skip_bad=args.skip_bad, progress=not args.no_progress,
        sync_bn=args.sync_bn, amp=args.amp, image_dir=args.images)
    try:
        result = train(opts, dist, command="maskrcnn " + shlex.join(args.argv))
    finally:
        dist.close()
    if result.interrupted:
        if dist.is_main:
            print(f"maskrcnn: stopped by {result.stopped_by} at step {result.steps}; last.pt written to "
                  f"{result.last}; continue with: {_resume_command(args.argv, dist.active)}", file=sys.stderr)
        return EXIT_STOPPED
    if dist.is_main:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.final_metrics.items() if k in SUMMARY_KEYS)
        print(f"trained {result.steps} steps (stopped by {result.stopped_by}); {metrics}")
        print(f"checkpoints: {result.last}" + (f", {result.best}" if result.best else ""))
    return 0


SUMMARY_KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "box_ap50", "dsb_score")


def _resume_command(argv: list[str], distributed: bool) -> str:
    """The command that continues a stopped run: this one with --resume."""
    command = shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
    return f"torchrun [its options] -m maskrcnn {command}" if distributed else f"maskrcnn {command}"


def _check_tiling(args: argparse.Namespace) -> None:
    if args.tile and not 0 <= args.overlap < args.tile:
        raise UserError(f"--overlap must be in [0, --tile), got {args.overlap} for --tile {args.tile}")


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor, predict_files

    _check_tiling(args)
    predictor = Predictor.from_weights(args.weights, args.device, args.precision)
    run = predict_files(predictor, args.inputs, args.out, tile=args.tile, overlap=args.overlap,
                        kaggle=args.kaggle, progress=not args.no_progress, skip_existing=args.skip_existing)
    for path, why in run.failed:
        print(f"maskrcnn: skipped {path}: {why}", file=sys.stderr)
    if run.stopped_by:
        print(f"maskrcnn: stopped by {run.stopped_by} after {run.done} of {run.total} images (their outputs are "
              f"complete; {run.images_json} lists them); rerun with --skip-existing to continue", file=sys.stderr)
        return EXIT_STOPPED
    kept = f", {len(run.skipped)} skipped (outputs already there)" if run.skipped else ""
    print(f"{len(run.written)} image(s) segmented{kept}; outputs in {Path(args.out)}/ "
          f"(overlays: *_overlay.png, COCO results: {run.coco_json.name})")
    return EXIT_USER_ERROR if run.failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.datasets import open_dataset
    from .evaluate import evaluate_model
    from .predict import Predictor

    _check_tiling(args)
    predictor = Predictor.from_weights(args.weights, args.device, args.precision)
    reader = open_dataset(args.data, args.format, image_dir=args.images)
    report = evaluate_model(predictor.model, predictor.normalizer, reader, device=predictor.device,
                            progress=not args.no_progress, tile=args.tile, overlap=args.overlap,
                            precision=predictor.precision)
    print(report.format_table())
    if args.out:
        report.to_json(args.out)
        print(f"report written to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.weights, args.format, args.out, size=args.size)
    print(f"exported {args.weights} as {args.format} to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, seed=args.seed, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
