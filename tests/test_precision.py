"""--precision: which autocast dtype a device gets, float32 where the boxes are decided, and the
exported models' float32-only rule."""

from __future__ import annotations

import pytest
import torch

import maskrcnn.runtime.precision as precision
from maskrcnn.cli.commands import AMP_CHOICES
from maskrcnn.cli.main import build_parser
from maskrcnn.config import Config
from maskrcnn.errors import UserError
from maskrcnn.modeling.model import MaskRCNN

from conftest import OPEN, tiny_config


def test_auto_is_bfloat16_only_on_cpus_that_compute_it_natively(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: True)
    assert precision.autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: False)
    assert precision.autocast_dtype("auto", "cpu") is None  # emulated bfloat16 is slower than float32
    assert precision.autocast_dtype("fp32", "cpu") is None
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16  # asked for: given, even emulated
    assert precision.autocast_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16, fp16"):
        precision.autocast_dtype("half", "cpu")


def test_training_autocasts_by_default_only_on_cpus_that_compute_bfloat16_natively(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: True)
    assert precision.training_amp(None, "cpu") is True
    assert precision.training_amp(False, "cpu") is False  # train --amp off
    assert precision.training_amp(None, "cuda") is False  # float16 training is asked for, not assumed
    assert precision.training_amp(True, "cuda") is True
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: False)
    assert precision.training_amp(None, "cpu") is False  # emulated bfloat16 is slower than float32
    assert precision.training_amp(True, "cpu") is True


@pytest.mark.parametrize("flags, amp", [([], None), (["--amp"], True), (["--amp", "on"], True),
                                        (["--amp", "off"], False), (["--amp", "auto"], None)])
def test_train_amp_flag(flags, amp):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])
    assert AMP_CHOICES[args.amp] is amp


def test_rpn_head_boxes_scores_and_masks_stay_float32_under_bfloat16():
    torch.manual_seed(0)
    model = MaskRCNN(Config(**tiny_config(**OPEN, rcnn_test_max_detections=20))).eval()
    seen = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            seen[name] = (output[0] if isinstance(output, tuple) else output).dtype
        return hook

    model.backbone.fpn.register_forward_hook(lambda m, i, o: seen.update(fpn=next(iter(o.values())).dtype))
    model.rpn.head.register_forward_hook(record("rpn"))
    model.rcnn.head.register_forward_hook(record("rcnn"))
    model.mask.head.register_forward_hook(record("mask"))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), precision.autocast("bf16", "cpu"):
        raw = model.detect(*model.prepare(image))
        result = model(image).results[0]
    assert seen == {"fpn": torch.bfloat16, "rpn": torch.float32, "rcnn": torch.bfloat16, "mask": torch.bfloat16}
    assert len(raw.detections) > 0
    assert raw.detections.boxes.dtype == raw.detections.scores.dtype == raw.mask_probs.dtype == torch.float32
    assert result.boxes.dtype == result.scores.dtype == torch.float32 and result.label_image.shape == (64, 64)


def test_exported_models_refuse_low_precision_by_name(tmp_path):
    from maskrcnn.prediction.predict import Predictor

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read: the precision is checked first")
    with pytest.raises(UserError, match="model.onnx: exported models run in float32"):
        Predictor.from_weights(onnx_file, precision="bf16")


def test_the_model_and_an_exported_model_are_both_detectors(tmp_path):
    """What predict, evaluate and tiling accept (structures.Detector): both kinds satisfy it."""
    from maskrcnn.export.deploy import ExportedModel
    from maskrcnn.structures import Detector

    cfg = Config(**tiny_config())
    assert isinstance(MaskRCNN(cfg), Detector)
    assert isinstance(ExportedModel(lambda image: None, cfg, tmp_path / "m.onnx", "ONNX"), Detector)
    assert not isinstance(object(), Detector)
