"""The README's picture of the plugin: ``python -m maskrcnn.napari._screenshot docs/napari_widget.png``.

Opens napari with the synthetic nuclei sample, segments it with the built-in nuclei model from the
dock widget and saves the window. Needs a display with OpenGL; headless, run it under Xvfb
(``xvfb-run -s '-screen 0 1600x1000x24' python -m maskrcnn.napari._screenshot OUT.png``), Qt's
offscreen platform has no OpenGL for the canvas.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(out: str, width: int = 1280, height: int = 760) -> None:
    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari + maskrcnn")
    viewer.window.resize(width, height)
    viewer.open_sample("maskrcnn", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("maskrcnn", "Mask R-CNN")
    viewer.layers.selection.active = viewer.layers["synthetic nuclei"]
    widget.segment()
    deadline = time.monotonic() + 300
    while widget.busy and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.last_error is not None:
        raise SystemExit(f"segmentation failed: {widget.last_error}")
    widget.output_layer.contour = 1
    widget.table.selectRow(0)
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    # a palette of 256 colours keeps the PNG small (the picture is mostly flat UI and grey levels)
    Image.fromarray(np.ascontiguousarray(shot[..., :3])).quantize(256, method=Image.Quantize.MEDIANCUT).save(
        out, optimize=True)
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "napari_widget.png")
