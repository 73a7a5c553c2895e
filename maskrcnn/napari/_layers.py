"""Reading napari layers: which kind a layer is, and the 2-D plane of it the viewer shows."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


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


def shown_stack(layer) -> np.ndarray:
    """The whole (Z, H, W) or (Z, H, W, C) stack of an image layer with one leading axis (a copy)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    lead = data.ndim - (1 if getattr(layer, "rgb", False) else 0) - 2
    if lead != 1:
        raise UserError(f"{layer.name}: 3-D segmentation needs a layer with one z axis before y and x, "
                        f"this one has shape {tuple(data.shape)}")
    return np.array(data)


def show_instance(viewer, layer, row: dict) -> None:
    """Centre the view on an instance (a row of the dock's table) of a labels layer; for a 3-D
    instance, show the plane through its centroid."""
    point = instance_point(layer, row)
    camera = getattr(viewer, "scene", viewer).camera  # napari 0.9 moved it to viewer.scene; 0.5-0.8 lack it
    camera.center = point[-2:]
    if "centroid_z" in row:
        viewer.dims.set_point(0, point[0])


def instance_point(layer, row: dict) -> tuple[float, ...]:
    """World coordinates of an instance's centroid (a row of the dock's table) in its labels layer:
    the plane it was segmented in, or its own z for a 3-D instance."""
    plane = tuple(layer.metadata.get("maskrcnn", {}).get("plane", ()))
    if "centroid_z" in row:
        plane = (row["centroid_z"],)
    return tuple(layer.data_to_world([*plane, row["centroid_y"], row["centroid_x"]]))


def add_result(viewer, layer, index: tuple[int, ...], labels: np.ndarray, name: str, features, metadata: dict):
    """Add the labels segmented from ``layer`` (its plane ``index``, or all of it) as a Labels layer
    placed over it; ``metadata`` goes under the "maskrcnn" key. Returns the new layer."""
    if index:  # one plane of a stack: a labels layer as large as the stack, that plane filled
        shape = layer.data[0].shape if getattr(layer, "multiscale", False) else layer.data.shape
        full = np.zeros(shape[: len(shape) - (1 if layer.rgb else 0)], labels.dtype)
        full[index] = labels
        labels = full
    return viewer.add_labels(labels, name=name, scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                             shear=layer.shear, affine=layer.affine, features=features,
                             metadata={"maskrcnn": metadata})
