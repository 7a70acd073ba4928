import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_mvtec(root: Path, category="widget", n_train=6, n_good=2, n_defect=2, size=64, seed=0) -> Path:
    """A tiny MVTec-layout dataset: smooth noise images; defects are bright squares with exact masks."""
    rng = np.random.default_rng(seed)
    base = root / category

    def normal():
        img = rng.normal(120, 10, (size // 8, size // 8, 3)).clip(0, 255).astype(np.uint8)
        return np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))

    (base / "train" / "good").mkdir(parents=True)
    (base / "test" / "good").mkdir(parents=True)
    (base / "test" / "spot").mkdir(parents=True)
    (base / "ground_truth" / "spot").mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(normal()).save(base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(normal()).save(base / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        img, mask = normal(), np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 20, 2)
        img[y:y + 12, x:x + 12] = 250
        mask[y:y + 12, x:x + 12] = 255
        Image.fromarray(img).save(base / "test" / "spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path):
    return make_mvtec(tmp_path / "data")


@pytest.fixture
def shared_bottle():
    root = SHARED / "mvtec"
    if not (root / "bottle" / "train").is_dir():
        pytest.skip(f"shared MVTec bottle data not found at {root} (only on the project machines)")
    return root
