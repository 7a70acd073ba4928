import json

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, roc_auc_score

from destseg import metrics
from destseg.cli import main
from destseg.errors import MetricError


def fixture(seed=0, n=6, size=24, levels=12):
    """Maps quantised to a few levels (many ties) with blob masks, some images normal."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y:y + h, x:x + w] = True
    maps = np.round(rng.random((n, size, size)) * levels) / levels
    maps[masks] = np.round(maps[masks] * 0.5 + rng.random(masks.sum()) * 0.6, 1)
    labels = masks.reshape(n, -1).any(1).astype(int)
    return maps.astype(np.float32), masks, labels


# ------------------------------------------------------------------ slow, direct reference implementations

def pro_reference(maps, masks, max_fpr=0.3):
    regions = []
    for i in range(len(masks)):
        lab = sk_label(masks[i], connectivity=2)
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    neg = ~masks
    fprs, pros = [0.0], [0.0]
    for t in sorted(np.unique(maps))[::-1]:
        pred = maps >= t
        fprs.append((pred & neg).sum() / neg.sum())
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    area, (f_prev, p_prev) = 0.0, (0.0, 0.0)
    for f, p in zip(fprs[1:], pros[1:]):
        if f >= max_fpr:
            p_cut = p_prev + (p - p_prev) * (max_fpr - f_prev) / (f - f_prev) if f > f_prev else p
            area += (max_fpr - f_prev) * (p_prev + p_cut) / 2
            return area / max_fpr
        area += (f - f_prev) * (p_prev + p) / 2
        f_prev, p_prev = f, p
    return area / max_fpr


def iap_reference(maps, masks):
    scores = []
    for i in range(len(masks)):
        lab = sk_label(masks[i], connectivity=2)
        for r in range(1, lab.max() + 1):
            vals = sorted(maps[i][lab == r].tolist(), reverse=True)
            scores.append(vals[int(0.5 * len(vals))])
    scores.sort()
    n = len(scores)
    precisions = []
    for s in scores:
        pred = maps >= s
        precisions.append((pred & masks).sum() / pred.sum())
    for i in range(n - 1):
        precisions[i + 1] = max(precisions[i + 1], precisions[i])
    recalls = [1 - i / n for i in range(n)]
    at90 = [p for p, r in zip(precisions, recalls) if r >= 0.9][-1]
    return float(np.mean(precisions)), float(at90)


# ----------------------------------------------------------------------------------------- cross-checks

@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 15, 2000).astype(float)
    targets = rng.random(2000) < 0.3
    assert metrics.auroc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    assert metrics.average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets, scores), abs=1e-12)


def test_pixel_metrics_match_sklearn_on_fixture():
    maps, masks, labels = fixture(7, n=8, size=32)
    result = metrics.evaluate(maps, masks, labels)
    assert result["p_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["p_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    scores = metrics.top_k_scores(maps)
    assert result["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_pro_matches_threshold_walk(seed):
    maps, masks, _ = fixture(seed)
    assert metrics.pro(maps, masks) == pytest.approx(pro_reference(maps, masks), abs=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_iap_matches_direct_implementation(seed):
    maps, masks, _ = fixture(seed)
    iap, iap90 = metrics.instance_average_precision(maps, masks)
    ref_iap, ref_iap90 = iap_reference(maps, masks)
    assert iap == pytest.approx(ref_iap, abs=1e-12)
    assert iap90 == pytest.approx(ref_iap90, abs=1e-12)


def test_packed_float32_ranking_equals_argsort():
    """The one-sort path for float32 (value bits and id in a 64-bit key) orders exactly as an argsort:
    negatives, both zeros, subnormals, huge values and ties included."""
    rng = np.random.default_rng(3)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 1.0, -1.0], np.float32)
    x = np.r_[rng.normal(size=5000).astype(np.float32), np.round(rng.normal(size=5000), 1).astype(np.float32),
              special, special]
    ids = rng.integers(0, 7, x.size)
    packed, generic = metrics.rank(x, ids), metrics.rank(x.astype(np.float64), ids)
    np.testing.assert_array_equal(packed.values, np.sort(x)[::-1])
    np.testing.assert_array_equal(packed.values, generic.values)
    np.testing.assert_array_equal(packed.last, generic.last)
    # within a tie group the ids may come in any order, but each group holds the same ids
    for a, b in ((0, packed.last[0] + 1), (packed.last[10] + 1, packed.last[11] + 1)):
        assert sorted(packed.ids[a:b]) == sorted(generic.ids[a:b])
    targets = ids > 3
    assert metrics.auroc(x, targets) == pytest.approx(roc_auc_score(targets, x), abs=1e-12)
    assert metrics.average_precision(x, targets) == pytest.approx(average_precision_score(targets, x), abs=1e-12)


def test_torch_sort_ranks_exactly_as_numpy():
    """The device path (torch keys, here on the CPU; on CUDA the same ops) gives the very same ranking:
    values, ids in the same order within ties, and tie groups; and so the same metrics."""
    rng = np.random.default_rng(4)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 1.0, -1.0, 3.4e38, -3.4e38], np.float32)
    x = np.r_[rng.normal(size=5000).astype(np.float32), np.round(rng.normal(size=5000), 1).astype(np.float32),
              special, special]
    for ids in (rng.integers(0, 2**31 - 1, x.size), rng.integers(0, 2, x.size).astype(bool)):
        a, b = metrics.rank(x, ids), metrics.rank(x, ids, device="cpu")
        np.testing.assert_array_equal(a.values.view(np.uint32), b.values.view(np.uint32))  # -0.0 vs 0.0 too
        np.testing.assert_array_equal(a.ids.astype(np.int64), b.ids.astype(np.int64))
        np.testing.assert_array_equal(a.last, b.last)
    maps, masks, labels = fixture(seed=5)[:3]
    assert metrics.evaluate(maps, masks, labels, device="cpu") == metrics.evaluate(maps, masks, labels)


def test_regions_do_not_connect_across_images():
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 2:5, 2:5] = masks[1, 2:5, 2:5] = True  # the same place in two images: two regions
    masks[2, 0, 0] = masks[2, 1, 1] = True  # diagonal neighbours: one region (8-connectivity)
    masks[2, 6, 6] = True
    labels, n = metrics.label_regions(masks)
    assert n == 4
    assert [len(np.unique(labels[i][masks[i]])) for i in range(3)] == [1, 1, 2]


def test_shared_ranking_gives_the_same_results():
    maps, masks, labels = fixture(8, n=8, size=32)
    ranking = metrics.pixel_ranking(maps, masks)
    assert metrics.evaluate(maps, masks, labels, ranking=ranking) == metrics.evaluate(maps, masks, labels)
    assert metrics.f1_max_threshold(maps.ravel(), masks.ravel(), ranking) == \
        metrics.f1_max_threshold(maps.ravel().astype(np.float64), masks.ravel())


# -------------------------------------------------------------------------------------- hand-worked cases

def test_perfect_map_scores_one():
    _, masks, labels = fixture(1)
    result = metrics.evaluate(masks.astype(np.float32), masks, labels, scores=labels.astype(float))
    assert all(v == pytest.approx(1.0) for v in result.values())


def test_inverted_map():
    _, masks, labels = fixture(2)
    inverted = (~masks).astype(np.float32)
    assert metrics.auroc(inverted.ravel(), masks.ravel()) == pytest.approx(0.0)
    assert metrics.pro(inverted, masks) == pytest.approx(0.0)
    assert metrics.auroc(-labels.astype(float), labels) == pytest.approx(0.0)


def test_constant_map():
    _, masks, labels = fixture(3)
    const = np.zeros(masks.shape, np.float32)
    assert metrics.auroc(const.ravel(), masks.ravel()) == pytest.approx(0.5)
    assert metrics.average_precision(const.ravel(), masks.ravel()) == pytest.approx(masks.mean())
    # Constant map: the only curve point is (FPR 1, PRO 1); the line from (0, 0) reaches PRO 0.3 at FPR
    # 0.3, so the area is 0.3 * 0.3 / 2 = 0.045, normalised 0.15.
    assert metrics.pro(const, masks) == pytest.approx(0.15)
    iap, iap90 = metrics.instance_average_precision(const, masks)
    assert iap == pytest.approx(masks.mean()) and iap90 == pytest.approx(masks.mean())


def test_pro_never_above_one():
    maps, masks, _ = fixture(4)
    maps[masks] = 10.0
    assert metrics.pro(maps, masks) <= 1.0


def test_iap_tiny_by_hand():
    # One image, two instances: A (2 px, preds 0.9, 0.8) and B (1 px, pred 0.3); one normal pixel at 0.5.
    maps = np.array([[[0.9, 0.8, 0.0, 0.5, 0.0, 0.3]]], np.float32)
    masks = np.array([[[1, 1, 0, 0, 0, 1]]], bool)
    # Instance scores: A -> index floor(0.5*2)=1 of [0.9, 0.8] = 0.8; B -> 0.3. Ascending [0.3, 0.8].
    # At 0.3: pixels >= 0.3 are 0.9, 0.8, 0.5, 0.3 -> 3 of 4 in GT; at 0.8: 2 of 2. Precision [0.75, 1].
    iap, iap90 = metrics.instance_average_precision(maps, masks)
    assert iap == pytest.approx(0.875)
    assert iap90 == pytest.approx(0.75)  # recall >= 0.9 only at i = 0


def test_f1_max_threshold():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    targets = np.array([0, 0, 1, 1])
    thr, f1 = metrics.f1_max_threshold(scores, targets)
    assert thr == pytest.approx(0.35) and f1 == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------- edge cases

def test_errors_are_specific():
    maps, masks, labels = fixture(0)
    with pytest.raises(MetricError, match="no defect region|at least one defect"):
        metrics.pro(maps, np.zeros_like(masks))
    with pytest.raises(MetricError, match="both positive and negative"):
        metrics.auroc(np.ones(4), np.zeros(4))
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(MetricError, match="NaN or infinite"):
        metrics.evaluate(bad, masks, labels)
    bad[0, 0, 0] = np.inf
    with pytest.raises(MetricError, match="NaN or infinite"):
        metrics.pro(bad, masks)
    with pytest.raises(MetricError, match="differ in shape"):
        metrics.evaluate(maps[:, :10], masks, labels)
    with pytest.raises(MetricError, match="labels"):
        metrics.evaluate(maps, masks, labels[:-1])
    with pytest.raises(MetricError, match="only 0 and 1"):
        metrics.evaluate(maps, masks.astype(int) * 2, labels)


def test_evaluate_cli(tmp_path, capsys):
    maps, masks, labels = fixture(5)
    path = tmp_path / "preds.npz"
    np.savez(path, maps=maps, masks=masks.astype(np.uint8), labels=labels)
    assert main(["evaluate", "--predictions", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90"}
    assert all(0 <= v <= 1 for v in out.values())
    assert out["pro"] == pytest.approx(pro_reference(maps, masks), abs=1e-10)
    np.savez(path, maps=maps, labels=labels)
    assert main(["evaluate", "--predictions", str(path)]) == 2
    assert "missing array(s) ['masks']" in capsys.readouterr().err
