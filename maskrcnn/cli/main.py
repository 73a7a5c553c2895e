"""The ``maskrcnn`` command: train, predict, evaluate, export, models, pretrain, demo.

The CLI only parses flags; what each subcommand does is in commands.py. A user error (bad data, bad config, a
missing file) prints one line, ``maskrcnn: error: FILE: PROBLEM``, and exits with code 2.

Exit codes: 0 done; 2 (EXIT_USER_ERROR) a user error, or predict images that could not be read;
75 (EXIT_STOPPED, BSD's EX_TEMPFAIL) train or predict stopped early by SIGINT, SIGTERM or SIGUSR1
after finishing the step or image in progress, with one line saying how to continue; 130
(EXIT_INTERRUPTED) stopped at once: a second Ctrl-C, or a signal before training began.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

from ..config import BACKBONES
from ..data.datasets import FORMATS as DATA_FORMATS
from ..errors import UserError
from ..export.engines import ENGINES
from ..export.graph import FORMATS as EXPORT_FORMATS
from ..prediction.tiling import TILE_OVERLAP
from ..runtime.distributed import DEVICES
from ..runtime.memory import parse_memory
from ..runtime.precision import PRECISIONS
from .commands import (AMP_CHOICES, EXIT_STOPPED, EXIT_USER_ERROR, cmd_demo, cmd_evaluate, cmd_export, cmd_models,
                       cmd_predict, cmd_pretrain, cmd_train)

EXIT_INTERRUPTED = 130  # stopped at once (KeyboardInterrupt); files written atomically stay as they were


WEIGHTS_HELP = ("a built-in model's name (see maskrcnn models; e.g. nuclei), a checkpoint (.pt from maskrcnn "
                "train), or a file from maskrcnn export (.onnx: onnxruntime, TorchScript .pt: torch.jit; CPU)")
PRECISION_HELP = ("numeric precision: auto = bfloat16 on CPUs with native bfloat16 (AVX512-BF16 or AMX) "
                  "and on CUDA, float32 elsewhere; exported models always run float32")


def _number(parse, expected: str, valid, requirement: str):
    """An argparse ``type`` that parses with ``parse`` and accepts what ``valid`` says."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    return convert


_positive_int = _number(int, "a whole number >= 1", lambda v: v >= 1, ">= 1")
_count = _number(int, "a whole number >= 0", lambda v: v >= 0, ">= 0")
_positive_float = _number(float, "a number > 0", lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
_share = _number(float, "a number from 0 to 1", lambda v: 0 <= v <= 1, "from 0 to 1")


def _diameter(text: str) -> float | str:
    """--diameter: ``auto`` or a number of pixels > 0."""
    return "auto" if text == "auto" else _positive_float(text)


def _memory(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    train.add_argument("--lr", type=_positive_float,
                       help="base learning rate (default: 1e-3 from scratch, 1e-4 with --init)")
    train.add_argument("--crop", type=_positive_int,
                       help="training crop size in pixels (default 128 for p2 at stride 2, as the built-in "
                            "model; else 256)")
    train.add_argument("--init", help="start from a built-in model (e.g. nuclei) or a checkpoint, with a fresh "
                                      "schedule; default: nuclei for one-class data when neither --config nor "
                                      "--backbone is given; 'none' trains from scratch")
    train.add_argument("--backbone", choices=BACKBONES)
    train.add_argument("--val-every", type=_positive_int, default=200, help="validate and checkpoint every N steps")
    train.add_argument("--checkpoint-every", type=_positive_int,
                       help="also write last.pt every N steps, without validating (what --resume loses at most)")
    train.add_argument("--device", choices=DEVICES, default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.add_argument("--skip-bad", action="store_true",
                       help="skip unreadable samples, before the first step or when first read (listed in "
                            "RUN_DIR/skipped.txt)")
    train.add_argument("--check-data", action="store_true",
                       help="read every sample before the first step (default: check that the files exist and "
                            "their sizes agree, without decoding; a bad sample then stops the run when first read)")
    train.add_argument("--workers", type=_count, default=0,
                       help="DataLoader worker processes reading the batches ahead (default 0: read in the "
                            "training process); the results are the same for any number")
    train.add_argument("--sync-bn", action="store_true",
                       help="synchronised BatchNorm across processes (CUDA only; on the CPU use `norm: group`)")
    train.add_argument("--amp", nargs="?", const="on", default="auto", choices=tuple(AMP_CHOICES),
                       help="mixed precision (losses stay float32): CPU bfloat16, CUDA float16 with loss scaling. "
                            "auto (default): on where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), off "
                            "elsewhere; --amp alone: on")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--3d", dest="three_d", action="store_true",
                       help="--data (and --val) hold Z-stacks in images/ and 3-D label images in masks/: every "
                            "z-plane that shows a nucleus is a 2-D sample; validation holds out whole stacks")
    train.add_argument("--side-views", action="store_true",
                       help="--3d: also learn from ZX and ZY slices, z stretched by the anisotropy (as "
                            "predict --3d-method ortho sees them)")
    train.add_argument("--anisotropy", type=_positive_float, default=None,
                       help="--side-views: z step / pixel size (default: each file's voxel size, else 1)")
    _plane_flags(train)
    train.set_defaults(run=cmd_train)

    predict = sub.add_parser("predict", help="segment images with a trained model",
                             description="Writes per image NAME_labels.png, NAME_overlay.png and "
                                         "NAME_instances.csv (with --rois NAME_rois.zip, with --geojson "
                                         "NAME.geojson), and results_coco.json for all images.")
    predict.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--weights", help=WEIGHTS_HELP + " (default: the built-in he model for brightfield "
                         "images, nuclei for fluorescence, chosen per image and written to images.json)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--tile", type=_positive_int, help="tile size for large images")
    predict.add_argument("--overlap", type=int, default=TILE_OVERLAP, help="tile overlap in pixels (> 2x object size)")
    predict.add_argument("--kaggle", action="store_true", help="also write a DSB2018 run-length submission.csv")
    predict.add_argument("--rois", action="store_true",
                         help="also write NAME_rois.zip per image: one ImageJ polygon ROI per instance, named by "
                              "its id in NAME_labels.png zero-padded (0001, 0002, ...), for Fiji's ROI Manager")
    predict.add_argument("--geojson", action="store_true",
                         help="also write NAME.geojson per image: one polygon per instance as a QuPath detection "
                              "with its class and the measurements of NAME_instances.csv (drag it onto the "
                              "image in QuPath)")
    predict.add_argument("--skip-existing", action="store_true",
                         help="skip images whose outputs are all in --out already (continue a stopped run); "
                              "the run's files still cover every image")
    predict.add_argument("--device", choices=DEVICES, default="auto")
    predict.add_argument("--3d", dest="three_d", action="store_true",
                         help="Z-stacks: segment every z-slice and join the planes' nuclei into 3-D ones; writes "
                              "NAME_labels.tif (ZYX), a CSV of volumes and 3-D centroids, a projection overlay")
    predict.add_argument("--zarr", action="store_true",
                         help="--3d: also write the labels as NAME_labels.ome.zarr (OME-Zarr, chunks of one "
                              "plane, written a plane at a time; needs pip install 'maskrcnn[slides]')")
    _stack_flags(predict)
    _inference_flags(predict)
    _plane_flags(predict)
    predict.set_defaults(run=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a model on an annotated dataset",
                              description="COCO box/mask AP and the microscopy metrics (DSB2018 score, "
                                          "precision, recall, F1, PQ at IoU 0.5..0.95).")
    evaluate.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--format", choices=DATA_FORMATS)
    evaluate.add_argument("--images", help="image folder for --format coco")
    evaluate.add_argument("--out", help="JSON report path (default: print only)")
    evaluate.add_argument("--tile", type=_positive_int)
    evaluate.add_argument("--overlap", type=int, default=TILE_OVERLAP, help="tile overlap in pixels")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")
    evaluate.add_argument("--3d", dest="three_d", action="store_true",
                          help="Z-stacks in images/ against 3-D label images in masks/: segmented as predict --3d, "
                               "matched by 3-D IoU; acc@0.5, F1@0.5 and the DSB2018-style score per stack and overall")
    _stack_flags(evaluate)
    _inference_flags(evaluate)
    _plane_flags(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    export = sub.add_parser("export", help="write a trained model as TorchScript or ONNX",
                            description="The whole inference path (normalisation, backbone, proposals, "
                                        "detections, mask head) with dynamic height and width, plus the "
                                        "config, class names and normaliser; predict --weights runs it.")
    export.add_argument("--weights", required=True,
                        help="a built-in model's name, or a checkpoint (.pt from maskrcnn train)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="output file (.onnx for onnx, .pt for torchscript)")
    export.add_argument("--size", type=_positive_int, default=256,
                        help="side of the example image traced (height and width stay dynamic)")
    export.set_defaults(run=cmd_export)

    models = sub.add_parser("models", help="list the built-in pretrained models and their cards",
                            description="Each built-in model: what it was trained on, for how long on what "
                                        "hardware, the nucleus sizes it expects, its measured scores, its file "
                                        "size and the licence of its data.")
    models.set_defaults(run=cmd_models)

    pretrain = sub.add_parser("pretrain", help="regenerate a built-in model, nuclei or he (resumable)",
                              description="Trains the built-in model's layout on synthetic scenes (and the left "
                                          "60%% of --real's images); run the same command again to continue. "
                                          "--publish writes it into the package with its card.")
    pretrain.add_argument("--out", required=True, help="pretraining folder (its run/ continues across sessions)")
    pretrain.add_argument("--model", choices=("nuclei", "he"), default="nuclei",
                          help="which built-in model: nuclei (fluorescence) or he (brightfield H&E/IHC, on synthetic "
                               "slides; --init nuclei starts it from the fluorescence model)")
    pretrain.add_argument("--steps", type=_positive_int, default=5000, help="length of the whole schedule")
    pretrain.add_argument("--minutes", type=_positive_float, help="stop this session after this long")
    pretrain.add_argument("--real", help="annotated dataset: the left 60%% of each image trains, the rest scores")
    pretrain.add_argument("--real-images", action="append", default=[], metavar="DIR",
                          help="annotated dataset whose images train whole, but those named val_* (held out); "
                               "resized to the model's nucleus size; may be repeated")
    pretrain.add_argument("--real-share", type=float, default=0.4, help="fraction of samples from the real data")
    pretrain.add_argument("--init", help="start from these weights (a checkpoint or built-in name), not random ones")
    pretrain.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate")
    pretrain.add_argument("--publish", action="store_true", help="write the model and its card into the package")
    pretrain.add_argument("--device", choices=DEVICES, default="auto")
    pretrain.add_argument("--workers", type=_count, default=0,
                          help="DataLoader processes drawing the scenes ahead (on a GPU: most of the CPU's "
                               "cores); the results are the same for any number")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--no-progress", action="store_true")
    pretrain.set_defaults(run=cmd_pretrain)

    demo = sub.add_parser("demo", help="synthetic nuclei: generate, train, evaluate, predict",
                          description="The whole workflow on synthetic nuclei, in a few minutes on a CPU.")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--minutes", type=_positive_float, default=10.0, help="training time budget")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", choices=DEVICES, default="auto")
    demo.set_defaults(run=cmd_demo)
    return parser


def _inference_flags(command: argparse.ArgumentParser) -> None:
    """Flags predict and evaluate share: precision, input scale, test-time augmentation, progress."""
    command.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    command.add_argument("--engine", choices=ENGINES, default="auto",
                         help="what computes the model on the CPU: openvino or onnxruntime run the graph of "
                              "maskrcnn export (same results within float rounding); auto = openvino where it "
                              "is installed (pip install 'maskrcnn[engines]'), else torch; GPUs use torch")
    scale = command.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=_positive_float,
                       help="resize images by this factor before segmenting (results are in the original size)")
    scale.add_argument("--diameter", type=_diameter, default="auto", metavar="{auto,PIXELS}",
                       help="typical nucleus diameter in your images, in pixels: resizes them to the built-in "
                            "model's scale (see maskrcnn models); auto (the default) estimates it per image "
                            "from its bright objects and writes it to images.json")
    command.add_argument("--tta", action="store_true",
                         help="test-time augmentation: 8 flips and quarter turns, merged (8x the time)")
    command.add_argument("--min-contrast", type=_share, metavar="F",
                         help="drop instances fainter than the image's background plus F of the way to its "
                              "objects' level (0-1; default: the model's mask_test_min_contrast: 0.1 for the "
                              "built-in nuclei model and models fine-tuned from it, else 0; 0 keeps all)")
    command.add_argument("--max-memory", type=_memory, metavar="SIZE",
                         help="memory the whole process may use, e.g. 2G, 1500M, 8GiB (default: "
                              "$MASKRCNN_MAX_MEMORY, else 2G): each image is "
                              "segmented whole, in tiles sized to fit, or (predict, when even its outputs would "
                              "not fit) streamed tile by tile to a tiled BigTIFF; --tile forces the tile size")
    command.add_argument("--no-progress", action="store_true")


def _stack_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of --3d: how the planes' nuclei become 3-D ones (maskrcnn.prediction.volume)."""
    parser.add_argument("--3d-method", dest="method_3d", choices=("stitch", "ortho"), default="stitch",
                        help="--3d: stitch each plane's nuclei to the plane before's (default; better on "
                             "benchmarks/volume.py), or ortho: segment the YX, ZX and ZY views and combine them")
    parser.add_argument("--stitch-threshold", type=float, default=0.25,
                        help="--3d: the mask IoU at which a nucleus continues the one in the plane before")
    parser.add_argument("--anisotropy", type=float, default=None,
                        help="--3d-method ortho: z step / pixel size; z is resampled by it for the side views "
                             "(default: the file's voxel size from OME or ImageJ metadata, else 1)")


def _plane_flags(command: argparse.ArgumentParser) -> None:
    """Flags train, predict and evaluate share: the plane of multi-dimensional images (OME-TIFF,
    OME-Zarr, ImageJ stacks) to read; see maskrcnn.data.planes. Checked by commands._planes."""
    command.add_argument("--channel", help="channel of multi-channel images: a name from the file's OME metadata "
                                           "(e.g. DAPI) or a 0-based index (default: the first channel)")
    command.add_argument("--z", help="z-slice of 3-D images: a 0-based index, or max / mean to project all "
                                     "slices (default: the first slice)")
    command.add_argument("--t", help="time point of time series: a 0-based index (default: the first)")


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
    except KeyboardInterrupt as err:  # from maskrcnn.runtime.signals it names the signal
        print("maskrcnn: interrupted" + (f" by {err}" if str(err) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = format_warning  # main() may run inside a larger program (tests)


if __name__ == "__main__":
    sys.exit(main())
