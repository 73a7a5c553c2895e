"""Instance outlines as polygons along pixel edges, for the ImageJ ROI and GeoJSON outputs.

Coordinates are (x, y) in pixels, x right and y down, with vertices at pixel corners: pixel
(row r, column c) is the square [c, c + 1] x [r, r + 1]. A ring is an (N, 2) int64 array of its
vertices, not repeating the first at the end, with collinear vertices removed.

:func:`label_outlines` traces every instance of a label image at once. Each instance gets one
exterior ring per 8-connected component, traced around the outside of the component: pixels that
touch only diagonally are joined through their shared corner (the ring touches itself there, as
ImageJ's wand traces), and holes are left out (the exterior covers them). So the pixels whose
centres lie inside an instance's rings are exactly its pixels when it has no holes, and its pixels
plus its holes otherwise. A ring runs clockwise on the screen (y down), which is a positive area by
the shoelace formula: counter-clockwise in x-y terms, as GeoJSON's right-hand rule asks.

The tracing is vectorised over boundary edges (pointer jumping orders them along their rings); only
the split into instances loops in Python.
"""

from __future__ import annotations

import numpy as np

# edge directions: 0 right, 1 down, 2 left, 3 up, as (dx, dy) steps
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int64)


def label_outlines(labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    """(H, W) integer label image (0 background) -> {id: its exterior rings}, largest area first.

    Each ring is an (N, 2) int64 array of x, y pixel-corner vertices (see the module doc); ids with
    no pixels are absent. Rings that lie inside another ring of the same id (an island in one of
    its holes) are left out: the enclosing ring covers them.
    """
    start, direction, owner = boundary_edges(labels)
    if len(start) == 0:
        return {}
    successor = next_edges(start, direction, owner, labels.shape)
    ring_id, order = ring_order(successor)
    ordered_start, ordered_dir, ordered_ring = start[order], direction[order], ring_id[order]
    starts = np.flatnonzero(np.r_[True, ordered_ring[1:] != ordered_ring[:-1]])
    corners = corner_flags(ordered_dir, starts)
    area = ring_areas(ordered_start, ordered_dir, starts)
    outlines: dict[int, list[tuple[int, np.ndarray]]] = {}
    for k, (a, b) in enumerate(zip(starts, np.r_[starts[1:], len(order)])):
        if area[k] <= 0:  # a hole's boundary runs the other way round
            continue
        ring = ordered_start[a:b][corners[a:b]]
        outlines.setdefault(int(owner[order[a]]), []).append((int(area[k]), ring))
    return {i: _outermost([ring for _, ring in sorted(rings, key=lambda r: -r[0])])
            for i, rings in sorted(outlines.items())}


def boundary_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The directed pixel edges between each labelled pixel and a neighbour with another label.

    Returns start (E, 2) int64 x, y corners, direction (E,) int64 (0 right, 1 down, 2 left, 3 up)
    and owner (E,) the id of the pixel on the edge's right (seen on the screen, y down): walking
    the edges keeps each instance on the right, so its boundary runs clockwise.
    """
    padded = np.pad(np.asarray(labels), 1)
    inner = padded[1:-1, 1:-1]
    # neighbour above, right, below, left -> edge top (right), right (down), bottom (left), left (up)
    neighbours = (padded[:-2, 1:-1], padded[1:-1, 2:], padded[2:, 1:-1], padded[1:-1, :-2])
    corner = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.int64)  # each edge's start, from the pixel's corner
    starts, directions, owners = [], [], []
    for d, neighbour in enumerate(neighbours):
        rows, cols = np.nonzero((inner != 0) & (inner != neighbour))
        starts.append(np.stack([cols, rows], axis=1).astype(np.int64) + corner[d])
        directions.append(np.full(len(rows), d, np.int64))
        owners.append(inner[rows, cols].astype(np.int64))
    return np.concatenate(starts), np.concatenate(directions), np.concatenate(owners)


def next_edges(start: np.ndarray, direction: np.ndarray, owner: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(E,) index of the edge that follows each edge along its ring.

    At the end of an edge the same owner's next edge turns left, goes straight or turns right;
    only where two of its pixels touch diagonally are there two, and the left turn is taken: it
    goes on round the other pixel, joining them (8-connectivity).
    """
    width = shape[1] + 1
    end = start + _STEP[direction]
    key = (start[:, 1] * width + start[:, 0]) * 4 + direction  # one edge per corner and direction
    sort = np.argsort(key)
    sorted_key = key[sort]
    end_corner = end[:, 1] * width + end[:, 0]
    successor = np.full(len(start), -1, np.int64)
    for turn in (1, 0, -1):  # right, straight, left: each later one overrides
        wanted = end_corner * 4 + (direction + turn) % 4  # +1: clockwise on the screen
        at = np.minimum(np.searchsorted(sorted_key, wanted), len(key) - 1)
        found = (sorted_key[at] == wanted) & (owner[sort[at]] == owner)
        successor = np.where(found, sort[at], successor)
    assert (successor >= 0).all(), "every boundary edge continues"
    return successor


def ring_order(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rings of a successor permutation (E,), by pointer jumping.

    Returns ring (E,): each edge's ring, named by its smallest edge index, and order (E,): the
    edges ring by ring, each ring starting at its smallest edge and following ``successor``.
    """
    n = len(successor)
    ring, jump = np.arange(n), successor.copy()
    for _ in range(int(np.ceil(np.log2(max(n, 2))))):  # ring[i]: min over i and its next 2^k - 1
        ring = np.minimum(ring, ring[jump])
        jump = jump[jump]
    # cut each ring before its first edge, then order it by the distance to that cut
    tail = successor == ring  # the edge whose successor starts its ring
    jump = np.where(tail, np.arange(n), successor)
    distance = np.where(tail, 0, 1)
    while not tail[jump].all():  # list ranking: the tail points at itself and adds 0
        distance = distance + distance[jump]
        jump = jump[jump]
    return ring, np.lexsort((-distance, ring))


def corner_flags(direction: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(E,) bool: whether each edge's start is a corner (the previous edge on its ring turns).

    direction: (E,) of the edges ring by ring; starts: (R,) the index of each ring's first edge.
    """
    previous = np.arange(len(direction)) - 1
    previous[starts] = np.r_[starts[1:], len(direction)] - 1  # a ring's first edge follows its last
    return direction != direction[previous]


def ring_areas(start: np.ndarray, direction: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(R,) twice each ring's signed area (shoelace): positive round an instance, negative round a hole.

    start (E, 2), direction (E,): the edges ring by ring; starts: (R,) each ring's first edge.
    """
    end = start + _STEP[direction]
    cross = start[:, 0] * end[:, 1] - end[:, 0] * start[:, 1]
    return np.add.reduceat(cross, starts)


def _outermost(rings: list[np.ndarray]) -> list[np.ndarray]:
    """The rings (largest first) that lie inside no other: an island in a hole is covered already."""
    kept: list[np.ndarray] = []
    for ring in rings:
        # a ring starts at the top-left corner of its first pixel (the first top edge in row order)
        centre = ring[0] + 0.5
        if not any(inside(centre, other) for other in kept):
            kept.append(ring)
    return kept


def inside(point: np.ndarray, ring: np.ndarray) -> bool:
    """Whether the (2,) x, y point lies inside the ring (N, 2) (even-odd rule; not on its edges)."""
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    spans = (y0 > point[1]) != (y1 > point[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_x = x0 + (point[1] - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(spans & (cross_x > point[0])) % 2)


def closed(ring: np.ndarray) -> np.ndarray:
    """(N, 2) ring -> (N + 1, 2) with the first vertex repeated at the end (GeoJSON's form)."""
    return np.concatenate([ring, ring[:1]])
