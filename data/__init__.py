"""Datasets for every common layout, one preprocessing transform, demo data, clear errors.

Public API (see the modules for details):
  create_dataset(data_dir, *, dataset, preprocess, subset, ...) -> Dataset of item dicts
  dataset_from_args(args, subset, preprocess=None)    the one call scripts make
  preprocess_from_args(args, channel_names=(), dataset="") -> Preprocess
  data_defaults(), DATA_HELP                          flags and their help strings
  Preprocess                                          the transform, recorded in checkpoints
  collate, create_loader, GroupedSampler, iterate_forever
  restore_geometry(array, meta, order)                network grid -> the input's own grid
  DataError, DataConfigError
"""

from data.datasets import SegmentationDataset, collate, create_dataset
from data.errors import DataConfigError, DataError
from data.flags import DATA_HELP, data_defaults, dataset_from_args, preprocess_from_args
from data.layouts import DATASET_CHOICES, LAYOUTS, detect_layout
from data.loader import GroupedSampler, create_loader, iterate_forever
from data.preprocess import Preprocess, restore_geometry

__all__ = [
    "DATASET_CHOICES",
    "DATA_HELP",
    "DataConfigError",
    "DataError",
    "GroupedSampler",
    "LAYOUTS",
    "Preprocess",
    "SegmentationDataset",
    "collate",
    "create_dataset",
    "create_loader",
    "data_defaults",
    "dataset_from_args",
    "detect_layout",
    "iterate_forever",
    "preprocess_from_args",
    "restore_geometry",
]
