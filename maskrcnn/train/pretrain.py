"""``maskrcnn pretrain``: the recipe that regenerates the built-in ``nuclei`` model from nothing.

Data: synthetic microscopy scenes drawn as they are read (maskrcnn/data/synthetic_scenes.py, never
written to disk, never repeated) and real annotations, sampled ``real_share`` of the time: the left
part of each image of ``real`` (at most the left 60% of the shared DSB2018 image: its right 40% is
what the model's scores are measured on), and every image of each ``real_images`` dataset except
its held-out ones (named ``val_*``), resized so that its nuclei are ``BUILTIN_DIAMETER`` across (as
``--diameter auto`` resizes images at prediction). Each real dataset has an equal share of the real
samples. Crops are resized by 0.5-2x (``BUILTIN_SCALES``), so that the model holds over that range
around its size: the estimate of an image's nucleus diameter is never exact. Model:
:func:`builtin_config`; ``init`` starts from a model's weights (e.g. the built-in one) instead of
random ones.

The run is an ordinary training run with a fixed length (``steps``): ``--minutes`` stops it
cleanly, and running the same command again continues it (``--resume`` is implied when
``OUT/run/last.pt`` exists), so a long pretraining can be spread over several sessions. At the end
``publish`` writes the half-precision model and its card into the package, with the recipe's
prediction settings (``BUILTIN_SETTINGS``, chosen after training; ``republish`` gives them to a
model published before).

``model="he"`` trains the brightfield model instead (maskrcnn.train.brightfield): synthetic
brightfield slides (maskrcnn.data.synthetic_brightfield) instead of the fluorescence scenes, the
stain-density input, and ``init`` a fluorescence model widened to it. It is scored on held-out
synthetic slides (the real brightfield images we have carry no labels: benchmarks/brightfield.py
measures it on them).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..builtin import FOLDER, card, is_builtin, publish
from ..config import Config
from ..data.datasets import open_dataset
from ..data.synthetic_brightfield import SlideReader
from ..data.synthetic_scenes import SceneReader
from ..data.views import CachedReader, ConcatReader, RegionReader, ResizedReader, SubsetReader
from ..errors import UserError
from ..presets import builtin_config
from ..modeling.checkpoint import save_checkpoint
from ..runtime.atomic import atomic_write_text
from . import TrainOptions, train
from .brightfield import HE_INPUT, HE_SUMMARY, he_config, he_normalizer, widen_to_stains
from .init import load_init

SCENE_SIZE = 256  # pixels per side of a synthetic scene; training crops are BUILTIN_CROP
BUILTIN_CROP = 128
REAL_FRACTION = 0.6  # the left part of each real image that may train; the rest is for scoring
BUILTIN_DIAMETER = 20.0  # pixels: the nucleus size the model learns (its card's diameter_px)
BUILTIN_SCALES = (0.5, 2.0)  # each training crop is resized by a log-uniform factor in this range
INIT_CARD = "init_card.json"  # OUT/: the card of the built-in model --init started from
HE_INIT = "he_init.pt"  # OUT/: the one-channel --init model widened to the he model's input
HELD_OUT_SLIDES = (16, 384)  # he: synthetic slides of a seed training never draws, and their size
MODELS = ("nuclei", "he")
HELD_OUT_PREFIX = "val_"  # images of a --real-images dataset named so are for scoring, never training
# What the nuclei model predicts with, chosen after training on training images only (docs/experiments.md,
# "Faint detections"): its synthetic scenes label dim out-of-focus nuclei, which real annotators leave out
BUILTIN_SETTINGS = {"mask_test_min_contrast": 0.1}
PREDICTION = ("instances fainter than the image's background plus {:.0%} of the way to its nuclei's level are "
              "dropped (mask_test_min_contrast; --min-contrast 0 keeps them)")


@dataclass
class PretrainOptions:
    out: str
    model: str = "nuclei"  # which built-in model: "nuclei" (fluorescence) or "he" (brightfield)
    steps: int = 5000
    minutes: float | None = None  # this session's share; run again to continue
    real: str | None = None  # an annotated dataset whose images' left REAL_FRACTION may train
    real_images: list[str] = field(default_factory=list)  # annotated datasets whose images train whole
    real_share: float = 0.4  # fraction of training samples from the real images (when given)
    scenes: int = 1_000_000  # synthetic scenes available (each drawn once, when read)
    seed: int = 0
    device: str = "auto"
    workers: int = 0  # DataLoader processes drawing the scenes (a GPU waits on one process); same results
    batch_size: int = 2
    lr: float = 1e-3
    init: str | None = None  # starting weights (a checkpoint or built-in name); None: random
    progress: bool = True


def training_reader(opts: PretrainOptions):
    """The mix of synthetic scenes and the real samples, repeated to ``real_share`` of the whole."""
    scenes = (SlideReader if opts.model == "he" else SceneReader)(opts.scenes, SCENE_SIZE, opts.seed)
    real = real_reader(opts)
    if real is None:
        return scenes
    copies = round(opts.real_share / (1 - opts.real_share) * len(scenes) / len(real))
    return ConcatReader([scenes, _repeated(real, copies)])


def real_reader(opts: PretrainOptions):
    """The real samples that may train, each dataset repeated to an equal share; None without any."""
    parts = [CachedReader(RegionReader(open_dataset(opts.real), 0.0, REAL_FRACTION))] if opts.real else []
    for path in opts.real_images:
        kept, _ = _held_out_split(open_dataset(path))
        parts.append(CachedReader(ResizedReader(kept, BUILTIN_DIAMETER)))
    if not parts:
        return None
    longest = max(len(p) for p in parts)
    return ConcatReader([_repeated(p, max(1, round(longest / len(p)))) for p in parts])


def _held_out_split(reader) -> tuple[SubsetReader, SubsetReader]:
    """(the images that may train, the held-out ones named HELD_OUT_PREFIX*) of a dataset."""
    held = [n.startswith(HELD_OUT_PREFIX) for n in reader.names]
    return (SubsetReader(reader, [i for i, h in enumerate(held) if not h]),
            SubsetReader(reader, [i for i, h in enumerate(held) if h]))


def _repeated(reader, copies: int) -> SubsetReader:
    return SubsetReader(reader, [i for _ in range(copies) for i in range(len(reader))])


def pretrain(opts: PretrainOptions) -> Path:
    """Train (or continue) the built-in model's run in ``opts.out``; returns its last checkpoint."""
    if not 0.0 <= opts.real_share < 1.0:
        raise UserError(f"--real-share must be in [0, 1), got {opts.real_share}")
    if opts.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {opts.model!r}")
    run = Path(opts.out) / "run"
    started = time.monotonic()
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    if opts.init and is_builtin(opts.init) and not (Path(opts.out) / INIT_CARD).is_file():
        # publishing replaces that model and its card: keep the card its lineage is read from
        atomic_write_text(Path(opts.out) / INIT_CARD, json.dumps(card(opts.init), indent=2) + "\n")
    he = opts.model == "he"
    result = train(TrainOptions(
        data=" + ".join(["synthetic slides" if he else "synthetic scenes", *([opts.real] if opts.real else []),
                         *opts.real_images]),
        reader=training_reader(opts), config=he_config() if he else builtin_config(**BUILTIN_SETTINGS),
        normalizer=he_normalizer() if he else None, init=_init_weights(opts),
        out=str(run), iters=opts.steps, max_minutes=opts.minutes,
        batch_size=opts.batch_size, lr=opts.lr, warmup_iters=100, crop=BUILTIN_CROP, scale_range=BUILTIN_SCALES,
        val_fraction=0.0,
        # float32 on every CPU: all of the published models' sessions ran so, and the recipe stays one computation
        amp=False,
        val_every=10**9, checkpoint_every=200, seed=opts.seed, device=opts.device, workers=opts.workers, progress=opts.progress,
        resume=(run / "last.pt").is_file()))
    _log_session(Path(opts.out), result.steps, time.monotonic() - started, opts)
    return result.last


def _init_weights(opts: PretrainOptions) -> str | None:
    """What ``--init`` starts from: the named weights, or for ``he`` a one-channel model widened to
    its input (written once to OUT/he_init.pt: a resumed run reads its weights from run/last.pt)."""
    if opts.model != "he" or not opts.init:
        return opts.init
    target = Path(opts.out) / HE_INIT
    if not target.is_file():
        ckpt = load_init(opts.init)
        save_checkpoint(target, widen_to_stains(ckpt) if ckpt.config.in_channels == 1 else ckpt)
    return str(target)


def _log_session(out: Path, steps: int, seconds: float, opts: PretrainOptions) -> None:
    """Append this session (steps reached, minutes, hardware) to OUT/sessions.jsonl for the card;
    a session that trained no step (e.g. the run was complete, only --publish) is not one."""
    history = sessions(out)
    if history and history[-1]["steps"] == steps:
        return
    record = {"steps": steps, "schedule": opts.steps, "minutes": round(seconds / 60, 1),
              "device": _hardware(opts.device),
              "date": time.strftime("%Y-%m-%d")}
    with open(out / "sessions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _hardware(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sessions(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "sessions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_builtin(out: str | Path, scores: dict[str, Any], opts: PretrainOptions, folder: Path = FOLDER) -> Path:
    """Publish OUT/run/last.pt as the built-in model ``opts.model`` with its card."""
    out = Path(out)
    history = sessions(out)
    he = opts.model == "he"
    cfg: Config = he_config() if he else builtin_config()
    earlier = _init_card(out)  # the built-in model this run continued from, as it was then
    info = {
        "summary": "fluorescence nuclei, one class (nucleus); Mask R-CNN, ResNet-18 trunk at half width, "
                   "FPN p2 at stride 2, 1 input channel",
        "trained_on": "synthetic fluorescence scenes (maskrcnn.data.synthetic_scenes, drawn fresh each step)"
                      + (f" and the left {REAL_FRACTION:.0%} of the real DSB2018 image in {opts.real}" if opts.real
                         else "")
                      + "".join(f" and the images of {path} but its held-out {HELD_OUT_PREFIX}* ones, resized to "
                                f"nuclei of {BUILTIN_DIAMETER:g} px" for path in opts.real_images)
                      + (f" ({opts.real_share:.0%} of samples real)" if opts.real or opts.real_images else "")
                      + (f"; continued from the built-in {opts.init} model trained on {earlier['trained_on']}"
                         if earlier else ""),
        "training": _training(history, opts, earlier["training"] if earlier else None),
        "input": "one channel (RGB is averaged); any bit depth (each image scaled by its own 1st-99.8th "
                 f"percentiles); trained on nuclei of about 7 to 60 px across (synthetic) and real nuclei "
                 f"resized to about {BUILTIN_DIAMETER:g} px",
        "diameter_px": BUILTIN_DIAMETER,
        "scale": "each image's nucleus diameter D is estimated (--diameter auto, the default) and the image "
                 "resized by 20/D unless D is within 1.25x of 20; --diameter D (pixels) or --scale F decide instead",
        **({} if he else {"prediction": _prediction()}),
        "scores": scores,
        **(_he_card(earlier, opts) if he else {}),
        "licence": "synthetic data: generated by this package's own code; DSB2018 image: BBBC038v1 "
                   "(Broad Bioimage Benchmark Collection), CC0 1.0"
                   + "".join(f"; {Path(path).name}: {_licence(path)}" for path in opts.real_images),
        "layout": {k: v for k, v in cfg.to_dict().items() if k in ("backbone", "trunk_width", "fpn_channels",
                                                                    "rpn_scales", "in_channels")},
    }
    return publish(out / "run" / "last.pt", opts.model, info, folder, settings={} if he else BUILTIN_SETTINGS)


def republish(opts: PretrainOptions, folder: Path = FOLDER) -> Path:
    """The published nuclei model again, its weights as they are, with the recipe's prediction
    settings (BUILTIN_SETTINGS) and its card's scores measured with them on ``opts``' held-out
    images: for a model published before the recipe chose them (its run need not exist)."""
    source = folder / "nuclei.pt"
    info = json.loads((folder / "nuclei.json").read_text())
    changed = ", ".join(f"{k} {v:g}" for k, v in BUILTIN_SETTINGS.items())
    info["training"]["recipe"] += f"; then published again with {changed} (maskrcnn.train.pretrain.republish)"
    info["prediction"] = _prediction()
    staged = Path(opts.out) / "republished.pt"
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    publish(source, "republished", {}, Path(opts.out), settings=BUILTIN_SETTINGS)
    info["scores"] = score_builtin_run(staged, opts)
    return publish(staged, "nuclei", info, folder)


def _prediction() -> str:
    """The card's line on BUILTIN_SETTINGS (the he model publishes without them)."""
    return PREDICTION.format(BUILTIN_SETTINGS["mask_test_min_contrast"])


def _he_card(earlier: dict[str, Any] | None, opts: PretrainOptions) -> dict[str, Any]:
    """What the ``he`` model's card says differently from the ``nuclei`` one's."""
    return {
        "summary": HE_SUMMARY,
        "trained_on": "synthetic brightfield slides (maskrcnn.data.synthetic_brightfield: H&E, IHC and plain "
                      "brightfield, drawn fresh each step)"
                      + (f"; continued from the built-in {opts.init} model (its first convolution widened to the "
                         f"stain densities, maskrcnn.train.brightfield) trained on {earlier['trained_on']}"
                         if earlier else ""),
        "input": HE_INPUT + "; trained on nuclei of about 8 to 45 px across (synthetic), crops resized 0.5-2x",
        "licence": "synthetic data: generated by this package's own code"
                   + ("; the init model's data: " + earlier["licence"] if earlier else ""),
    }


def _init_card(out: Path) -> dict[str, Any] | None:
    """The card of the built-in model the run in ``out`` started from (``--init NAME``), or None."""
    path = out / INIT_CARD
    return json.loads(path.read_text()) if path.is_file() else None


def _training(history: list[dict[str, Any]], opts: PretrainOptions, earlier: dict[str, Any] | None) -> dict:
    """The card's training record: this run's sessions, after those of the built-in model it
    continued (``earlier``, that model's record), so that the recipe regenerates it from nothing."""
    steps = history[-1]["steps"] if history else 0
    record = {"steps": steps, "batch": opts.batch_size, "crop": BUILTIN_CROP,
              "minutes": round(sum(h["minutes"] for h in history), 1),
              "hardware": sorted({h["device"] for h in history}), "sessions": len(history),
              "date": history[-1]["date"] if history else None, "recipe": _recipe(history, opts)}
    if earlier:
        record.update(steps=earlier["steps"] + steps, minutes=round(earlier["minutes"] + record["minutes"], 1),
                      hardware=sorted({*earlier["hardware"], *record["hardware"]}),
                      sessions=earlier["sessions"] + record["sessions"],
                      recipe=earlier["recipe"] + " (that model is what --init names); then " + record["recipe"])
    return record


def _licence(path: str) -> str:
    """What a dataset folder's LICENSE file says (how its annotations may be used): its first line,
    and "MIT" where it is the MIT text."""
    licence = Path(path) / "LICENSE"
    text = licence.read_text() if licence.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no LICENSE file beside it"
    kind = "MIT, " if "Permission is hereby granted, free of charge" in text else ""
    return f"{kind}{lines[0]} ({licence})"


def _recipe(history: list[dict[str, Any]], opts: PretrainOptions) -> str:
    """The commands that made the run: one per schedule length its sessions reached. A later, longer
    ``--steps`` continues the same run with the cosine stretched to it (the rate rises again)."""
    real = (f" --model {opts.model}" if opts.model != "nuclei" else "") + (f" --real {opts.real}" if opts.real else "") + "".join(f" --real-images {p}" for p in opts.real_images)
    real += f" --real-share {opts.real_share:g}" if opts.real_share != PretrainOptions.real_share else ""
    real += f" --init {opts.init} --lr {opts.lr:g}" if opts.init else ""
    lengths = list(dict.fromkeys(h.get("schedule", h["steps"]) for h in history))  # in order, once each
    commands = [f"maskrcnn pretrain --out OUT --steps {n}{real}" for n in lengths if n != opts.steps]
    commands.append(f"maskrcnn pretrain --out OUT --steps {opts.steps}{real} --publish")
    return "; then ".join(commands)


def score_builtin_run(checkpoint: str | Path, opts: PretrainOptions) -> dict[str, Any]:
    """Zero-shot scores of ``checkpoint``, with the default ``--diameter auto``, on what it never
    trained on: the right part of --real's images and the held-out (val_*) images of each
    --real-images dataset (empty without them): mask AP50, AP, the DSB2018 score and acc@0.5, as
    ``maskrcnn evaluate`` computes them."""
    from ..prediction.diameter import AutoScale
    from ..prediction.evaluate import evaluate_model
    from ..prediction.predict import Predictor

    held_out = {}
    if opts.model == "he":
        count, size = HELD_OUT_SLIDES
        held_out[f"{count} synthetic slides of {size} px, seed {opts.seed + 1} (never trained on)"] = \
            SlideReader(count, size, opts.seed + 1)
    if opts.real:
        name = f"right {1 - REAL_FRACTION:.0%} of {Path(opts.real).name} (never trained on)"
        held_out[name] = RegionReader(open_dataset(opts.real), REAL_FRACTION, 1.0)
    for path in opts.real_images:
        _, held = _held_out_split(open_dataset(path))
        if len(held):
            held_out[f"{HELD_OUT_PREFIX}* images of {Path(path).name} (never trained on)"] = held
    if not held_out:
        return {}
    predictor = Predictor.from_checkpoint(checkpoint, opts.device)
    scores = {}
    for name, reader in held_out.items():
        report = evaluate_model(predictor.model, predictor.normalizer, reader, device=predictor.device,
                                progress=False, precision=predictor.precision,
                                scale=AutoScale.for_model(BUILTIN_DIAMETER, predictor.normalizer))
        summary = report.summary()
        scores[name] = {"mask_ap50": round(summary["mask_ap50"], 3), "mask_ap": round(summary["mask_ap"], 3),
                        "dsb_score": round(report.dsb_score, 3), "accuracy_50": round(summary["accuracy_50"], 3),
                        "images": len(reader)}
    return scores
