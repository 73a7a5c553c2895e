"""The built-in ``he`` model (brightfield nuclei: H&E, IHC, plain brightfield): its layout, its input
and how its training starts from the fluorescence ``nuclei`` model.

Its input is the slide's stain densities (``Normalizer(stain="hed")``: haematoxylin, eosin, DAB),
in which nuclei are bright in the haematoxylin channel, as they are in a fluorescence image. So the
``nuclei`` model is a good start: :func:`widen_to_stains` gives its first convolution three input
channels, the haematoxylin one with the fluorescence weights and the others at zero, so that the
widened model begins as the ``nuclei`` model run on the haematoxylin channel; training on the
synthetic slides (maskrcnn.data.synthetic_brightfield) then teaches it the other stains (red
cells, DAB membranes, stroma) and brightfield's look.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import Config
from ..data.normalize import Normalizer
from ..errors import UserError
from ..modeling.checkpoint import Checkpoint
from ..presets import builtin_config

STEM = "backbone.stem.0.weight"  # the first convolution, (out, in_channels, k, k)
HE_SUMMARY = ("brightfield nuclei (H&E, IHC with haematoxylin counterstain, plain brightfield), one class "
              "(nucleus); Mask R-CNN, ResNet-18 trunk at half width, FPN p2 at stride 2, RGB input as stain densities")
HE_INPUT = ("RGB or gray brightfield, any bit depth: turned into haematoxylin, eosin and DAB densities (colour "
            "deconvolution, each channel's white its 99.5th percentile), each scaled by its own 1st-99.8th percentiles")


def he_config() -> Config:
    """The ``nuclei`` layout with three input channels (the stain densities)."""
    return builtin_config(in_channels=3, pixel_mean=[0.25] * 3, pixel_std=[0.25] * 3)


def he_normalizer() -> Normalizer:
    return Normalizer(channels=3, stain="hed")


def widen_to_stains(ckpt: Checkpoint) -> Checkpoint:
    """A one-channel checkpoint as a ``he`` one: the stem's weights on the haematoxylin channel, zero
    on eosin and DAB (see the module), the ``he`` layout and normaliser."""
    if ckpt.config.in_channels != 1:
        raise UserError(f"the he model starts from a one-channel (fluorescence) model; this one has "
                        f"{ckpt.config.in_channels} input channels")
    state = dict(ckpt.model_state)
    stem = state[STEM].float()
    state[STEM] = torch.cat([stem, torch.zeros_like(stem), torch.zeros_like(stem)], dim=1).to(state[STEM].dtype)
    config = ckpt.config.replace(in_channels=3, pixel_mean=[ckpt.config.pixel_mean[0]] * 3,
                                 pixel_std=[ckpt.config.pixel_std[0]] * 3)
    return replace(ckpt, config=config, model_state=state, normalizer=he_normalizer().to_dict(), step=0, metrics={})
