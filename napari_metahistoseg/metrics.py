"""Evaluation metrics: semantic (mIoU, Dice), instance (AJI, PQ), detection and classification scores.

Conventions
-----------
* Semantic maps are ``(H, W)`` integer class ids; truth pixels equal to :data:`~napari_metahistoseg.data.task.IGNORE`
  (255) are skipped by every semantic metric.
* Instance maps are ``(H, W)`` non-negative integer arrays, 0 = background; ids need not be contiguous.
* AJI and PQ follow the HoVer-Net repository (``metrics/stats_utils.py``: ``get_fast_aji``, ``get_fast_pq``),
  computed from one sparse pairwise-intersection table instead of per-instance full-image masks.
* "Nothing to compare" (empty truth *and* empty prediction) counts as perfect agreement (1.0) for AJI, PQ, Dice
  and detection scores; :class:`InstanceAccumulator` leaves such images out of its per-image means.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from napari_metahistoseg.data.task import IGNORE

_DENSE_ID_LIMIT = 1 << 22  # instance ids up to this are counted with bincount; larger ones with np.unique


# ------------------------------------------------------------------------------------------------ semantic


class ConfusionAccumulator:
    """Confusion matrix accumulated over a whole evaluation set (pixels pooled over images, as in MetaHistoSeg).

    ``matrix[t, p]`` counts pixels of truth class ``t`` predicted as ``p``.
    """

    def __init__(self, n_classes: int) -> None:
        if int(n_classes) != n_classes or n_classes < 1:
            raise ValueError(f"ConfusionAccumulator: n_classes must be a positive int, got {n_classes!r}")
        self.n_classes = int(n_classes)
        self.matrix = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: ``pred`` and ``truth`` are ``(H, W)`` integer class ids; truth == IGNORE is skipped."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.ndim != 2 or pred.shape != truth.shape:
            raise ValueError(f"ConfusionAccumulator.update: pred {pred.shape} and truth {truth.shape} must be "
                             "equal (H, W) shapes")
        _check_integer(pred, "pred")
        _check_integer(truth, "truth")
        keep = truth != IGNORE
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        n = self.n_classes
        if t.size and (t.min() < 0 or t.max() >= n):
            raise ValueError(f"ConfusionAccumulator.update: truth classes must be in [0, {n}) or {IGNORE}, "
                             f"got range [{t.min()}, {t.max()}]")
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"ConfusionAccumulator.update: pred classes must be in [0, {n}), "
                             f"got range [{p.min()}, {p.max()}] on labelled pixels")
        self.matrix += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def grow_to(self, n_classes: int) -> None:
        """Make room for class ids up to ``n_classes - 1`` (counts kept; absent classes do not change the scores)."""
        if n_classes > self.n_classes:
            grown = np.zeros((n_classes, n_classes), dtype=np.int64)
            grown[: self.n_classes, : self.n_classes] = self.matrix
            self.matrix, self.n_classes = grown, int(n_classes)

    def per_class_iou(self) -> np.ndarray:
        """``(n_classes,) float64`` IoU per class; nan for classes absent from both truth and prediction."""
        inter = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction (absent classes are excluded, not 0).

        nan if no labelled pixel was seen.
        """
        iou = self.per_class_iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def dice_foreground(self) -> float:
        """Binary Dice of (class > 0) in prediction vs truth; 1.0 if neither has foreground, nan if no pixels."""
        m = self.matrix
        if m.sum() == 0:
            return float("nan")
        inter = m[1:, 1:].sum()
        total = m[1:, :].sum() + m[:, 1:].sum()
        return 1.0 if total == 0 else float(2.0 * inter / total)

    def pixel_accuracy(self) -> float:
        """Fraction of labelled pixels predicted correctly; nan if no pixels."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")


# ------------------------------------------------------------------------------------------------ instance


@dataclass(frozen=True)
class _PairTable:
    """Sparse overlap table of two instance maps (only pairs that share at least one pixel)."""

    true_area: np.ndarray  # (T,) int64 area of each truth instance
    pred_area: np.ndarray  # (P,) int64 area of each predicted instance
    ti: np.ndarray  # (K,) index into true_area of each overlapping pair
    pi: np.ndarray  # (K,) index into pred_area
    inter: np.ndarray  # (K,) int64 intersection of the pair

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.ti] + self.pred_area[self.pi] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _check_integer(a: np.ndarray, name: str) -> None:
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")


def _check_instances(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(f"instance maps must be equal (H, W) shapes, got truth {truth.shape}, pred {pred.shape}")
    for a, name in ((truth, "truth_inst"), (pred, "pred_inst")):
        _check_integer(a, name)
        if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
            raise ValueError(f"{name} must be non-negative (0 = background), got min {a.min()}")
    return truth.ravel(), pred.ravel()


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``labels`` (N,) ints ≥ 0 → (index (N,) int64 with -1 for background, area per present id (K,), the present
    ids (K,) in increasing order)."""
    top = int(labels.max()) if labels.size else 0
    if top <= _DENSE_ID_LIMIT:
        labels = labels.astype(np.intp, copy=False)
        counts = np.bincount(labels, minlength=top + 1)
        counts[0] = 0
        present = np.flatnonzero(counts)
        lut = np.full(top + 1, -1, dtype=np.int64)
        lut[present] = np.arange(present.size)
        return lut[labels], counts[present].astype(np.int64), present
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    index = inverse.astype(np.int64) - (1 if ids[0] == 0 else 0)
    fg = slice(1, None) if ids[0] == 0 else slice(None)
    return index, counts[fg].astype(np.int64), ids[fg]


def _pair_table(truth: np.ndarray, pred: np.ndarray) -> _PairTable:
    t, p = _check_instances(truth, pred)
    ti, t_area, _ = _compact(t)
    pi, p_area, _ = _compact(p)
    both = (ti >= 0) & (pi >= 0)
    key = ti[both] * max(p_area.size, 1) + pi[both]
    keys, inter = np.unique(key, return_counts=True)
    return _PairTable(t_area, p_area, keys // max(p_area.size, 1), keys % max(p_area.size, 1),
                      inter.astype(np.int64))


class _Counts:
    """Pixel counts per integer key, summed over many additions (merged when the pending part outgrows the total,
    so the cost stays proportional to the number of distinct keys)."""

    merge_min = 1 << 16  # pending keys that always wait for the next merge

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((keys.astype(np.uint64), counts.astype(np.int64)))
        self._n += keys.size
        if self._n > max(self.keys.size, self.merge_min):
            self.merge()

    def merge(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pending:
            keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
            counts = np.concatenate([self.counts] + [c for _, c in self._pending])
            self.keys, inverse = np.unique(keys, return_inverse=True)
            self.counts = np.bincount(inverse.ravel(), weights=counts, minlength=self.keys.size).astype(np.int64)
            self._pending, self._n = [], 0
        return self.keys, self.counts


_ID_BITS = 32


class PairCounter:
    """The overlap table of two instance maps accumulated piece by piece, e.g. over the row strips of a slide.

    Pixel counts per truth instance, per predicted instance and per overlapping pair add up over pieces, so
    :meth:`add` on the strips of two maps followed by :meth:`aji` / :meth:`panoptic_quality` gives exactly the
    scores of :func:`aji` / :func:`panoptic_quality` on the whole maps, with memory proportional to the number of
    instances instead of pixels. Instance ids must be below 2**32 (uint32 maps).
    """

    def __init__(self) -> None:
        self._true, self._pred, self._pairs = _Counts(), _Counts(), _Counts()

    def add(self, truth_inst: np.ndarray, pred_inst: np.ndarray) -> None:
        """Count one piece: equal-shape integer instance maps (0 = background)."""
        t, p = _check_instances(truth_inst, pred_inst)
        ti, t_area, t_ids = _compact(t)
        pi, p_area, p_ids = _compact(p)
        for ids, name in ((t_ids, "truth_inst"), (p_ids, "pred_inst")):
            if ids.size and int(ids[-1]) >= 1 << _ID_BITS:
                raise ValueError(f"{name}: instance ids must be below 2**{_ID_BITS} to be counted piece by piece, "
                                 f"got {int(ids[-1])}")
        self._true.add(t_ids, t_area)
        self._pred.add(p_ids, p_area)
        both = (ti >= 0) & (pi >= 0)
        key = (t_ids[ti[both]].astype(np.uint64) << np.uint64(_ID_BITS)) | p_ids[pi[both]].astype(np.uint64)
        keys, inter = np.unique(key, return_counts=True)
        self._pairs.add(keys, inter)

    def table(self) -> _PairTable:
        t_ids, t_area = self._true.merge()
        p_ids, p_area = self._pred.merge()
        keys, inter = self._pairs.merge()
        ti = np.searchsorted(t_ids, keys >> np.uint64(_ID_BITS)).astype(np.int64)
        pi = np.searchsorted(p_ids, keys & np.uint64((1 << _ID_BITS) - 1)).astype(np.int64)
        return _PairTable(t_area, p_area, ti, pi, inter)

    def aji(self) -> float:
        """:func:`aji` of everything added."""
        return _aji_of(self.table())

    def panoptic_quality(self, iou_threshold: float = 0.5) -> dict:
        """:func:`panoptic_quality` of everything added."""
        return _pq_of(self.table(), iou_threshold)


def _aji_terms(tab: _PairTable) -> tuple[float, float]:
    """(overall intersection, overall union) of the HoVer-Net AJI."""
    if tab.ti.size == 0:
        return 0.0, float(tab.true_area.sum() + tab.pred_area.sum())
    iou = tab.inter / (tab.union + 1.0e-6)  # the same epsilon as get_fast_aji, so ties break identically
    # per truth: best pred = max IoU, ties → smallest pred index (np.argmax on a dense row)
    order = np.lexsort((tab.pi, -iou, tab.ti))
    first = np.ones(order.size, dtype=bool)
    first[1:] = tab.ti[order[1:]] != tab.ti[order[:-1]]
    best = order[first]
    inter = float(tab.inter[best].sum())
    union = float(tab.union[best].sum())
    unpaired_true = np.ones(tab.true_area.size, dtype=bool)
    unpaired_true[tab.ti[best]] = False
    unpaired_pred = np.ones(tab.pred_area.size, dtype=bool)
    unpaired_pred[tab.pi[best]] = False
    union += float(tab.true_area[unpaired_true].sum() + tab.pred_area[unpaired_pred].sum())
    return inter, union


def aji(truth_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (HoVer-Net ``get_fast_aji``; the MoNuSeg version, one pred may serve many truths).

    Each truth instance is paired with the overlapping prediction of highest IoU; the pairs' intersections and
    unions are summed, and the areas of unpaired truth and prediction instances are added to the union.
    ``truth_inst``, ``pred_inst``: ``(H, W)`` non-negative integer instance maps. Returns a float in [0, 1]
    (1.0 when both maps are empty).
    """
    return _aji_of(_pair_table(truth_inst, pred_inst))


def _aji_of(tab: _PairTable) -> float:
    inter, union = _aji_terms(tab)
    return 1.0 if union == 0 else inter / union


def _pq_terms(tab: _PairTable, iou_threshold: float) -> tuple[int, int, int, float]:
    """(tp, fp, fn, sum of matched IoU) with unique matching at IoU > iou_threshold."""
    iou = tab.iou
    if iou_threshold >= 0.5:  # IoU > 0.5 pairs are provably unique
        matched = iou[iou > iou_threshold]
    elif iou.size:
        dense = np.zeros((tab.true_area.size, tab.pred_area.size))
        dense[tab.ti, tab.pi] = iou
        r, c = linear_sum_assignment(-dense)
        matched = dense[r, c]
        matched = matched[matched > iou_threshold]
    else:
        matched = iou
    tp = int(matched.size)
    return tp, int(tab.pred_area.size) - tp, int(tab.true_area.size) - tp, float(matched.sum())


def _pq_from_terms(tp: int, fp: int, fn: int, iou_sum: float) -> dict:
    if tp + fp + fn == 0:
        return dict(pq=1.0, dq=1.0, sq=1.0, tp=0, fp=0, fn=0)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return dict(pq=dq * sq, dq=dq, sq=sq, tp=tp, fp=fp, fn=fn)


def panoptic_quality(truth_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Panoptic quality (HoVer-Net ``get_fast_pq``): PQ = DQ × SQ with unique matching at IoU > ``iou_threshold``.

    For thresholds ≥ 0.5 every pair above the threshold is unique; below 0.5 a maximal-IoU Hungarian matching is
    used. Returns ``dict(pq, dq, sq, tp, fp, fn)`` (floats and ints); SQ is the mean IoU of matched pairs (0 if
    none). Both maps empty → pq = dq = sq = 1.0.
    """
    return _pq_of(_pair_table(truth_inst, pred_inst), iou_threshold)


def _pq_of(tab: _PairTable, iou_threshold: float) -> dict:
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"panoptic_quality: iou_threshold must be in [0, 1), got {iou_threshold}")
    return _pq_from_terms(*_pq_terms(tab, iou_threshold))


def aji_plus(truth_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """AJI+ (HoVer-Net ``get_fast_aji_plus``): like :func:`aji` but with a one-to-one (Hungarian, max IoU) pairing."""
    tab = _pair_table(truth_inst, pred_inst)
    if tab.ti.size == 0:
        union = float(tab.true_area.sum() + tab.pred_area.sum())
        return 1.0 if union == 0 else 0.0
    dense = np.zeros((tab.true_area.size, tab.pred_area.size))
    k = np.full(dense.shape, -1, dtype=np.int64)
    dense[tab.ti, tab.pi] = tab.inter / (tab.union + 1.0e-6)
    k[tab.ti, tab.pi] = np.arange(tab.ti.size)
    r, c = linear_sum_assignment(-dense)
    pairs = k[r, c][dense[r, c] > 0]
    inter = float(tab.inter[pairs].sum())
    union = float(tab.union[pairs].sum())
    union += float(tab.true_area.sum() - tab.true_area[tab.ti[pairs]].sum())
    union += float(tab.pred_area.sum() - tab.pred_area[tab.pi[pairs]].sum())
    return inter / union


class InstanceAccumulator:
    """AJI, PQ and foreground Dice over an evaluation set.

    The dataset scores (:meth:`results`) are **per-image means**, as reported in the HoVer-Net paper; images where
    both truth and prediction are empty are left out of the means (counted in ``n_empty``). The pooled AJI
    (intersections and unions summed over all images before dividing) is also reported as ``aji_pooled``.
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"InstanceAccumulator: iou_threshold must be in [0, 1), got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.per_image: list[dict] = []
        self.n_empty = 0
        self._inter = 0.0
        self._union = 0.0

    def update(self, truth_inst: np.ndarray, pred_inst: np.ndarray) -> dict:
        """Score one ``(H, W)`` pair of instance maps; returns (and stores) its ``dict(aji, dice, pq, dq, sq, ...)``."""
        tab = _pair_table(truth_inst, pred_inst)
        if tab.true_area.size == 0 and tab.pred_area.size == 0:
            self.n_empty += 1
            return dict(aji=1.0, dice=1.0, **_pq_from_terms(0, 0, 0, 0.0))
        inter, union = _aji_terms(tab)
        self._inter += inter
        self._union += union
        fg_total = tab.true_area.sum() + tab.pred_area.sum()
        row = dict(aji=inter / union, dice=float(2.0 * tab.inter.sum() / fg_total),
                   **_pq_from_terms(*_pq_terms(tab, self.iou_threshold)))
        self.per_image.append(row)
        return row

    def results(self) -> dict:
        """Per-image means of aji, dice, pq, dq, sq; plus aji_pooled, n_images and n_empty (nan means if no images)."""
        out = {}
        for key in ("aji", "dice", "pq", "dq", "sq"):
            vals = [r[key] for r in self.per_image]
            out[key] = float(np.mean(vals)) if vals else float("nan")
        out["aji_pooled"] = self._inter / self._union if self._union else float("nan")
        out["n_images"] = len(self.per_image)
        out["n_empty"] = self.n_empty
        return out


def _strip(a: Any, r0: int, r1: int) -> np.ndarray:
    return np.asarray(a[r0:r1])


def score_strips(pred: Any = None, truth: Any = None, pred_inst: Any = None, truth_inst: Any = None, *,
                 n_classes: int = 1, truth_to_classes: Callable[[np.ndarray], np.ndarray] | None = None,
                 strip_rows: int = 1024, iou_threshold: float = 0.5,
                 exclude: Any = None) -> Generator[dict, None, dict]:
    """Semantic scores of ``pred`` vs ``truth`` class maps and instance scores of ``pred_inst`` vs ``truth_inst``,
    reading the ``(H, W)`` array-likes (numpy, zarr, dask: anything sliced by ``a[r0:r1]``) ``strip_rows`` rows
    at a time, so a slide-sized pair is never in memory whole; the result equals the whole-map metrics.

    Either pair may be None. ``truth_to_classes`` converts each truth strip (e.g. a support layer's 0 = unknown);
    ``exclude`` (an ``(H, W)`` array-like, nonzero = skip) takes pixels out of the semantic scores, e.g. the support
    strokes a head was adapted on, so that the scores are held-out; the instance scores are not affected.
    ``n_classes`` is a lower bound (the matrix grows with the largest id seen). Yields ``{"stage": "evaluate",
    "done", "total"}`` after each strip; returns ``miou``, ``dice``, ``accuracy`` (semantic pair) and ``aji``,
    ``pq``, ``dq``, ``sq`` (instance pair). ValueError when the maps of a pair differ in size.
    """
    pairs = [(pred, truth, "classes"), (pred_inst, truth_inst, "instances")]
    pairs = [(p, t, what) for p, t, what in pairs if p is not None and t is not None]
    for p, t, what in pairs:
        if tuple(p.shape) != tuple(t.shape) or len(p.shape) != 2:
            raise ValueError(f"{what}: prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in size "
                             "(2D maps of the same image are needed)")
    if exclude is not None and truth is not None and tuple(exclude.shape) != tuple(truth.shape):
        raise ValueError(f"excluded pixels {tuple(exclude.shape)} and truth {tuple(truth.shape)} differ in size")
    if strip_rows < 1:
        raise ValueError(f"score_strips: strip_rows must be >= 1, got {strip_rows}")
    rows = [int(p.shape[0]) for p, _, _ in pairs]
    starts = range(0, max(rows, default=0), strip_rows)
    conf = ConfusionAccumulator(max(int(n_classes), 1)) if pred is not None and truth is not None else None
    counter = PairCounter() if pred_inst is not None and truth_inst is not None else None
    for i, r0 in enumerate(starts):
        r1 = r0 + strip_rows
        if conf is not None:
            p, t = _strip(pred, r0, r1), _strip(truth, r0, r1)
            t = truth_to_classes(t) if truth_to_classes is not None else t
            _check_integer(p, "pred")
            _check_integer(t, "truth")
            if exclude is not None:
                t = np.where(_strip(exclude, r0, r1) != 0, IGNORE, t)
            labelled = t[t != IGNORE]
            conf.grow_to(max(int(p.max(initial=0)) + 1, int(labelled.max(initial=0)) + 1))
            conf.update(p, t)
        if counter is not None:
            counter.add(_strip(truth_inst, r0, r1), _strip(pred_inst, r0, r1))
        yield {"stage": "evaluate", "done": i + 1, "total": len(starts)}
    out: dict[str, float] = {}
    if conf is not None:
        out.update(miou=conf.miou(), dice=conf.dice_foreground(), accuracy=conf.pixel_accuracy())
    if counter is not None:
        pq = counter.panoptic_quality(iou_threshold)
        out.update(aji=counter.aji(), pq=pq["pq"], dq=pq["dq"], sq=pq["sq"])
    return out


# ------------------------------------------------------------------------------------------------ detection


def _prf(tp: int, fp: int, fn: int) -> dict:
    """Precision/recall/F1; an empty denominator gives 1.0 if nothing was missed/wrong on the other side, else 0."""
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, fn=fn)


def _as_points(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 2)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (row, col) points, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite coordinates")
    return a


def detection_scores(pred_points: np.ndarray, true_points: np.ndarray, radius: float) -> dict:
    """Point-detection precision, recall and F1 with one-to-one matching within ``radius`` (pixels).

    ``pred_points`` ``(N, 2)`` and ``true_points`` ``(M, 2)`` are (row, col) coordinates. Pairs are chosen by the
    Hungarian algorithm minimising the total distance over pairs closer than or at ``radius`` (farther pairs are
    disallowed), so the number of matches is maximal among minimum-cost matchings. Empty cases: no predictions and
    no truth → precision = recall = f1 = 1.0; predictions but no truth, or truth but no predictions → all 0.0.
    Returns ``dict(precision, recall, f1, tp, fp, fn)``.
    """
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"detection_scores: radius must be a finite number >= 0, got {radius}")
    pred = _as_points(pred_points, "pred_points")
    true = _as_points(true_points, "true_points")
    tp = 0
    if len(pred) and len(true):
        dist = np.sqrt(((pred[:, None, :] - true[None, :, :]) ** 2).sum(-1))
        allowed = dist <= radius
        # forbidden pairs cost more than any full matching of allowed pairs, so the matching maximises the count
        big = (radius + 1.0) * (min(len(pred), len(true)) + 1)
        r, c = linear_sum_assignment(np.where(allowed, dist, big))
        tp = int(allowed[r, c].sum())
    return _prf(tp, len(pred) - tp, len(true) - tp)


# ------------------------------------------------------------------------------------------------ classification


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 2, positive: int = 1) -> dict:
    """Accuracy, balanced accuracy and binary precision/recall/F1 of class ``positive``.

    ``y_true``, ``y_pred``: ``(N,)`` integer labels in ``[0, n_classes)``. Balanced accuracy = mean recall over
    the classes present in ``y_true``. Precision with no predicted positives is 1.0 if there are no true
    positives to find, else 0.0 (recall symmetric). Returns ``dict(accuracy, balanced_accuracy, precision,
    recall, f1, tp, fp, fn)``.
    """
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.size == 0 or y_true.shape != y_pred.shape:
        raise ValueError(f"classification_scores: need equal non-empty label vectors, got {y_true.shape} and "
                         f"{y_pred.shape}")
    _check_integer(y_true, "y_true")
    _check_integer(y_pred, "y_pred")
    if not 0 <= positive < n_classes:
        raise ValueError(f"classification_scores: positive={positive} not in [0, {n_classes})")
    for a, name in ((y_true, "y_true"), (y_pred, "y_pred")):
        if a.min() < 0 or a.max() >= n_classes:
            raise ValueError(f"classification_scores: {name} labels must be in [0, {n_classes}), "
                             f"got range [{a.min()}, {a.max()}]")
    flat = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    cm = np.bincount(flat, minlength=n_classes**2).reshape(n_classes, n_classes)
    support = cm.sum(1)
    present = support > 0
    tp = int(cm[positive, positive])
    out = _prf(tp, int(cm[:, positive].sum()) - tp, int(support[positive]) - tp)
    out["accuracy"] = float(np.trace(cm) / cm.sum())
    out["balanced_accuracy"] = float(np.mean(np.diag(cm)[present] / support[present]))
    return out
