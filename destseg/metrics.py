"""Evaluation metrics (docs/REFERENCE.md, "Metrics"), exact (no binning) and correct with ties.

All functions take numpy arrays: ``maps`` (N, H, W) float, ``masks`` (N, H, W) 0/1, ``labels`` (N,) 0/1,
``scores`` (N,). Thresholds are the distinct predicted values; tied values form one curve point.

Every pixel metric reads one :class:`Ranking` of all pixels: the values sorted descending, each with its
ground-truth region number (0 for a normal pixel). For float32 maps it is one ``np.sort`` of 64-bit keys
(the value's bits above, the region number below), about 10x faster than an argsort and a gather: on a 2-core
CPU a few thousand 256x256 maps take seconds, not minutes (benchmarks/metrics_speed.py). Beside a GPU the
same keys are sorted there (``device``), which ``destseg test`` does when it runs on CUDA.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

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


@dataclass
class Ranking:
    """Scores sorted descending with the id of each (0: negative; k > 0: positive, of GT region k)."""

    values: np.ndarray
    ids: np.ndarray
    last: np.ndarray  # index of the last element of each tie group: one per distinct threshold

    @cached_property
    def positive(self) -> np.ndarray:
        return self.ids > 0

    @cached_property
    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative (true positives, false positives, threshold) at each distinct threshold, descending."""
        tps = np.cumsum(self.positive, dtype=np.int32 if self.ids.size < 2**31 else np.int64)[self.last]
        return tps, (self.last + 1) - tps, self.values[self.last]

    @cached_property
    def id_counts(self) -> np.ndarray:
        """Elements per id: [0] negatives, [k] the size of region k."""
        return np.bincount(self.ids)


def _order_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) -> keys whose unsigned order is the floats' order: negative floats get
    every bit flipped, the others the sign bit set. Inverse: :func:`_float_bits`."""
    flip = (bits.view(np.int32) >> 31).view(np.uint32)  # all ones for a negative float
    flip |= np.uint32(0x80000000)
    return np.bitwise_xor(bits, flip, out=flip)


def _float_bits(keys: np.ndarray) -> np.ndarray:
    flip = ~(keys.view(np.int32) >> 31).view(np.uint32)  # all ones where the sign bit was clear
    flip |= np.uint32(0x80000000)
    return np.bitwise_xor(keys, flip, out=flip)


def rank(scores: np.ndarray, ids: np.ndarray, device=None) -> Ranking:
    """Sort ``scores`` descending, carrying ``ids`` (0/1 targets, or region numbers) along. ``device``: a
    torch device to sort on (a GPU sorts a few thousand maps in well under a second where NumPy takes
    seconds); the result is the same as NumPy's, and NumPy is used if the device runs out of memory."""
    scores = np.ascontiguousarray(scores).ravel()
    ids = np.asarray(ids).ravel()
    max_id = int(ids.max(initial=0))
    packable = scores.dtype == np.float32 and max_id < 2**32
    if packable and device is not None and max_id < 2**31:  # signed 32-bit ids on the device
        ranked = _rank_torch(scores, ids, device)
        if ranked is not None:
            return ranked
    if packable:
        keys = np.empty(scores.size, np.uint64)
        halves = keys.view(np.uint32).reshape(-1, 2)  # (low, high) 32-bit words of each key
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        halves[:, high] = _order_bits(scores.view(np.uint32))
        halves[:, low] = ids
        keys.sort()
        halves = halves[::-1]
        values = _float_bits(np.ascontiguousarray(halves[:, high])).view(np.float32)
        ids = np.ascontiguousarray(halves[:, low])
    else:
        order = np.argsort(scores, kind="quicksort")[::-1]
        values, ids = scores[order], ids[order]
    last = np.r_[np.flatnonzero(values[1:] != values[:-1]), values.size - 1]
    return Ranking(values, ids, last)


def _rank_torch(scores: np.ndarray, ids: np.ndarray, device) -> Ranking | None:
    """:func:`rank` on a torch device: one sort of signed 64-bit keys, the float's order-preserving bits
    (a negative float's 31 low bits flipped) times 2^32 plus the id. None if the device runs out of memory."""
    import torch

    try:
        bits = torch.from_numpy(scores.view(np.int32)).to(device)
        high = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
        del bits
        keys = high.mul_(2**32).add_(torch.from_numpy(ids.astype(np.int32, copy=False)).to(device))
        keys = torch.sort(keys, descending=True).values
        high = torch.div(keys, 2**32, rounding_mode="floor")
        ids_sorted = (keys - high * 2**32).to(torch.int32)
        del keys
        high = high.to(torch.int32)
        values = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
        last = torch.nonzero(values[1:] != values[:-1]).flatten()
        return Ranking(values.cpu().numpy(), ids_sorted.cpu().numpy(), np.r_[last.cpu().numpy(), values.numel() - 1])
    except torch.OutOfMemoryError:
        print(f"destseg: warning: {device} has too little memory to sort {scores.size} pixels; sorting on the CPU",
              file=sys.stderr)
        return None


def _targets_ranking(scores, targets, ranking: Ranking | None):
    targets = _binary("targets", targets)
    _check_finite("scores", np.asarray(scores))
    return targets, ranking if ranking is not None else rank(scores, targets)


def _roc(ranking: Ranking):
    tps, fps, _ = ranking.counts  # the last counts are the totals of positives and negatives
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def _precision_recall(ranking: Ranking):
    tps, fps, thresholds = ranking.counts
    if tps[-1] == 0:
        raise MetricError("precision/recall need at least one positive sample")
    return tps / (tps + fps), tps / tps[-1], thresholds


def auroc(scores: np.ndarray, targets: np.ndarray, ranking: Ranking | None = None) -> float:
    """Area under the ROC curve (trapezoid over distinct thresholds, as scikit-learn)."""
    _, ranking = _targets_ranking(scores, targets, ranking)
    tps, fps, _ = ranking.counts
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        raise MetricError("AUROC needs both positive and negative samples "
                          f"(got {n_pos} positive, {n_neg} negative)")
    fpr, tpr = _roc(ranking)
    return float(np.trapezoid(tpr, fpr))


def roc_curve(scores: np.ndarray, targets: np.ndarray, ranking: Ranking | None = None):
    """(fpr, tpr) from (0, 0) through each distinct threshold, thresholds descending."""
    return _roc(_targets_ranking(scores, targets, ranking)[1])


def precision_recall(scores: np.ndarray, targets: np.ndarray, ranking: Ranking | None = None):
    """(precision, recall, thresholds) at each distinct threshold, thresholds descending."""
    return _precision_recall(_targets_ranking(scores, targets, ranking)[1])


def average_precision(scores: np.ndarray, targets: np.ndarray, ranking: Ranking | None = None) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's definition)."""
    precision, recall, _ = precision_recall(scores, targets, ranking)
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def f1_max_threshold(scores: np.ndarray, targets: np.ndarray,
                     ranking: Ranking | None = None) -> tuple[float, float]:
    """(threshold, F1) maximising F1; predict defect where score >= threshold."""
    precision, recall, thresholds = precision_recall(scores, targets, ranking)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity within each image), numbered 1.. over the whole set in
    image-major raster order."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = EIGHT_CONNECTED  # no connection across images
    labels, total = ndimage.label(masks, structure=structure)
    return labels, int(total)


def pixel_ranking(maps: np.ndarray, masks: np.ndarray, device=None) -> Ranking:
    """The :class:`Ranking` of all pixels with their GT region numbers, shared by every pixel metric
    (``device``: see :func:`rank`)."""
    maps, masks = _check_maps(maps, masks)
    return rank(maps, label_regions(masks)[0], device)


def _region_ranking(maps, masks, ranking: Ranking | None, metric: str) -> tuple[Ranking, np.ndarray]:
    """(ranking, region sizes indexed by region number, [0] = normal pixels)."""
    if ranking is None:
        ranking = pixel_ranking(maps, masks)
    sizes = ranking.id_counts
    if sizes.size < 2:
        raise MetricError(f"{metric} needs at least one defect region in the masks")
    return ranking, sizes


def pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, ranking: Ranking | None = None) -> float:
    """Area under the per-region-overlap curve up to FPR ``max_fpr``, divided by ``max_fpr``.

    FPR runs over all ground-truth-negative pixels of the set; PRO(t) is the mean over GT regions of the
    share of the region's pixels with map >= t. The curve is exact (one point per distinct value), linear
    between points, cut at ``max_fpr`` by interpolation.
    """
    ranking, sizes = _region_ranking(maps, masks, ranking, "PRO")
    n_neg, n_regions = int(sizes[0]), sizes.size - 1
    if n_neg == 0:
        raise MetricError("PRO needs normal (mask 0) pixels")
    # Each pixel adds to the curve when the threshold passes it: a normal pixel 1/n_neg to FPR, a region
    # pixel 1/(size * n_regions) to PRO.
    weight = 1.0 / (sizes * n_regions)
    tps, fps, _ = ranking.counts
    fpr = np.r_[0, fps / n_neg]
    # The region pixels' weights in ranking order, summed up to each threshold's tps-th region pixel.
    cum = np.r_[0.0, np.cumsum(weight[ranking.ids[ranking.positive]])]
    overlap = np.r_[0, cum[tps]]
    cut = int(np.searchsorted(fpr, max_fpr, side="left"))
    if cut < fpr.size:  # interpolate the point at exactly max_fpr
        f0, f1, p0, p1 = fpr[cut - 1], fpr[cut], overlap[cut - 1], overlap[cut]
        p_cut = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0) if f1 > f0 else p1
        fpr = np.r_[fpr[:cut], max_fpr]
        overlap = np.r_[overlap[:cut], p_cut]
    return float(min(np.trapezoid(overlap, fpr) / max_fpr, 1.0))


def instance_scores(maps: np.ndarray, masks: np.ndarray, ratio: float = 0.5,
                    ranking: Ranking | None = None) -> np.ndarray:
    """For each GT instance, the value at index floor(ratio * n) of its n predictions sorted descending."""
    ranking, sizes = _region_ranking(maps, masks, ranking, "instance scores")
    inside = ranking.positive
    vals, reg = ranking.values[inside], ranking.ids[inside]  # descending values
    order = np.argsort(reg, kind="stable")  # by region; values stay descending within each
    starts = np.r_[0, np.cumsum(sizes[1:])[:-1]]
    return vals[order][starts + np.floor(ratio * sizes[1:]).astype(np.int64)]


def instance_average_precision(maps: np.ndarray, masks: np.ndarray, recall_level: float = 0.9,
                               ranking: Ranking | None = None):
    """(IAP, IAP@recall_level) as in docs/REFERENCE.md.

    Instance scores ascending s_0..s_{N-1}; at s_i recall = 1 - i/N and precision is the share of pixels
    with map >= s_i that lie inside the GT. Precision is made monotone (p_{i+1} = max(p_{i+1}, p_i)).
    IAP is the mean precision; IAP@90 is the precision at the highest threshold whose recall is still
    >= 0.9 (i = floor(N / 10)), i.e. "when 90% of instances are detected".
    """
    ranking, _ = _region_ranking(maps, masks, ranking, "IAP")
    scores = np.sort(instance_scores(maps, masks, ranking=ranking))
    n = scores.size
    all_sorted = ranking.values[::-1]  # ascending
    gt_sorted = ranking.values[ranking.positive][::-1]
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


def evaluate(maps, masks, labels, scores=None, ranking: Ranking | None = None, device=None) -> dict[str, float]:
    """All six metrics (docs/REFERENCE.md); ``scores`` default to the top-100 mean of each map. ``ranking``: the maps'
    :func:`pixel_ranking`, when the caller needs it too (it is the costly part); else it is computed, on
    the torch ``device`` if one is given."""
    maps, masks = _check_maps(maps, masks)
    labels = _binary("labels", np.asarray(labels).ravel())
    if labels.shape[0] != maps.shape[0]:
        raise MetricError(f"{labels.shape[0]} labels for {maps.shape[0]} maps")
    scores = top_k_scores(maps) if scores is None else np.asarray(scores, dtype=np.float64).ravel()
    if scores.shape[0] != maps.shape[0]:
        raise MetricError(f"{scores.shape[0]} scores for {maps.shape[0]} maps")
    _check_finite("scores", scores)
    ranking = pixel_ranking(maps, masks, device) if ranking is None else ranking
    pixels, targets = maps.ravel(), masks.ravel()
    iap, iap90 = instance_average_precision(maps, masks, ranking=ranking)
    return {
        "i_auroc": auroc(scores, labels),
        "p_auroc": auroc(pixels, targets, ranking),
        "p_ap": average_precision(pixels, targets, ranking),
        "pro": pro(maps, masks, ranking=ranking),
        "iap": iap,
        "iap90": iap90,
    }


def image_metrics(scores, labels) -> dict[str, float]:
    """The image-level metrics, which need labels only (no masks): I-AUROC and the image average precision
    (``i_ap``: how well the image scores rank defect images above good ones)."""
    labels = _binary("labels", np.asarray(labels).ravel())
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.shape != labels.shape:
        raise MetricError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    _check_finite("scores", scores)
    return {"i_auroc": auroc(scores, labels), "i_ap": average_precision(scores, labels)}


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) confidence interval of a rate seen as ``k`` of ``n``."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def decision_rates(scores, labels, threshold: float) -> dict:
    """The decisions ``score >= threshold`` on labelled images: the detection rate (defect images called
    defect) and the false-alarm rate (good images called defect), each with its count and 95% Clopper-Pearson
    interval; a rate is None where its class has no image."""
    labels = np.asarray(labels).ravel().astype(bool)
    called = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    out: dict = {"threshold": float(threshold)}
    for name, rows, count_name in (("detection_rate", labels, "detected"),
                                   ("false_alarm_rate", ~labels, "false_alarms")):
        n, k = int(rows.sum()), int((called & rows).sum())
        out[name] = k / n if n else None
        out[count_name], out[f"n_{'defect' if name == 'detection_rate' else 'good'}"] = k, n
        out[f"{name}_ci95"] = list(proportion_ci(k, n)) if n else None
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table, one row per name, metrics in percent ('-' for a metric not computed, such as the
    pixel metrics of a split without masks)."""
    header = f"{'':<12}" + "".join(f"{m:>9}" for m in METRIC_NAMES)
    lines = [header]
    for name, metrics in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{100 * metrics[m]:>9.1f}" if metrics.get(m) is not None
                                             else f"{'-':>9}" for m in METRIC_NAMES))
    return "\n".join(lines)
