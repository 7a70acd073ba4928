"""Decision thresholds: from good images only (split conformal, at the end of training, or ``destseg test`` on
a split without defects) or F1-max on a labelled test split, and which threshold is in force.

RUN/thresholds.json holds the thresholds in force (``image``, ``pixel``), where they came from (``source``:
``good_images`` or ``test_split``, and ``method`` in words) and since when (``since``, UTC). ``destseg test``
records the thresholds a labelled split suggests beside them (``measured_on_test``) without putting them in
force; with ``--adopt-thresholds`` they replace them, the good-image thresholds kept under ``good_images``. Good-image thresholds
state their guarantee: ``n_images``, ``fpr_target`` and ``fpr_bound``. Every thresholds.json replaced is kept
in RUN/thresholds-history/ (named by its ``since``), so a decision can be traced to the thresholds it used.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from destseg.checkpoint import atomic_write_text


def conformal_rank(n: int, fpr: float) -> int:
    """k = ceil((n + 1)(1 - fpr)): the k-th smallest of n exchangeable good scores is exceeded by a new good
    score with probability at most ``fpr`` (split conformal). May exceed n: then no order statistic does."""
    return math.ceil((n + 1) * (1 - fpr) - 1e-9)  # the tolerance keeps (99 + 1) * 0.99 at 99, not 100


def fpr_bound(n: int, fpr: float) -> float:
    """The false-positive rate the conformal threshold of n good scores guarantees: ``fpr`` where n is large
    enough, else 1 / (n + 1), the bound of the largest score."""
    return max(fpr, 1 / (n + 1))


def images_needed(fpr: float) -> int:
    """The fewest good images whose conformal threshold reaches ``fpr`` (k <= n)."""
    return math.ceil((1 - fpr) / fpr - 1e-9)


def conformal_threshold(scores: np.ndarray, fpr: float) -> float:
    """Just above the k-th smallest score (``conformal_rank``; the largest when k > n): the decisions
    ``score >= threshold`` then flag exactly the scores above it, so a good image of the calibration set (or
    a false alarm added to it) is never called defect by its own threshold. A float32 value (the next one
    above), as the model's scores and maps are: compared with float32 arrays it stays what it is."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    return float(np.nextafter(np.float32(s[min(conformal_rank(len(s), fpr), len(s)) - 1]), np.float32(np.inf)))


def map_peaks(maps) -> np.ndarray:
    """Each map's largest value: (n, H, W) maps -> (n,); (n,) values are returned as they are."""
    maps = np.asarray(maps, dtype=np.float32)
    return maps.reshape(len(maps), -1).max(axis=1)


def good_image_thresholds(scores: np.ndarray, maps: np.ndarray, fpr: float, what: str, unseen: bool = True) -> dict:
    """Thresholds from good images only (their ``scores`` and ``maps``, or the maps' largest values), each
    with a stated guarantee for a new good image exchangeable with them (a false-positive rate at most
    ``fpr_bound``):

    - image: the conformal threshold of the image scores (the decision ``score >= image`` is wrong for a good
      image with probability at most ``fpr_bound``);
    - pixel: the conformal threshold of each image's largest map value, so that a new good image gets an
      empty mask with probability at least 1 - ``fpr_bound`` (pixels within an image are not exchangeable,
      so a quantile of pixels would guarantee nothing per image).

    When the images are too few for ``fpr`` (``images_needed``) the largest value is used and a warning
    names how many images the target needs. ``unseen``: the images were not used for training; where they were,
    their scores are lower than a new good image's and no bound holds: ``fpr_bound`` is None and ``method`` says
    why."""
    n = len(scores)
    bound = fpr_bound(n, fpr)
    peaks = map_peaks(maps)
    out = {"image": conformal_threshold(scores, fpr), "pixel": conformal_threshold(peaks, fpr),
           "source": "good_images", "n_images": int(n), "fpr_target": fpr, "fpr_bound": bound if unseen else None,
           "method": f"split conformal on the scores of {n} {what}: the {min(conformal_rank(n, fpr), n)}-th "
                     f"smallest of {n} (k = ceil((n + 1)(1 - {fpr}))); pixel threshold: the same rule on each "
                     "image's largest map value"}
    if not unseen:
        out["method"] += ("; no false-positive bound: these images were seen in training, so they score lower than "
                          "new good images (hold some out with --threshold-holdout, or recalibrate on unseen ones)")
        return out
    if bound > fpr:
        note = (f"{n} good images cannot set a {fpr:.3g} false-positive rate: the threshold is their largest "
                f"score, which bounds the rate at {bound:.3g} (1/(n+1)); {images_needed(fpr)} good images are "
                "needed for the target")
        out["warning"] = note
        warnings.warn(note, stacklevel=2)
    return out


def in_force(stored: dict | None, image: float | None = None, pixel: float | None = None):
    """(image threshold, pixel threshold) to use: an explicit value wins over the run's stored one; without
    a pixel threshold of its own, the image threshold stands in for it. Either may be None."""
    stored = stored or {}
    image = image if image is not None else stored.get("image")
    pixel = pixel if pixel is not None else stored.get("pixel", image)
    return image, pixel


def decide(score: float, threshold: float | None) -> bool | None:
    """The decision ``score >= threshold`` (defect), compared in float64 everywhere (predict, watch, serve, the
    API), so an explicit threshold such as 0.50000001 decides alike in each; None without a threshold. The
    model's float32 scores are exact in float64, and stored thresholds are float32 values, so they decide as
    they were set."""
    return None if threshold is None else bool(float(score) >= float(threshold))


HISTORY = "thresholds-history"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_thresholds(run_dir: Path, thresholds: dict) -> dict:
    """Write RUN/thresholds.json (stamped ``since`` now) and return what was written; test-split thresholds
    keep the good-image ones beside them; the file replaced is moved to RUN/thresholds-history/."""
    path = Path(run_dir) / "thresholds.json"
    previous = read_thresholds(run_dir) if path.is_file() else None
    if thresholds.get("source") == "test_split" and previous:
        good = previous if previous.get("source") == "good_images" else previous.get("good_images")
        if good:
            thresholds = {**thresholds, "good_images": good}
    thresholds = {k: v for k, v in thresholds.items() if k != "measured_on_test"}
    thresholds = {**thresholds, "since": utc_now()}
    if previous is not None:
        old = Path(run_dir) / HISTORY / f"thresholds-{_stamp(previous, path)}.json"
        if not old.exists():
            atomic_write_text(old, path.read_text())
    atomic_write_text(path, json.dumps(thresholds, indent=2) + "\n")
    return thresholds


def record_measured(run_dir: Path, measured: dict) -> dict:
    """Record thresholds measured on a test split beside the ones in force (``measured_on_test`` in
    RUN/thresholds.json), which stay as they are (same ``since``, no history entry); returns the file's
    content. ``destseg test --adopt-thresholds`` puts them in force instead."""
    path = Path(run_dir) / "thresholds.json"
    current = read_thresholds(run_dir) or {}
    updated = {**current, "measured_on_test": measured}
    atomic_write_text(path, json.dumps(updated, indent=2) + "\n")
    return updated


def _stamp(thresholds: dict, path: Path) -> str:
    """A file-name-safe time for a thresholds.json: its ``since``, or (written before ``since`` existed)
    its modification time."""
    since = thresholds.get("since") or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat()
    return "".join(c if c.isalnum() else "-" for c in since)


def threshold_history(run_dir: Path) -> list[Path]:
    """The thresholds.json files a run used before the one in force, oldest first."""
    return sorted((Path(run_dir) / HISTORY).glob("thresholds-*.json"))


def read_thresholds(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "thresholds.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        from destseg.errors import CheckpointError

        raise CheckpointError(f"{path}: invalid JSON; delete it and run `destseg test` to recompute") from None
