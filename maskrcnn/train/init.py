"""``train --init``: start a new run from a trained model's weights (a built-in name or a checkpoint).

Unlike ``--resume``, which continues a run (its step, optimizer and schedule), ``--init`` takes only
the weights, with the model's layout and normalisation, and starts a fresh schedule. When the data
has a different number of classes, the class-specific layers (box classifier and regressor, mask
predictor) keep their fresh initialisation and a one-line notice says so.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from ..builtin import resolve_weights
from ..config import Config
from ..data.normalize import Normalizer
from ..errors import UserError
from ..modeling.checkpoint import Checkpoint, load_checkpoint
from .setup import TrainOptions

# weights whose shape depends on the number of classes
CLASS_SPECIFIC = ("rcnn.head.logit.", "rcnn.head.delta.", "mask.head.logit.")


def load_init(spec: str) -> Checkpoint:
    """The checkpoint ``--init`` names; a missing or unreadable file is a one-line UserError."""
    path = resolve_weights(spec)
    if not path.is_file():
        raise UserError(f"{spec}: --init needs a built-in model name or a checkpoint file; no such file")
    return load_checkpoint(path)


def with_init_layout(opts: TrainOptions, ckpt: Checkpoint) -> TrainOptions:
    """Options whose model layout and normalisation are the checkpoint's (unless ``opts.config``
    is given: then its layout must match, which :func:`initialise` checks)."""
    config = opts.config or ckpt.config.replace(backbone_weights=None)
    normalizer = opts.normalizer or Normalizer.from_dict(ckpt.normalizer)
    return replace(opts, config=config, normalizer=normalizer)


def initialise(model: torch.nn.Module, ckpt: Checkpoint, cfg: Config, source: str) -> list[str]:
    """Copy ``ckpt``'s weights into ``model``; returns the class-specific names left fresh."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.model_state.items()}
    fresh = []
    if ckpt.config.num_classes != cfg.num_classes:
        fresh = sorted(k for k in state if k.startswith(CLASS_SPECIFIC))
        state = {k: v for k, v in state.items() if k not in fresh}
        layers = ", ".join(sorted({k.rsplit(".", 1)[0] for k in fresh}))
        warnings.warn(f"--init {source}: {ckpt.config.num_classes - 1} class(es) there, {cfg.num_classes - 1} "
                      f"here; the class-specific layers start fresh ({layers})")
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"{source}: its weights do not fit this model's layout (e.g. {wrong[0]}: "
                        f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); drop --config or "
                        "--backbone to train in its own layout")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise UserError(f"{source}: its weights do not fit this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return fresh
