"""Metrics: hand-counted tiny arrays, the HoVer-Net reference loops, and properties."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.maml import run
from napari_metahistoseg.metrics import (
    ConfusionAccumulator,
    InstanceAccumulator,
    PairCounter,
    _Counts,
    aji,
    aji_plus,
    classification_scores,
    detection_scores,
    panoptic_quality,
    score_strips,
)

# ------------------------------------------------------------------------------ slow references (HoVer-Net loops)


def slow_pairwise(true, pred):
    t_ids = [i for i in np.unique(true) if i != 0]
    p_ids = [i for i in np.unique(pred) if i != 0]
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for a, t in enumerate(t_ids):
        for b, p in enumerate(p_ids):
            tm, pm = true == t, pred == p
            if (tm & pm).any():
                inter[a, b] = (tm & pm).sum()
                union[a, b] = (tm | pm).sum()
    return t_ids, p_ids, inter, union


def slow_aji(true, pred):
    t_ids, p_ids, inter, union = slow_pairwise(true, pred)
    total_i, total_u, used_t, used_p = 0.0, 0.0, set(), set()
    if len(t_ids) and len(p_ids):
        iou = inter / (union + 1.0e-6)
        for a in range(len(t_ids)):
            b = int(np.argmax(iou[a]))
            if iou[a, b] > 0:
                total_i += inter[a, b]
                total_u += union[a, b]
                used_t.add(a)
                used_p.add(b)
    total_u += sum((true == t).sum() for a, t in enumerate(t_ids) if a not in used_t)
    total_u += sum((pred == p).sum() for b, p in enumerate(p_ids) if b not in used_p)
    return 1.0 if total_u == 0 else total_i / total_u


def slow_pq(true, pred, thr=0.5):
    t_ids, p_ids, inter, union = slow_pairwise(true, pred)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    matched = iou[iou > thr]
    tp, fp, fn = matched.size, len(p_ids) - matched.size, len(t_ids) - matched.size
    if tp + fp + fn == 0:
        return 1.0
    return tp / (tp + 0.5 * fp + 0.5 * fn) * (matched.sum() / tp if tp else 0.0)


# ------------------------------------------------------------------------------------------------ semantic

TRUTH = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [IGNORE] * 4], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=np.uint8)


def test_confusion_hand_counted():
    acc = ConfusionAccumulator(3)  # class 2 absent from both: excluded from the mean, not counted as 0
    acc.update(PRED, TRUTH)
    iou = acc.per_class_iou()
    assert iou[0] == pytest.approx(7 / 9) and iou[1] == pytest.approx(3 / 5) and np.isnan(iou[2])
    assert acc.miou() == pytest.approx((7 / 9 + 3 / 5) / 2)
    assert acc.dice_foreground() == pytest.approx(2 * 3 / (4 + 4))
    assert acc.pixel_accuracy() == pytest.approx(10 / 12)
    assert acc.matrix.sum() == 12  # the IGNORE row was skipped although pred is 1 there


def test_confusion_pools_pixels_over_images():
    acc = ConfusionAccumulator(2)
    acc.update(np.ones((1, 2), int), np.array([[1, 0]]))  # IoU1 = 1/2
    acc.update(np.ones((1, 4), int), np.ones((1, 4), int))  # IoU1 = 1
    assert acc.per_class_iou()[1] == pytest.approx(5 / 6)  # pooled, not (1/2 + 1)/2


def test_confusion_identical_and_disjoint():
    t = np.array([[0, 1], [1, 1]])
    acc = ConfusionAccumulator(2)
    acc.update(t, t)
    assert acc.miou() == 1.0 and acc.dice_foreground() == 1.0
    acc = ConfusionAccumulator(2)
    acc.update(1 - t, t)
    assert acc.miou() == 0.0 and acc.dice_foreground() == 0.0 and acc.pixel_accuracy() == 0.0


def test_confusion_empty_and_errors():
    acc = ConfusionAccumulator(2)
    assert np.isnan(acc.miou()) and np.isnan(acc.dice_foreground())
    acc.update(np.zeros((2, 2), int), np.zeros((2, 2), int))
    assert acc.dice_foreground() == 1.0 and acc.miou() == 1.0
    with pytest.raises(ValueError, match="shapes"):
        acc.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="pred classes"):
        acc.update(np.full((2, 2), 2), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="truth classes"):
        acc.update(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="integer"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        ConfusionAccumulator(0)


# ------------------------------------------------------------------------------------------------ instance

T4 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
P4 = np.array([[5, 5, 5, 0], [5, 5, 0, 0], [0, 0, 0, 0], [7, 0, 0, 9]])


def test_aji_pq_hand_counted():
    # truth 1 ↔ pred 5: inter 4, union 5; truth 2 ↔ pred 9: inter 1, union 4; pred 7 unpaired (area 1)
    assert aji(T4, P4) == pytest.approx(5 / 10)
    pq = panoptic_quality(T4, P4)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 2, 1)
    assert pq["dq"] == pytest.approx(1 / 2.5) and pq["sq"] == pytest.approx(0.8)
    assert pq["pq"] == pytest.approx(0.32)


def test_aji_counts_a_shared_prediction_twice():
    t = np.array([[1, 1, 2, 2]])
    p = np.array([[3, 3, 3, 3]])
    assert aji(t, p) == pytest.approx((2 + 2) / (4 + 4))  # HoVer-Net/MoNuSeg over-penalisation
    assert aji_plus(t, p) == pytest.approx(2 / (4 + 2))


def test_identical_disjoint_and_empty():
    assert aji(T4, T4) == 1.0 and panoptic_quality(T4, T4)["pq"] == 1.0
    shifted = np.roll(T4, 1, axis=1) * (np.roll(T4, 1, axis=1) != T4)
    disjoint = np.array([[0, 0, 3, 3], [0, 0, 3, 3], [4, 4, 0, 0], [4, 4, 0, 0]])
    assert aji(T4, disjoint) == 0.0 and panoptic_quality(T4, disjoint)["pq"] == 0.0
    assert aji(T4, shifted) < 1.0
    empty = np.zeros_like(T4)
    assert aji(empty, empty) == 1.0 and panoptic_quality(empty, empty)["pq"] == 1.0
    assert aji(T4, empty) == 0.0 and panoptic_quality(T4, empty)["fn"] == 2


def test_instance_errors():
    with pytest.raises(ValueError, match="shapes"):
        aji(np.zeros((2, 2), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="non-negative"):
        panoptic_quality(-np.ones((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        aji(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(T4, P4, iou_threshold=1.5)


def test_large_ids_and_low_threshold():
    big = np.where(T4 > 0, T4.astype(np.uint64) + (1 << 40), 0)
    assert aji(big, P4) == pytest.approx(0.5)
    low = panoptic_quality(T4, P4, iou_threshold=0.2)  # Hungarian path: truth 2 ↔ pred 9 (IoU .25) now matches
    assert (low["tp"], low["fp"], low["fn"]) == (2, 1, 0)


label_maps = arrays(np.int32, (7, 6), elements=st.integers(0, 5))


@settings(max_examples=60, deadline=None)
@given(label_maps, label_maps)
def test_aji_pq_match_reference_loops(t, p):
    a = aji(t, p)
    assert a == pytest.approx(slow_aji(t, p), abs=1e-9)
    assert 0.0 <= a <= 1.0
    pq = panoptic_quality(t, p)
    assert pq["pq"] == pytest.approx(slow_pq(t, p), abs=1e-9)
    assert all(0.0 <= pq[k] <= 1.0 for k in ("pq", "dq", "sq"))
    assert 0.0 <= aji_plus(t, p) <= 1.0


@settings(max_examples=40, deadline=None)
@given(label_maps)
def test_self_comparison_is_perfect(x):
    assert aji(x, x) == pytest.approx(1.0)
    assert panoptic_quality(x, x)["pq"] == pytest.approx(1.0)
    assert aji_plus(x, x) == pytest.approx(1.0)


def random_instances(rng, shape=(1000, 1000), n=400):
    out = np.zeros(shape, np.uint32)
    rr, cc = np.mgrid[:15, :15]
    disc = (rr - 7) ** 2 + (cc - 7) ** 2 <= 49
    for i, (r, c) in enumerate(rng.integers(0, shape[0] - 15, size=(n, 2)), start=1):
        out[r:r + 15, c:c + 15][disc] = i
    return out


def test_aji_pq_fast_on_a_full_tile():
    rng = np.random.default_rng(0)
    t = random_instances(rng)
    p = np.roll(random_instances(rng), 3, axis=0)
    start = time.process_time()  # CPU time: robust to other jobs on a shared machine
    aji(t, p)
    panoptic_quality(t, p)
    assert time.process_time() - start < 0.5


def test_instance_accumulator():
    acc = InstanceAccumulator()
    acc.update(T4, P4)
    acc.update(T4, T4)
    acc.update(np.zeros((4, 4), int), np.zeros((4, 4), int))  # empty image: left out of the means
    res = acc.results()
    assert res["n_images"] == 2 and res["n_empty"] == 1
    assert res["aji"] == pytest.approx((0.5 + 1.0) / 2)  # per-image mean
    assert res["aji_pooled"] == pytest.approx((5 + 8) / (10 + 8))
    assert res["pq"] == pytest.approx((0.32 + 1.0) / 2)
    assert res["dice"] == pytest.approx((2 * 5 / (8 + 7) + 1.0) / 2)


@settings(max_examples=60, deadline=None)
@given(label_maps, label_maps, st.integers(1, 8))
def test_pair_counter_over_strips_equals_whole_maps(t, p, strip):
    counter = PairCounter()
    for r0 in range(0, t.shape[0], strip):
        counter.add(t[r0:r0 + strip], p[r0:r0 + strip])
    assert counter.aji() == pytest.approx(aji(t, p), abs=1e-12)
    assert counter.panoptic_quality() == pytest.approx(panoptic_quality(t, p))
    assert counter.panoptic_quality(0.2) == pytest.approx(panoptic_quality(t, p, iou_threshold=0.2))


def test_pair_counter_merges_pending_counts(monkeypatch):
    monkeypatch.setattr(_Counts, "merge_min", 1)  # merge after (almost) every strip
    rng = np.random.default_rng(1)
    t = random_instances(rng, (200, 200), 40)
    p = np.roll(random_instances(rng, (200, 200), 40), 2, axis=1)
    counter = PairCounter()
    for r0 in range(0, 200, 9):
        counter.add(t[r0:r0 + 9], p[r0:r0 + 9])
    assert counter.aji() == pytest.approx(aji(t, p), abs=1e-12)
    assert counter.panoptic_quality()["pq"] == pytest.approx(panoptic_quality(t, p)["pq"], abs=1e-12)


def test_pair_counter_errors_and_empty():
    counter = PairCounter()
    assert counter.aji() == 1.0 and counter.panoptic_quality()["pq"] == 1.0  # nothing added: both empty
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        counter.add(np.full((2, 2), 1 << 33, np.uint64), np.zeros((2, 2), np.uint32))
    with pytest.raises(ValueError, match="equal"):
        counter.add(np.zeros((2, 2), int), np.zeros((2, 3), int))


class _Lazy:
    """An array that can only be read in slices (as a zarr or dask array), counting what was read."""

    def __init__(self, a):
        self.a, self.shape, self.read = a, a.shape, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.a[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("read whole")


def test_score_strips_equals_whole_map_metrics():
    rng = np.random.default_rng(2)
    t_inst = random_instances(rng, (300, 300), 60)
    p_inst = np.roll(random_instances(rng, (300, 300), 60), 4, axis=0)
    truth = (t_inst > 0).astype(np.uint8)
    truth[:20] = IGNORE
    pred = (p_inst > 0).astype(np.uint8) * 2  # class 2 beyond n_classes: the matrix grows
    lazy = [_Lazy(a) for a in (pred, truth, p_inst, t_inst)]
    progress = []
    out = run(score_strips(*lazy, n_classes=2, strip_rows=64), progress.append)
    assert [p["done"] for p in progress] == [1, 2, 3, 4, 5] and progress[-1]["total"] == 5
    assert all(len(x.read) == 5 for x in lazy)  # strips only
    acc = ConfusionAccumulator(3)
    acc.update(pred, truth)
    assert out["miou"] == pytest.approx(acc.miou()) and out["dice"] == pytest.approx(acc.dice_foreground())
    assert out["accuracy"] == pytest.approx(acc.pixel_accuracy())
    assert out["aji"] == pytest.approx(aji(t_inst, p_inst))
    pq = panoptic_quality(t_inst, p_inst)
    assert (out["pq"], out["dq"], out["sq"]) == pytest.approx((pq["pq"], pq["dq"], pq["sq"]))


def test_score_strips_converts_truth_and_checks_shapes():
    truth = np.array([[0, 2], [2, 0]], np.uint8)  # support convention: 0 unknown, 1 + class
    pred = np.array([[0, 1], [1, 1]], np.uint8)
    out = _drain(score_strips(pred, truth, truth_to_classes=lambda t: np.where(t == 0, IGNORE, t - 1)))
    assert out["miou"] == 1.0  # only the two painted pixels count
    with pytest.raises(ValueError, match="differ in size"):
        _drain(score_strips(pred, truth[:1]))
    with pytest.raises(ValueError, match="differ in size"):
        _drain(score_strips(None, None, pred, np.zeros((2, 2, 1), np.uint8)))
    assert _drain(score_strips()) == {}


def test_score_strips_excludes_pixels_from_the_semantic_scores_only():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, (50, 40)).astype(np.uint8)
    pred = truth.copy()
    pred[10:20] = 1 - pred[10:20]  # wrong only where the "support strokes" are
    painted = np.zeros(truth.shape, np.uint8)
    painted[10:20] = 3
    inst = (np.arange(50 * 40).reshape(50, 40) // 100 + 1).astype(np.int32)
    full = _drain(score_strips(pred, truth, inst, inst, n_classes=2, strip_rows=7))
    held = _drain(score_strips(pred, truth, inst, inst, n_classes=2, strip_rows=7, exclude=_Lazy(painted)))
    assert full["miou"] < 0.9 and held["miou"] == 1.0 and held["accuracy"] == 1.0
    assert held["aji"] == full["aji"] == 1.0  # instance scores are not affected
    with pytest.raises(ValueError, match="excluded pixels"):
        _drain(score_strips(pred, truth, exclude=painted[:5]))


def _drain(gen):
    return run(gen)


# ------------------------------------------------------------------------------------------------ detection


def test_detection_maximal_matching_and_ties():
    # greedy nearest-first would pair B–X and leave A, Y unmatched; the Hungarian matching finds A–X and B–Y
    pred = np.array([[0, 0], [0, 4]])
    true = np.array([[0, 3], [0, 7]])
    s = detection_scores(pred, true, radius=3.5)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0) and s["f1"] == 1.0
    # a tie: two predictions equally close to one truth → exactly one match
    s = detection_scores(np.array([[0, 0], [0, 10]]), np.array([[0, 5]]), radius=5)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["precision"] == 0.5 and s["recall"] == 1.0 and s["f1"] == pytest.approx(2 / 3)
    s = detection_scores(np.array([[0, 0]]), np.array([[0, 5.01]]), radius=5)  # beyond radius
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)


def test_detection_empty_cases_and_errors():
    none = np.zeros((0, 2))
    assert detection_scores(none, none, 5)["f1"] == 1.0
    s = detection_scores(none, np.array([[1, 1]]), 5)
    assert s["precision"] == s["recall"] == s["f1"] == 0.0 and s["fn"] == 1
    s = detection_scores(np.array([[1, 1]]), none, 5)
    assert s["precision"] == s["recall"] == s["f1"] == 0.0 and s["fp"] == 1
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        detection_scores(np.zeros((3, 3)), none, 5)
    with pytest.raises(ValueError, match="radius"):
        detection_scores(none, none, -1)


# ------------------------------------------------------------------------------------------------ classification


def test_classification_scores_hand_counted():
    y_true = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    y_pred = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    s = classification_scores(y_true, y_pred)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    # balanced accuracy ignores classes absent from the truth
    s = classification_scores(np.array([0, 0, 1]), np.array([0, 2, 1]), n_classes=3)
    assert s["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    s = classification_scores(np.array([0, 0]), np.array([0, 0]))
    assert s["precision"] == s["recall"] == s["f1"] == 1.0  # nothing to find, nothing wrongly found


def test_classification_errors():
    with pytest.raises(ValueError, match="non-empty"):
        classification_scores(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="y_pred labels"):
        classification_scores(np.array([0, 1]), np.array([0, 2]))
    with pytest.raises(ValueError, match="positive"):
        classification_scores(np.array([0, 1]), np.array([0, 1]), positive=2)
