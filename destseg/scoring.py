"""Running a model over a dataset in batches: the one loop behind ``destseg test``, the good-image thresholds
and the validation of a model that picks its best weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from destseg.data.datasets import TestDataset
from destseg.data.images import hw
from destseg.device import autocast


@dataclass
class Batch:
    data: dict  # the loader's batch: image, mask, label, index
    outputs: dict[str, torch.Tensor]  # the model's outputs, float32 on the CPU
    seconds: float  # the model's share: forward pass and copying the outputs back


@torch.no_grad()
def batches(model, dataset, device: torch.device, dtype, batch_size: int, workers: int = 0,
            progress: bool = False, desc: str = "score") -> Iterator[Batch]:
    """Each batch of ``dataset`` through ``model`` in eval mode (each module's own mode is put back after).
    ``workers``: DataLoader processes that read, decode and resize."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    model.eval()
    try:
        for data in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            x = data["image"].to(device, non_blocking=True)
            if modes:  # a torch model: its CPU and GPU kernels want channels_last (another engine, its own layout)
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                out = model(x)
            out = {k: v.float().cpu() for k, v in out.items()}
            yield Batch(data, out, time.perf_counter() - t0)
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class TestOutputs:
    maps: np.ndarray  # (N, H, W) float32: the anomaly map
    scores: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,)
    seconds: float  # the model's share of the time
    extra: dict[str, tuple[np.ndarray, np.ndarray]]  # metric prefix -> (maps, scores) of secondary maps


def run_test_split(model, dataset: TestDataset, device: torch.device, dtype, map_outputs: dict | None = None,
                   batch_size: int = 16, progress: bool = True, workers: int = 0) -> TestOutputs:
    """Maps, scores, masks and labels of a test split; ``map_outputs`` (metric prefix -> (map, score)
    output names, the model's ``map_outputs``) picks the secondary maps to keep where the model returns them."""
    n, (h, w) = len(dataset), hw(dataset.size)
    maps, masks = np.empty((n, h, w), np.float32), np.empty((n, h, w), bool)
    labels, scores = np.empty(n, np.int64), np.empty(n, np.float64)
    extra: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seconds = 0.0
    for b in batches(model, dataset, device, dtype, batch_size, workers, progress, desc="test"):
        idx = b.data["index"].numpy()
        maps[idx], scores[idx] = b.outputs["map"].numpy(), b.outputs["score"].numpy()
        masks[idx], labels[idx] = b.data["mask"].numpy(), b.data["label"].numpy()
        for prefix, (map_key, score_key) in (map_outputs or {}).items():
            if prefix and map_key in b.outputs:
                if prefix not in extra:
                    extra[prefix] = (np.empty_like(maps), np.empty_like(scores))
                extra[prefix][0][idx], extra[prefix][1][idx] = b.outputs[map_key].numpy(), b.outputs[score_key].numpy()
        seconds += b.seconds
    return TestOutputs(maps, scores, masks, labels, seconds, extra)


def score_images(model, dataset, device, dtype, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, anomaly maps) of every image of ``dataset``, in order."""
    scores, maps = [], []
    for b in batches(model, dataset, device, dtype, batch_size):
        scores.append(b.outputs["score"].numpy())
        maps.append(b.outputs["map"].numpy())
    return np.concatenate(scores), np.concatenate(maps)


def mean_map(model, dataset, device, dtype, batch_size: int, workers: int = 0) -> float:
    """The mean anomaly-map value over ``dataset`` in eval mode (a model's validation criterion: the maps
    the model will make at inference, with its BatchNorm statistics left as training made them)."""
    total, count = 0.0, 0
    for b in batches(model, dataset, device, dtype, batch_size, workers):
        total += float(b.outputs["map"].sum())
        count += b.outputs["map"].numel()
    return total / max(count, 1)


def score_files(predict, paths: list, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, largest map values) of image files, by ``predict`` (images -> Predictions, the model in
    use), ``batch`` at a time."""
    if not paths:
        return np.zeros(0), np.zeros(0)
    from destseg.data.images import read_rgb

    scores, peaks = [], []
    for i in range(0, len(paths), batch):
        for p in predict([read_rgb(f) for f in paths[i:i + batch]]):
            scores.append(p.score)
            peaks.append(float(p.map.max()))
    return np.asarray(scores, dtype=np.float64), np.asarray(peaks, dtype=np.float64)
