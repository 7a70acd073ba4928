"""Datasets and images: layouts and the test dataset (``datasets``), image I/O (``images``); training data
(``training``) and anomaly synthesis (``synthesis``, ``device_synthesis``) are imported where training needs them."""

from destseg.data.datasets import (
    DataSource, DatasetIndex, TestDataset, TestFolders, TestSample, default_rotation, scan_dataset, scan_folder,
    scan_mvtec, scan_test_folders, scan_visa, validate,
)
from destseg.data.images import read_mask, read_rgb

__all__ = [
    "DataSource", "DatasetIndex", "TestDataset", "TestFolders", "TestSample", "default_rotation", "read_mask", "read_rgb",
    "scan_dataset", "scan_folder", "scan_mvtec", "scan_test_folders", "scan_visa", "validate",
]
