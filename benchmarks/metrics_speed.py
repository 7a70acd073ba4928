"""Time of the metric suite on large test sets of generated anomaly maps, as `destseg test` runs it: one
ranking of all pixels (`pixel_ranking`), the six metrics (`evaluate`) and the pixel F1-max threshold.

    .venv/bin/python benchmarks/metrics_speed.py [--n 150 1000 3000] [--size 256] [--device cuda]

Maps are smooth random fields (a 64x64 field bilinearly upsampled, as the models' outputs are) with
rectangular and blob-shaped defect regions in half the images, raised where the mask is. Prints a Markdown
table: seconds per part and in all, and the pixels per second of the whole suite. ``--device``: sort the
pixels on that torch device (what `destseg test` does on CUDA); the other parts stay in NumPy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from destseg.device import describe_cpu
from destseg.metrics import evaluate, f1_max_threshold, pixel_ranking


def generate(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for start in range(0, n, 256):
        k = min(256, n - start)
        low = torch.from_numpy(rng.random((k, 1, size // 4, size // 4), dtype=np.float32))
        maps[start:start + k] = F.interpolate(low, size=(size, size), mode="bilinear",
                                              align_corners=False)[:, 0].numpy()
    for i in range(n // 2):
        y, x = rng.integers(8, size - 48, 2)
        if i % 2:
            masks[i, y:y + rng.integers(4, 40), x:x + rng.integers(4, 40)] = True
        else:
            r = rng.integers(3, 20)
            masks[i] = (yy - y - 20) ** 2 + (xx - x - 20) ** 2 < r * r
    maps[masks] += 0.3 * rng.random(int(masks.sum()), dtype=np.float32)
    labels = masks.reshape(n, -1).any(1)
    return maps, masks, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[150, 1000, 3000], help="test-set sizes (images)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default=None, help="torch device for the pixel sort (default: NumPy)")
    args = p.parse_args()
    where = f"sort on {args.device}" if args.device else "sort in NumPy"
    if args.device and args.device.startswith("cuda"):
        where += f" ({torch.cuda.get_device_name(args.device)})"
    print(f"numpy {np.__version__}, torch {torch.__version__}, {describe_cpu()}, "
          f"{where}, maps {args.size}x{args.size}\n")
    print("| images | pixels (M) | ranking s | six metrics s | pixel F1 threshold s | total s | M pixels/s |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n:
        maps, masks, labels = generate(n, args.size)
        t = [time.perf_counter()]
        ranking = pixel_ranking(maps, masks, args.device)  # NumPy arrays: any device work is done
        t.append(time.perf_counter())
        evaluate(maps, masks, labels, ranking=ranking)
        t.append(time.perf_counter())
        f1_max_threshold(maps.ravel(), masks.ravel(), ranking)
        t.append(time.perf_counter())
        del ranking
        px, total = maps.size / 1e6, t[3] - t[0]
        print(f"| {n} | {px:.1f} | {t[1] - t[0]:.2f} | {t[2] - t[1]:.2f} | {t[3] - t[2]:.2f} | {total:.2f} | "
              f"{px / total:.1f} |", flush=True)


if __name__ == "__main__":
    main()
