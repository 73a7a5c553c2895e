"""Image normalisation shared by training and prediction.

The :class:`Normalizer` is stored in checkpoints (``to_dict``/``from_dict``) so that prediction
repeats exactly the scaling and channel handling the model was trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from .stains import rgb_to_stains

METHODS = ("percentile", "minmax", "fixed")
STAINS = ("hed",)  # Normalizer.stain: colour deconvolution into haematoxylin, eosin and DAB densities
STAIN_FLOOR = 0.25  # a stain's high density is at least this fraction of the strongest stain's
WHITE_PERCENTILE = 99.5  # a brightfield image's white (no stain) per channel: the brightest pixels
MAX_STAT_SAMPLES = 1 << 20  # percentiles of large images come from an evenly strided subset


@dataclass
class Normalizer:
    """Turn a raw (H, W) or (H, W, C) image into a (channels, H, W) float32 tensor in [0, 1].

    Intensity: ``(x - low) / (high - low)`` clipped to [0, 1], with one (low, high) pair for all
    channels so colours keep their balance:

    - ``"percentile"`` (default): the image's own ``low_percentile``/``high_percentile``, robust
      to the varying exposure and bit depth (8/12/16-bit) of microscopy images;
    - ``"minmax"``: the image's minimum and maximum;
    - ``"fixed"``: ``fixed_range``, or the dtype's full range when None (0..255 for uint8,
      0..65535 for uint16, 0..1 for float and bool).

    NaN and +-inf pixels (float TIFFs with masked regions) are set to 0 before any statistics.
    A constant image (high == low) becomes all zeros rather than dividing by zero.

    Channels (the model's ``in_channels``): alpha is dropped from RGBA and gray+alpha (LA);
    gray becomes 3 channels by replication; RGB becomes 1 channel by the channel mean. A
    2-channel image is dropped to its first channel as gray+alpha would be, because Pillow's
    "LA" mode is where 2-channel images come from in practice.

    ``stain="hed"`` (brightfield models, 3 channels): the image is first turned into the optical
    densities of haematoxylin, eosin and DAB (maskrcnn.data.stains), the white of each colour
    channel being its own 99.5th percentile (any bit depth; gray is replicated), and the intensity
    scaling applies to those densities, per stain (``"percentile"``): each stain's own percentiles,
    the high one at least STAIN_FLOOR of the strongest stain's (a stain the slide lacks stays dark
    instead of its noise being stretched), so that nuclei are bright in the first channel whatever
    the stain strength, as in fluorescence. A large image's tiles take the white of their own pixels.
    """

    method: str = "percentile"
    low_percentile: float = 1.0
    high_percentile: float = 99.8
    channels: int = 3
    fixed_range: tuple[float, float] | None = None
    stain: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"normalisation method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ConfigError("normalisation percentiles need 0 <= low < high <= 100, got "
                              f"{self.low_percentile} and {self.high_percentile}")
        if self.channels not in (1, 3):
            raise ConfigError(f"normalisation channels must be 1 or 3, got {self.channels}")
        if self.stain is not None and (self.stain not in STAINS or self.channels != 3):
            raise ConfigError(f"normalisation stain must be one of {STAINS} with 3 channels, got {self.stain!r} "
                              f"with {self.channels}")
        if self.stain is not None and self.method == "fixed" and self.fixed_range is None:
            raise ConfigError("normalisation with a stain and method fixed needs fixed_range (stain densities)")
        if self.fixed_range is not None:
            low, high = (float(v) for v in self.fixed_range)
            if not high > low:
                raise ConfigError(f"fixed_range needs low < high, got {self.fixed_range}")
            self.fixed_range = (low, high)

    def __call__(self, image: np.ndarray, intensity_range: tuple[float, float] | None = None) -> torch.Tensor:
        """(H, W) or (H, W, C) array of any numeric dtype -> (channels, H, W) float32 tensor.

        ``intensity_range``: the (low, high) to scale with instead of the image's own, e.g. those
        of a whole slide (:meth:`intensity_range` of a sample of it) for each of its tiles, so that
        tiles are scaled alike.
        """
        image = np.asarray(image)
        values = self._signal(image)
        low, high = intensity_range if intensity_range is not None else self._range(values, image.dtype)
        span = np.maximum(np.asarray(high, np.float32) - np.asarray(low, np.float32), np.finfo(np.float32).tiny)
        scaled = np.clip((values - np.asarray(low, np.float32)) / span, 0.0, 1.0)
        return torch.from_numpy(_to_channels(scaled, self.channels))

    def intensity_range(self, image: np.ndarray) -> tuple[float, float]:
        """The (low, high) this normaliser maps to 0 and 1 for ``image`` (H, W) or (H, W, C): for a
        large image, pass a reduced-resolution sample of it (``RegionSource.sample``)."""
        image = np.asarray(image)
        return self._range(self._signal(image), image.dtype)

    def _signal(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) -> (H, W, 1|3) float32 values the intensity scaling applies to."""
        values = _signal_values(image)
        return values if self.stain is None else _stain_densities(values)

    def _range(self, values: np.ndarray, dtype: np.dtype) -> tuple[float, float]:
        """The (low, high) intensities mapped to 0 and 1."""
        if self.method == "fixed":
            return self.fixed_range if self.fixed_range is not None else _dtype_range(dtype)
        if self.stain is not None and self.method == "percentile":
            return _stain_range(values.reshape(-1, 3), self.low_percentile, self.high_percentile)
        sample = values.reshape(-1)[:: max(1, values.size // MAX_STAT_SAMPLES)]
        if self.method == "minmax":
            return float(sample.min()), float(sample.max())
        low, high = np.percentile(sample, [self.low_percentile, self.high_percentile])
        return float(low), float(high)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, for checkpoints."""
        out = dataclasses.asdict(self)
        out["fixed_range"] = list(self.fixed_range) if self.fixed_range is not None else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalizer:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown normaliser settings: {', '.join(unknown)}")
        fixed = values.get("fixed_range")
        return cls(**{**values, "fixed_range": tuple(fixed) if fixed is not None else None})


def _signal_channels(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 1) or (H, W, 3): drop alpha (RGBA, LA) and extra channels."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(f"expected an (H, W) or (H, W, C<=4) image, got shape {image.shape}")
    return image[:, :, :1] if image.shape[-1] in (1, 2) else image[:, :, :3]


def _signal_values(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 1|3) float32 signal channels, NaN and +-inf set to 0."""
    return np.nan_to_num(_signal_channels(image).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _stain_range(values: np.ndarray, low_percentile: float, high_percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) stain densities -> per-stain (low, high), each (3,), see Normalizer (stain)."""
    sample = values[:: max(1, len(values) // MAX_STAT_SAMPLES)]
    low, high = np.percentile(sample, [low_percentile, high_percentile], axis=0)
    return low, np.maximum(high, STAIN_FLOOR * high.max())


def _stain_densities(values: np.ndarray) -> np.ndarray:
    """(H, W, 1|3) brightfield intensities -> (H, W, 3) stain densities, each colour channel's white
    its WHITE_PERCENTILE (estimated on a strided sample, as the intensity range is)."""
    rgb = np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values
    sample = rgb.reshape(-1, 3)[:: max(1, rgb.size // 3 // MAX_STAT_SAMPLES)]
    white = np.maximum(np.percentile(sample, WHITE_PERCENTILE, axis=0), np.finfo(np.float32).tiny)
    return rgb_to_stains(np.minimum(rgb / white.astype(np.float32), 1.0))


def _to_channels(scaled: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 1|3) in [0, 1] -> contiguous (channels, H, W) float32."""
    if scaled.shape[-1] != channels:
        scaled = scaled.mean(axis=-1, keepdims=True) if channels == 1 else np.repeat(scaled, 3, axis=-1)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1), dtype=np.float32)


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """Full value range of an integer dtype; (0, 1) for float and bool."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0
