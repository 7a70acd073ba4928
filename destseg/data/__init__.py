"""Datasets, image I/O and anomaly synthesis."""

from destseg.data.datasets import (
    DataSource, DatasetIndex, StepSampler, TestDataset, TestSample, TrainDataset, default_rotation, scan_dataset,
    scan_folder, scan_mvtec, scan_visa, validate,
)
from destseg.data.images import read_mask, read_rgb
from destseg.data.synthesis import AnomalySynthesizer, perlin_mask, perlin_noise

__all__ = [
    "AnomalySynthesizer", "DataSource", "DatasetIndex", "StepSampler", "TestDataset", "TestSample", "TrainDataset",
    "default_rotation", "perlin_mask", "perlin_noise", "read_mask", "read_rgb", "scan_dataset",
    "scan_folder", "scan_mvtec", "scan_visa", "validate",
]
