"""The training data: cached resized images with the paper's per-category rotation and anomaly synthesis,
addressed by seeded samples from a step sampler so that batches are reproducible for any number of workers
and after a resume."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from destseg.data.images import Normalize, hw, read_rgb, resize_rgb
from destseg.data.synthesis import AnomalySynthesizer
from destseg.errors import DatasetError

ROTATIONS = ("none", "small", "rot90")
ROTATION_FILL = (114, 114, 114)


def load_resized(paths: list[Path], size) -> np.ndarray:
    """(N, H, W, 3) uint8; raises ImageError naming the first bad file."""
    out = np.empty((len(paths), *hw(size), 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = resize_rgb(read_rgb(p), size)
    return out


def rotate_image(img: np.ndarray, rotation: str, rng: np.random.Generator) -> np.ndarray:
    if rotation == "none":
        return img
    angle = float(rng.uniform(-5, 5))
    if rotation == "rot90":
        angle += 90.0 * int(rng.integers(0, 4))
    pil = Image.fromarray(img).rotate(angle, resample=Image.BILINEAR, fillcolor=ROTATION_FILL)
    return np.asarray(pil)


class TrainDataset(torch.utils.data.Dataset):
    """Normal training images with per-sample seeded augmentation and anomaly synthesis.

    Items are addressed by ``(index, sample_seed)`` pairs produced by :class:`StepSampler`; the seed alone
    decides the rotation and the synthetic anomaly, so batches are identical for any number of workers and
    after a resume.
    """

    def __init__(self, paths: list[Path], size, normalize: Normalize, rotation: str = "none",
                 synthesizer: AnomalySynthesizer | None = None, images: np.ndarray | None = None,
                 raw: bool = False):
        """``raw``: items are the cached uint8 images alone, for :class:`DeviceAugment`."""
        if not paths:
            raise DatasetError("training set is empty: no images found")
        if rotation not in ROTATIONS:
            raise DatasetError(f"unknown rotation '{rotation}' (expected one of {ROTATIONS})")
        self.paths = list(paths)
        self.images = load_resized(self.paths, size) if images is None else images
        self.size, self.normalize = size, normalize
        self.rotation = rotation
        self.synthesizer = synthesizer
        self.raw = raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, sample_seed = item
        if self.raw:  # augmentation and synthesis happen batched on the training device (DeviceAugment)
            return {"raw": torch.from_numpy(self.images[index])}
        rng = np.random.default_rng(sample_seed)
        img = rotate_image(self.images[index], self.rotation, rng).astype(np.float32) / 255.0
        out = {"image": self.normalize.hwc(img)}
        if self.synthesizer is not None:
            aug, mask = self.synthesizer(img, rng)
            out["augmented"] = self.normalize.hwc(aug)
            out["mask"] = torch.from_numpy(mask[None].astype(np.float32))
        return out


class StepSampler(torch.utils.data.Sampler):
    """Yields batches of ``(index, sample_seed)`` for steps ``start_step .. total_steps-1``.

    Sample position ``p = step * batch_size + j`` walks through one seeded permutation of the data per
    epoch; its seed is derived from ``(seed, stream, p)`` (one stream per training stage). With ``world_size > 1`` each rank takes its slice of every
    global batch, so the global batch is the same as in a single-process run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, stream: int = 0):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)}
        return int(self._perms[epoch][p % self.n])

    def __iter__(self):
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.total_steps):
            first = step * self.batch_size + self.rank * local
            yield [(self._index(p), (self.seed, self.stream, p)) for p in range(first, first + local)]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def seed_worker(worker_id: int) -> None:
    """Seed the libraries' global RNGs in each DataLoader worker (our own code uses per-sample seeds)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
