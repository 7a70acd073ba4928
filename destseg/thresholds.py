"""Decision thresholds: from good images only (at the end of training) or F1-max on a labelled test split.

RUN/thresholds.json holds the thresholds in force (``image``, ``pixel``), where they came from (``source``:
``good_images`` or ``test_split``, and ``method`` in words) and, once ``destseg test`` has refined them, the
good-image thresholds from training under ``good_images``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from destseg.checkpoint import atomic_write_text
from destseg.data.datasets import TestDataset, TestSample
from destseg.device import autocast, to_device


def fpr_thresholds(scores: np.ndarray, maps: np.ndarray, fpr: float, what: str) -> dict:
    """Thresholds from normal images only: the (1 - fpr) quantiles of their image scores and pixels."""
    return {"image": float(np.quantile(scores, 1 - fpr)), "pixel": float(np.quantile(maps, 1 - fpr)),
            "source": "good_images", "fpr": fpr, "n_images": int(len(scores)),
            "method": f"(1 - {fpr}) quantile of the scores of {len(scores)} {what}"}


@torch.no_grad()
def score_good_images(model, paths: list[Path], size: int, mean, std, device, dtype,
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, anomaly maps) of ``paths`` with ``model`` in eval mode."""
    dataset = TestDataset([TestSample(p, 0, None, "good") for p in paths], size, mean, std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    was_training = model.training
    model.eval()
    scores, maps = [], []
    for batch in loader:
        x = to_device(batch, device)["image"]
        with autocast(device, dtype):
            out = model(x)
        scores.append(out["score"].float().cpu().numpy())
        maps.append(out["map"].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(maps)


def write_thresholds(run_dir: Path, thresholds: dict) -> None:
    """Write RUN/thresholds.json; test-split thresholds keep the good-image ones beside them."""
    path = Path(run_dir) / "thresholds.json"
    if thresholds.get("source") == "test_split" and path.is_file():
        previous = read_thresholds(run_dir) or {}
        good = previous if previous.get("source") == "good_images" else previous.get("good_images")
        if good:
            thresholds = {**thresholds, "good_images": good}
    atomic_write_text(path, json.dumps(thresholds, indent=2) + "\n")


def read_thresholds(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "thresholds.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        from destseg.errors import CheckpointError

        raise CheckpointError(f"{path}: invalid JSON; delete it and run `destseg test` to recompute") from None
