"""``predict`` with no ``--weights``: the built-in model each image needs, chosen from the image itself.

Fluorescence images are mostly dark background with bright nuclei; brightfield slides (H&E, IHC,
plain brightfield) are mostly light (white or stained tissue) with dark nuclei. So the median
pixel's position between the image's 1st and 99th percentiles of brightness tells them apart:
above ``BRIGHTFIELD_LEVEL`` the ``he`` model, else ``nuclei``. Measured (docs/benchmarks.md): 0.00-0.15
on the 34 real fluorescence images of ../shared/data and at most 0.25 on 60 synthetic scenes;
0.36-0.97 on the six real H&E/IHC images found in registry packages and at least 0.45 on 60
synthetic slides.

``open_predictor`` builds what ``predict`` runs from its options (weights or this choice, resize,
floor, TTA), for the CLI and the napari widget alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..runtime.memory import default_max_memory
from .predict import Predictor

BRIGHTFIELD_LEVEL = 0.3  # the median's position in the 1st-99th percentile range above which an image is brightfield
FLUORESCENCE, BRIGHTFIELD = "nuclei", "he"  # the built-in model for each kind of image
MAX_SAMPLES = 1 << 18  # pixels the statistics look at (evenly strided)


def background_level(image: np.ndarray) -> float:
    """(H, W) or (H, W, C) image -> where its median brightness lies between its 1st (0) and 99th (1)
    percentiles (the mean of the colour channels; alpha ignored)."""
    values = np.asarray(image)
    if values.ndim == 3:
        values = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
        values = values.astype(np.float32).mean(axis=-1)
    sample = np.nan_to_num(values.reshape(-1)[:: max(1, values.size // MAX_SAMPLES)].astype(np.float32))
    low, median, high = np.percentile(sample, [1, 50, 99])
    return float((median - low) / (high - low)) if high > low else 0.0


def builtin_for(image: np.ndarray) -> str:
    """The built-in model for a raw image: ``he`` for brightfield, ``nuclei`` for fluorescence."""
    return BRIGHTFIELD if background_level(image) > BRIGHTFIELD_LEVEL else FLUORESCENCE


@dataclass
class ModelChoice:
    """The built-in models, each loaded when an image first needs it, as one predictor: ``for_image``
    gives the model's name and its Predictor (with this choice's tta and max_memory)."""

    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    max_memory: int = field(default_factory=default_max_memory)
    engine: str = "auto"  # maskrcnn.export.engines
    scale: float | None = None  # a fixed resize for every image (--scale, --diameter); None: each model's AutoScale
    min_contrast: float | None = None  # --min-contrast for every model; None: each model's own
    loaded: dict[str, Predictor] = field(default_factory=dict)

    def for_image(self, image: np.ndarray) -> tuple[str, Predictor]:
        name = builtin_for(image)
        return name, self.predictor(name)

    def predictor(self, name: str) -> Predictor:
        if name not in self.loaded:
            self.loaded[name] = Predictor.from_weights(name, self.device, self.precision, self.engine)
            if self.min_contrast is not None:
                self.loaded[name].min_contrast(self.min_contrast)
        predictor = self.loaded[name]
        predictor.tta, predictor.max_memory = self.tta, self.max_memory
        if self.scale is not None:
            predictor.scale = self.scale
        return predictor

    @property
    def class_names(self) -> list[str]:
        return self.predictor(FLUORESCENCE).class_names  # both models have the one class "nucleus"

    def plan(self, *args, **kwargs):
        """Whole, tiled or streamed, before the image is read: the two models share their layout
        but for the input channels, so either plans alike."""
        return self.predictor(FLUORESCENCE).plan(*args, **kwargs)

    def __call__(self, image: np.ndarray, *args, **kwargs):
        """A raw image -> its instances, by the model it needs (as Predictor.__call__)."""
        return self.for_image(image)[1](image, *args, **kwargs)


def open_predictor(weights: str | None, device: str = "auto", precision: str = "auto", engine: str = "auto", *,
                   scale: float | None = None, diameter: float | None = None, min_contrast: float | None = None,
                   tta: bool = False, max_memory: int | None = None,
                   hint: str = "give a scale instead") -> Predictor | ModelChoice:
    """What ``predict`` runs (its CLI and the napari widget): ``weights`` (a built-in name, a
    checkpoint or an exported file), or None for the built-in model each image needs. Images are
    resized by ``scale``, else so that nuclei of ``diameter`` pixels reach the model's trained
    diameter, else as the model's own (AutoScale for the built-in models, else not at all);
    ``min_contrast`` None keeps the model's own floor; ``max_memory`` None its default. A diameter
    for a model that does not state its trained one is a UserError ending with ``hint``, raised
    before the model loads."""
    from ..builtin import trained_diameter

    if diameter and not scale:
        trained = trained_diameter(FLUORESCENCE if weights is None else weights)  # both built-in models state theirs
        if trained is None:
            raise UserError(f"{weights}: this model does not state the nucleus diameter it was trained on; {hint}")
        scale = trained / diameter
    if weights is None:
        chosen = ModelChoice(device, precision, tta, engine=engine, scale=scale, min_contrast=min_contrast)
    else:
        chosen = Predictor.from_weights(weights, device, precision, engine)
        if min_contrast is not None:
            chosen.min_contrast(min_contrast)
        chosen.tta = tta
        if scale:
            chosen.scale = scale
    chosen.max_memory = max_memory or chosen.max_memory  # unset: $MASKRCNN_MAX_MEMORY or 2 GB
    return chosen
