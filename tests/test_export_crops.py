"""The model's multi-level RoIAlign alone, traced and exported to ONNX: a trace made with one box
per FPN level must work for any number of boxes (tests/test_export.py exports whole models)."""

from __future__ import annotations

import pytest
import torch

from maskrcnn import MaskRCNN

from test_export import tiny_untrained_model

# tracing and the TorchScript-based ONNX exporter, called directly here
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


class _Crop(torch.nn.Module):
    """The model's multi-level RoIAlign alone (one image), to trace and export."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, p2, p3, p4, p5, boxes):
        image = boxes.new_zeros(boxes.shape[0], dtype=torch.int64)
        return self.model.rcnn.crop.crop([p2, p3, p4, p5], boxes, image)


def test_crops_traced_with_one_box_per_level_work_for_any_box_count(tmp_path):
    """A trace records Python-side shape decisions; one box per level at trace time must not
    turn into a fixed shape (``out[index] = crops`` did: setitem squeezes a leading 1)."""
    model = tiny_untrained_model()
    features = [torch.rand(1, 32, 64 // k, 64 // k) for k in (1, 2, 4, 8)]   # a 256 x 256 image
    one_per_level = torch.tensor([[0, 0, 8, 8], [0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 64, 64.]])
    boxes = torch.tensor([[10, 10, 18, 18], [30, 5, 37, 14], [3, 40, 70, 100], [100, 100, 116, 118],
                          [0, 0, 9, 8], [50, 60, 250, 200.]])
    want = model.rcnn.crop(features, [boxes])
    crop = _Crop(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(crop, (*features, one_per_level))
        assert torch.equal(traced(*features, boxes), want)
        assert traced(*features, boxes[:0]).shape == (0, 32, 7, 7)
        names = ["p2", "p3", "p4", "p5", "boxes"]
        torch.onnx.export(crop, (*features, one_per_level), tmp_path / "crop.onnx", dynamo=False, opset_version=17,
                          input_names=names, output_names=["crops"], dynamic_axes={"boxes": {0: "n"}, "crops": {0: "n"}})
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "crop.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(names, [t.numpy() for t in (*features, boxes)])))[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
