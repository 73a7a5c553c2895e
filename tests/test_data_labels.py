"""Label images whose ids mark separate regions: found (split_ids), warned of naming the file, and
still read as one instance per id."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from maskrcnn.data.labels import LabelsReader, split_ids
from maskrcnn.data.writers import write_image, write_label_image


def disc(labels: np.ndarray, y: int, x: int, radius: int, value: int) -> None:
    yy, xx = np.ogrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = value


def scene() -> np.ndarray:
    """id 4: two nuclei far apart; id 9: two nuclei touching only diagonally (8-connected: one
    region); id 5: a nucleus with a stray speck; ids 6 and 7: two nuclei touching each other;
    id 8: a nucleus and a part of a third of its size."""
    labels = np.zeros((80, 120), np.uint16)
    disc(labels, 15, 15, 8, 4)
    disc(labels, 60, 100, 7, 4)
    labels[30:36, 40:46], labels[36:42, 46:52] = 9, 9
    disc(labels, 15, 60, 8, 5)
    labels[2, 75] = 5
    disc(labels, 60, 20, 8, 6)
    disc(labels, 60, 35, 8, 7)
    disc(labels, 40, 90, 8, 8)
    disc(labels, 20, 100, 5, 8)
    return labels


def test_split_ids_are_the_ids_with_separate_regions_of_similar_size():
    labels = scene()
    assert split_ids(labels) == [4, 8]
    assert split_ids(labels, share=0.5) == [4]  # id 8's second part is a third of its first
    assert split_ids(np.zeros((5, 5), np.uint16)) == []


def test_a_label_image_with_split_ids_warns_naming_the_file_and_keeps_one_instance_per_id(tmp_path):
    labels = scene()
    write_image(tmp_path / "images" / "a.png", (labels > 0).astype(np.uint8) * 200)
    write_label_image(tmp_path / "masks" / "a.png", labels)
    with pytest.warns(UserWarning) as caught:
        sample = LabelsReader(tmp_path)[0]
    message = str(caught[0].message)
    assert str(tmp_path / "masks" / "a.png") in message and "2 label id(s)" in message and "id 4, 8" in message
    assert len(sample.masks) == 6  # ids 4-9: as drawn, one instance each
    np.testing.assert_array_equal(sample.masks[0], labels == 4)

    clean = np.where(np.isin(labels, [4, 8]), 0, labels)
    write_label_image(tmp_path / "masks" / "a.png", clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(LabelsReader(tmp_path)[0].masks) == 4
