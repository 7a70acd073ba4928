"""Evaluation metrics (SPEC "Metrics"), exact (no binning) and correct with ties.

All functions take numpy arrays: ``maps`` (N, H, W) float, ``masks`` (N, H, W) 0/1, ``labels`` (N,) 0/1,
``scores`` (N,). Thresholds are the distinct predicted values; tied values form one curve point.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from destseg.errors import MetricError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
METRIC_NAMES = ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90")


def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise MetricError(f"{name} contains {bad} NaN or infinite value(s)")


def _binary(name: str, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise MetricError(f"{name} must contain only 0 and 1")
        y = y.astype(bool)
    return y


def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` descending (ties need no stable order: they are grouped)."""
    return np.argsort(scores, kind="quicksort")[::-1]


def _curve_counts(scores: np.ndarray, targets: np.ndarray, order: np.ndarray | None = None):
    """Cumulative true/false positives at each distinct threshold, thresholds descending."""
    scores = np.asarray(scores).ravel()
    targets = np.asarray(targets).ravel()
    order = _descending(scores) if order is None else order
    s, t = scores[order], targets[order]
    last_of_group = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(t, dtype=np.int64)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps, fps, s[last_of_group]


def auroc(scores: np.ndarray, targets: np.ndarray, order: np.ndarray | None = None) -> float:
    """Area under the ROC curve (trapezoid over distinct thresholds, as scikit-learn)."""
    targets = _binary("targets", targets)
    _check_finite("scores", np.asarray(scores))
    n_pos = int(targets.sum())
    n_neg = targets.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError("AUROC needs both positive and negative samples "
                          f"(got {n_pos} positive, {n_neg} negative)")
    fpr, tpr = roc_curve(scores, targets, order)
    return float(np.trapezoid(tpr, fpr))


def roc_curve(scores: np.ndarray, targets: np.ndarray, order: np.ndarray | None = None):
    """(fpr, tpr) from (0, 0) through each distinct threshold, thresholds descending."""
    targets = _binary("targets", targets)
    tps, fps, _ = _curve_counts(scores, targets, order)
    return np.r_[0, fps] / (targets.size - targets.sum()), np.r_[0, tps] / targets.sum()


def precision_recall(scores: np.ndarray, targets: np.ndarray, order: np.ndarray | None = None):
    """(precision, recall, thresholds) at each distinct threshold, thresholds descending."""
    targets = _binary("targets", targets)
    _check_finite("scores", np.asarray(scores))
    n_pos = int(targets.sum())
    if n_pos == 0:
        raise MetricError("precision/recall need at least one positive sample")
    tps, fps, thresholds = _curve_counts(scores, targets, order)
    return tps / (tps + fps), tps / n_pos, thresholds


def average_precision(scores: np.ndarray, targets: np.ndarray, order: np.ndarray | None = None) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's definition)."""
    precision, recall, _ = precision_recall(scores, targets, order)
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def f1_max_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1; predict defect where score >= threshold."""
    precision, recall, thresholds = precision_recall(scores, targets)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) per image, numbered uniquely over the whole set."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    total = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT_CONNECTED)
        labels[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return labels, total


def pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, order: np.ndarray | None = None) -> float:
    """Area under the per-region-overlap curve up to FPR ``max_fpr``, divided by ``max_fpr``.

    FPR runs over all ground-truth-negative pixels of the set; PRO(t) is the mean over GT regions of the
    share of the region's pixels with map >= t. The curve is exact (one point per distinct value), linear
    between points, cut at ``max_fpr`` by interpolation.
    """
    maps, masks = _check_maps(maps, masks)
    regions, n_regions = _label_regions(masks)
    if n_regions == 0:
        raise MetricError("PRO needs at least one defect region in the masks")
    n_neg = int((~masks).sum())
    if n_neg == 0:
        raise MetricError("PRO needs normal (mask 0) pixels")
    flat_regions = regions.ravel()
    sizes = np.bincount(flat_regions, minlength=n_regions + 1).astype(np.float64)
    # Each pixel adds to the curve when the threshold passes it: a normal pixel 1/n_neg to FPR, a region
    # pixel 1/(size * n_regions) to PRO.
    weight = np.where(flat_regions > 0, 1.0 / (sizes[flat_regions] * n_regions), 0.0)
    order = _descending(maps.ravel()) if order is None else order
    s = maps.ravel()[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    fpr = np.r_[0, np.cumsum((flat_regions[order] == 0), dtype=np.int64)[last] / n_neg]
    overlap = np.r_[0, np.cumsum(weight[order])[last]]
    cut = int(np.searchsorted(fpr, max_fpr, side="left"))
    if cut < fpr.size:  # interpolate the point at exactly max_fpr
        f0, f1, p0, p1 = fpr[cut - 1], fpr[cut], overlap[cut - 1], overlap[cut]
        p_cut = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0) if f1 > f0 else p1
        fpr = np.r_[fpr[:cut], max_fpr]
        overlap = np.r_[overlap[:cut], p_cut]
    return float(min(np.trapezoid(overlap, fpr) / max_fpr, 1.0))


def instance_scores(maps: np.ndarray, masks: np.ndarray, ratio: float = 0.5) -> np.ndarray:
    """For each GT instance, the value at index floor(ratio * n) of its n predictions sorted descending."""
    regions, n = _label_regions(masks)
    flat = regions.ravel()
    idx = np.flatnonzero(flat)
    vals = maps.ravel()[idx]
    reg = flat[idx]
    order = np.lexsort((-vals, reg))  # by region, then value descending
    reg, vals = reg[order], vals[order]
    starts = np.searchsorted(reg, np.arange(1, n + 1))
    sizes = np.bincount(reg, minlength=n + 1)[1:]
    return vals[starts + np.floor(ratio * sizes).astype(np.int64)]


def instance_average_precision(maps: np.ndarray, masks: np.ndarray, recall_level: float = 0.9,
                               order: np.ndarray | None = None):
    """(IAP, IAP@recall_level) as in the SPEC.

    Instance scores ascending s_0..s_{N-1}; at s_i recall = 1 - i/N and precision is the share of pixels
    with map >= s_i that lie inside the GT. Precision is made monotone (p_{i+1} = max(p_{i+1}, p_i)).
    IAP is the mean precision; IAP@90 is the precision at the highest threshold whose recall is still
    >= 0.9 (i = floor(N / 10)), i.e. "when 90% of instances are detected".
    """
    maps, masks = _check_maps(maps, masks)
    scores = np.sort(instance_scores(maps, masks))
    n = scores.size
    if n == 0:
        raise MetricError("IAP needs at least one defect region in the masks")
    order = _descending(maps.ravel()) if order is None else order
    all_sorted = maps.ravel()[order[::-1]]  # ascending
    gt_sorted = all_sorted[masks.ravel()[order[::-1]]]
    above_all = all_sorted.size - np.searchsorted(all_sorted, scores, side="left")
    above_gt = gt_sorted.size - np.searchsorted(gt_sorted, scores, side="left")
    precision = np.maximum.accumulate(above_gt / above_all)
    recall = 1 - np.arange(n) / n
    i90 = int(np.flatnonzero(recall >= recall_level - 1e-12)[-1])
    return float(precision.mean()), float(precision[i90])


def _check_maps(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    masks = _binary("masks", masks)
    if maps.ndim != 3:
        raise MetricError(f"maps must be (N, H, W), got shape {maps.shape}")
    if maps.shape != masks.shape:
        raise MetricError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    _check_finite("maps", maps)
    return maps.astype(np.float32, copy=False), masks


def top_k_scores(maps: np.ndarray, k: int = 100) -> np.ndarray:
    """Image scores as the mean of the top-k map values (the DeSTSeg rule)."""
    flat = np.asarray(maps).reshape(len(maps), -1)
    k = min(k, flat.shape[1])
    return np.partition(flat, -k, axis=1)[:, -k:].mean(axis=1)


def evaluate(maps, masks, labels, scores=None) -> dict[str, float]:
    """All six SPEC metrics; ``scores`` default to the top-100 mean of each map."""
    maps, masks = _check_maps(maps, masks)
    labels = _binary("labels", np.asarray(labels).ravel())
    if labels.shape[0] != maps.shape[0]:
        raise MetricError(f"{labels.shape[0]} labels for {maps.shape[0]} maps")
    scores = top_k_scores(maps) if scores is None else np.asarray(scores, dtype=np.float64).ravel()
    if scores.shape[0] != maps.shape[0]:
        raise MetricError(f"{scores.shape[0]} scores for {maps.shape[0]} maps")
    _check_finite("scores", scores)
    order = _descending(maps.ravel())  # one sort of all pixels serves every pixel metric
    iap, iap90 = instance_average_precision(maps, masks, order=order)
    return {
        "i_auroc": auroc(scores, labels),
        "p_auroc": auroc(maps.ravel(), masks.ravel(), order),
        "p_ap": average_precision(maps.ravel(), masks.ravel(), order),
        "pro": pro(maps, masks, order=order),
        "iap": iap,
        "iap90": iap90,
    }


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table, one row per name, metrics in percent."""
    header = f"{'':<12}" + "".join(f"{m:>9}" for m in METRIC_NAMES)
    lines = [header]
    for name, metrics in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{100 * metrics[m]:>9.1f}" for m in METRIC_NAMES))
    return "\n".join(lines)
