"""Data layer: unified task format, readers, samplers, augmentation, synthetic tiles."""

from .readers import READERS, TaskDataset, detect_layout, open_dataset, register_reader
from .task import IGNORE, Sample, load_unified_sample, save_unified

__all__ = ["IGNORE", "READERS", "Sample", "TaskDataset", "detect_layout", "load_unified_sample", "open_dataset",
           "register_reader", "save_unified"]
