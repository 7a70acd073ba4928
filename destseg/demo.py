"""The embedded demo: a small anomaly-detection dataset built offline from scikit-image's CC0 texture
photos (``brick``; ``gravel`` as a defect source), trained on a short CPU schedule, evaluated, with
heat maps written to disk.

Training anomalies are Perlin masks filled with generated textures (the library's synthesis); the test
defects are drawn by a different generator: scratches (thick polylines), stains (ellipses of another
colour) and foreign-material patches (gravel inside a random polygon). Masks are exact: they are the very
pixels that were drawn.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from destseg.checkpoint import atomic_write_text
from destseg.errors import DestsegError

SIZE = 256
N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 60, 12, 18
DEMO_SCHEDULE = {"teacher": "efficientnet_lite0", "image_size": 128, "batch_size": 8, "steps": 450,
                 "student_steps": 250, "student_width": 32, "seg_width": 32}  # narrower than --schedule cpu (48)
DEMO_BUDGET_S = 270.0  # training stops after 4.5 minutes on a machine too slow for the 450 steps


def _skimage_data():
    try:
        from skimage import data
    except ImportError:
        raise DestsegError("the demo builds its images from scikit-image's sample data: "
                           "pip install scikit-image") from None
    return data


def _normal(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 256x256 view of the source texture with slight lighting changes: one 'good part'."""
    y, x = rng.integers(0, base.shape[0] - SIZE, size=2)
    crop = base[y:y + SIZE, x:x + SIZE].astype(np.float32)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    tint = np.array([1.0, 0.8, 0.6], dtype=np.float32) * gain  # warm brick colour
    img = crop[..., None] * tint + offset
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, gravel: np.ndarray, kind: str, rng: np.random.Generator):
    from skimage import draw

    out = img.copy()
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if kind == "scratch":
        pts = rng.integers(30, SIZE - 30, size=(3, 2))
        width = int(rng.integers(3, 6))
        for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:]):
            rr, cc = draw.line(r0, c0, r1, c1)
            for dr in range(-width // 2, width // 2 + 1):
                for dc in range(-width // 2, width // 2 + 1):
                    mask[np.clip(rr + dr, 0, SIZE - 1), np.clip(cc + dc, 0, SIZE - 1)] = True
        out[mask] = np.array([235, 235, 225], dtype=np.uint8)
    elif kind == "stain":
        r, c = rng.integers(50, SIZE - 50, size=2)
        rr, cc = draw.ellipse(r, c, rng.integers(10, 25), rng.integers(10, 25), shape=mask.shape,
                              rotation=rng.uniform(0, np.pi))
        mask[rr, cc] = True
        out[mask] = (0.35 * out[mask] + 0.65 * np.array([40, 60, 20])).astype(np.uint8)
    else:  # foreign material
        r, c = rng.integers(60, SIZE - 60, size=2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = rng.uniform(12, 30, 7)
        rr, cc = draw.polygon(r + radii * np.sin(angles), c + radii * np.cos(angles), shape=mask.shape)
        mask[rr, cc] = True
        patch = gravel[:SIZE, :SIZE].astype(np.float32)[..., None] * np.array([0.7, 0.7, 0.8])
        out[mask] = patch[mask].astype(np.uint8)
    return out, mask


def build_demo_dataset(root: Path, seed: int = 0) -> Path:
    """Write an MVTec-layout dataset ``root/demo/...`` and return ``root``."""
    data = _skimage_data()
    rng = np.random.default_rng(seed)
    brick, gravel = data.brick(), data.gravel()
    base = root / "demo"
    dirs = {"train": base / "train" / "good", "good": base / "test" / "good"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(N_TRAIN):
        Image.fromarray(_normal(brick, rng)).save(dirs["train"] / f"{i:03d}.png")
    for i in range(N_TEST_GOOD):
        Image.fromarray(_normal(brick, rng)).save(dirs["good"] / f"{i:03d}.png")
    kinds = ["scratch", "stain", "foreign"]
    for i in range(N_TEST_DEFECT):
        kind = kinds[i % 3]
        img, mask = _defect(_normal(brick, rng), gravel, kind, rng)
        (base / "test" / kind).mkdir(parents=True, exist_ok=True)
        (base / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(base / "test" / kind / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def write_heatmaps(out_dir: Path, outputs, samples, size: int) -> int:
    from destseg.data.images import read_rgb, resize_rgb
    from destseg.visualize import overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = float(outputs.maps.min()), float(outputs.maps.max())
    for i, s in enumerate(samples):
        img = resize_rgb(read_rgb(s.path), size)
        over = overlay(img, outputs.maps[i], vmin, vmax, mask=outputs.masks[i])
        Image.fromarray(np.concatenate([img, over], axis=1)).save(out_dir / f"{s.defect}_{s.path.stem}.png")
    return len(samples)


def run_demo(out: Path, overwrite: bool = False, steps: int | None = None, seed: int = 0) -> int:
    from destseg.data import scan_dataset, validate
    from destseg.infer import evaluate_run, metrics_table
    from destseg.models import DEFAULT_MODEL, model_config
    from destseg.train import DataSource, TrainOptions, train

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DestsegError(f"{out}: exists and is not empty; pass --overwrite to rebuild the demo")
        shutil.rmtree(out)
    t0 = time.time()
    data_root = build_demo_dataset(out / "data", seed)
    index = validate(scan_dataset(data_root, "demo"))
    print(json.dumps({k: v for k, v in index.summary().items() if k != "problems"}), file=sys.stderr)
    if index.problems:
        raise DestsegError("demo dataset has problems: " + "; ".join(index.problems))
    schedule = dict(DEMO_SCHEDULE)
    if steps:
        schedule["steps"], schedule["student_steps"] = steps, max(1, int(steps * 0.55))
    config = model_config(DEFAULT_MODEL, **schedule)
    run = out / "run"
    train(run, DEFAULT_MODEL, config, DataSource(str(data_root), "demo"),
          options=TrainOptions(seed=seed, time_budget_s=DEMO_BUDGET_S))
    result = evaluate_run(run, progress=False)
    outputs = result.pop("_outputs")
    n = write_heatmaps(out / "heatmaps", outputs, index.test, config.image_size)
    print(metrics_table(result))
    summary = {k: result[k] for k in ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90")}
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"{n} heat maps in {out / 'heatmaps'}; run in {run}; total {summary['seconds']} s")
    return 0
