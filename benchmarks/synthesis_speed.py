"""Input-pipeline throughput: per-sample NumPy synthesis (the CPU path) vs batched DeviceAugment on each
device present, at 256x256 with rot90 rotation and a texture folder; images/s of finished training batches.

    .venv/bin/python benchmarks/synthesis_speed.py --texture-dir ../shared/data/textures [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from destseg.data.images import Normalize
from destseg.data.training import TrainDataset
from destseg.data.device_synthesis import DeviceAugment, texture_bank
from destseg.data.synthesis import AnomalySynthesizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texture-dir", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size, n = 256, args.batch_size
    images = np.random.default_rng(0).integers(0, 255, (64, size, size, 3), dtype=np.uint8)
    paths = [f"img{i}" for i in range(64)]
    ds = TrainDataset(paths, size, Normalize((0.5,) * 3, (0.5,) * 3), "rot90", AnomalySynthesizer(size, args.texture_dir),
                      images=images)
    t0 = time.perf_counter()
    for b in range(args.batches):
        torch.utils.data.default_collate([ds[(i % 64, (0, 0, b * n + i))] for i in range(n)])
    cpu = args.batches * n / (time.perf_counter() - t0)
    print(f"| NumPy per sample, 1 process | cpu | {cpu:.1f} img/s |")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        aug = DeviceAugment(size, (0.5,) * 3, (0.5,) * 3, "rot90", texture_bank(size, args.texture_dir), dev)
        raw = torch.from_numpy(images[:n])
        aug(raw, aug.generator(0))  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in range(args.batches):
            aug(raw, aug.generator(1, b))
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"| DeviceAugment, batched | {dev} | {args.batches * n / (time.perf_counter() - t0):.1f} img/s |")


if __name__ == "__main__":
    main()
