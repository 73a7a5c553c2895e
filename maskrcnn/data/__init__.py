"""Data layer: file I/O, normalisation, dataset readers, synthetic data, augmentation, loading."""

from .augment import Augment
from .datasets import CocoReader, DsbReader, InstanceReader, LabelsReader, Sample, open_dataset
from .io import read_binary_mask, read_image, read_label_image
from .normalize import Normalizer
from .synthetic import synth_nuclei, write_synthetic_dataset
from .torch_dataset import InstanceDataset, collate, split_train_val
from .writers import write_image, write_label_image

__all__ = ["Augment", "CocoReader", "DsbReader", "InstanceReader", "LabelsReader", "Sample",
           "open_dataset", "read_binary_mask", "read_image", "read_label_image", "write_image",
           "write_label_image", "InstanceDataset", "collate", "split_train_val", "Normalizer",
           "synth_nuclei", "write_synthetic_dataset"]
