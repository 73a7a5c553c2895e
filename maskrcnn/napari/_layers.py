"""Reading napari layers: which kind a layer is, and the 2-D plane of it the viewer shows."""

from __future__ import annotations

import numpy as np


def is_kind(layer, kind: str) -> bool:
    """Whether ``layer`` is a napari Image or Labels layer (``kind``). isinstance, not type(): napari
    hands plugins proxies of its objects."""
    import napari.layers

    return isinstance(layer, getattr(napari.layers, kind))


def shown_plane(layer, viewer) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 2-D plane of an image or labels layer that the viewer shows (a copy) and its index in the
    layer's leading axes: () for a 2-D (or RGB) layer, e.g. (z,) for a z-stack."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    lead = data.ndim - (1 if getattr(layer, "rgb", False) else 0) - 2
    if lead <= 0:
        return np.array(data), ()
    coords = layer.world_to_data(viewer.dims.point)
    index = tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(coords[:lead], data.shape[:lead]))
    return np.array(data[index]), index
