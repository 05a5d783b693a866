"""Multi-annotator consolidation.

* :func:`vote_labels` — majority vote per item (patch labels; AMi-Br's three experts), explicit tie rules;
* :func:`majority_vote_maps` — the same per pixel of several ``(H, W)`` label maps;
* :func:`staple_maps` — SimpleITK ``MultiLabelSTAPLE`` on label maps (Gleason2019 in the paper);
* :func:`vote_points` — point clicks of several annotators clustered within a radius, kept by vote count.
"""

from __future__ import annotations

import numpy as np

from .task import IGNORE

TIE_RULES = ("first", "ignore", "lowest")
UNDECIDED_RULES = ("first", "ignore")


def vote_labels(votes: np.ndarray, n_classes: int, *, tie: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """Majority vote over annotators.

    Args:
        votes: ``(N, A)`` integer class per item and annotator; negative = annotator abstained.
        n_classes: number of classes.
        tie: ``"first"`` (the first annotator among the tied classes who voted decides), ``"lowest"`` (lowest
            tied class id) or ``"ignore"`` (-1).

    Returns:
        ``labels (N,) int64`` and ``agreement (N,) float64`` = share of (non-abstaining) votes for the label.
    """
    v = np.asarray(votes, np.int64)
    if v.ndim != 2:
        raise ValueError(f"votes must be (N, annotators), got shape {v.shape}")
    if tie not in TIE_RULES:
        raise ValueError(f"tie must be one of {TIE_RULES}, got {tie!r}")
    if (v >= n_classes).any():
        raise ValueError(f"a vote is >= n_classes ({n_classes})")
    counts = np.zeros((v.shape[0], n_classes), np.int64)
    for a in range(v.shape[1]):
        ok = v[:, a] >= 0
        np.add.at(counts, (np.nonzero(ok)[0], v[ok, a]), 1)
    best = counts.max(axis=1)
    tied = counts == best[:, None]
    labels = np.argmax(counts, axis=1)  # lowest tied class
    n_tied = tied.sum(axis=1)
    amb = (n_tied > 1) & (best > 0)
    if tie == "first":
        for i in np.nonzero(amb)[0]:
            for a in range(v.shape[1]):
                if v[i, a] >= 0 and tied[i, v[i, a]]:
                    labels[i] = v[i, a]
                    break
    elif tie == "ignore":
        labels[amb] = -1
    labels[best == 0] = -1
    total = np.maximum(counts.sum(axis=1), 1)
    agreement = np.where(labels >= 0, counts[np.arange(len(labels)), np.maximum(labels, 0)] / total, 0.0)
    return labels, agreement


def majority_vote_maps(maps: list[np.ndarray], n_classes: int, *, tie: str = "first") -> np.ndarray:
    """Pixel-wise majority vote of several annotators' ``(H, W)`` label maps (IGNORE = abstain).

    Ties follow ``tie`` as in :func:`vote_labels`; ``"ignore"`` and all-abstain pixels become :data:`IGNORE`.
    """
    if not maps:
        raise ValueError("no label maps to consolidate")
    shape = maps[0].shape
    for i, m in enumerate(maps):
        if m.shape != shape:
            raise ValueError(f"annotator {i}'s map has shape {m.shape}, expected {shape}")
    # cast before replacing IGNORE: np.where(uint8 map, -1) would wrap -1 to 255 under NumPy 2's promotion rules
    stack = np.stack([np.where(m == IGNORE, -1, m.astype(np.int64)).ravel() for m in maps], axis=1)
    labels, _ = vote_labels(stack, n_classes, tie=tie)
    return np.where(labels < 0, IGNORE, labels).astype(np.uint8).reshape(shape)


def _check_maps(maps: list[np.ndarray], n_classes: int) -> tuple[int, ...]:
    if not maps:
        raise ValueError("no label maps to consolidate")
    shape = maps[0].shape
    if len(shape) != 2:
        raise ValueError(f"label maps must be 2-D (H, W), got shape {shape}")
    for i, m in enumerate(maps):
        if m.shape != shape:
            raise ValueError(f"annotator {i}'s map has shape {m.shape}, expected {shape}")
        if not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"annotator {i}'s map must hold integers, got {m.dtype}")
        if m.size and (m.min() < 0 or m.max() >= n_classes):
            raise ValueError(
                f"annotator {i}'s map has values outside 0..{n_classes - 1} (STAPLE has no 'abstain' value)"
            )
    return shape


def staple_maps(maps: list[np.ndarray], n_classes: int, *, undecided: str = "first") -> np.ndarray:
    """Consolidate several annotators' ``(H, W)`` label maps with SimpleITK's ``MultiLabelSTAPLE``.

    STAPLE estimates every annotator's confusion matrix by expectation-maximisation and labels each pixel
    with the class of highest posterior probability. Pixels whose posterior is tied between classes are
    "undecided"; ``undecided`` says what they become:

    * ``"first"`` — the first annotator's label at that pixel (what the MetaHistoSeg authors' Gleason2019
      preprocessing does; "first" is the first map of ``maps``),
    * ``"ignore"`` — :data:`IGNORE` (255, unknown; losses and metrics skip it).

    A single map is returned unchanged (STAPLE needs nothing to consolidate).

    Args:
        maps: annotators' label maps, each ``(H, W)`` integers in ``0..n_classes-1`` (no abstention).
        n_classes: number of classes (< 255).

    Returns:
        ``(H, W) uint8`` consolidated labels.
    """
    import SimpleITK as sitk

    if undecided not in UNDECIDED_RULES:
        raise ValueError(f"undecided must be one of {UNDECIDED_RULES}, got {undecided!r}")
    if not 0 < n_classes < IGNORE:
        raise ValueError(f"n_classes must be in 1..{IGNORE - 1}, got {n_classes}")
    _check_maps(maps, n_classes)
    first = np.asarray(maps[0]).astype(np.uint8)
    if len(maps) == 1:
        return first.copy()
    images = [sitk.GetImageFromArray(np.ascontiguousarray(m, dtype=np.uint8)) for m in maps]
    try:
        out = sitk.GetArrayFromImage(sitk.MultiLabelSTAPLE(images, IGNORE)).astype(np.uint8)
    except RuntimeError as e:
        raise ValueError(f"SimpleITK MultiLabelSTAPLE failed ({e})") from None
    undecided_px = out >= n_classes  # IGNORE, or any label SimpleITK could not decide on
    if undecided == "first":
        out[undecided_px] = first[undecided_px]
    else:
        out[undecided_px] = IGNORE
    return out


def _match_within(points: np.ndarray, centres: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (point index, centre index) at distance <= radius: most pairs, then least total distance."""
    from scipy.optimize import linear_sum_assignment

    if not len(points) or not len(centres):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2)
    # a forbidden pair costs more than any set of allowed ones: the most matches win, then the shortest
    big = (min(d.shape) + 1) * (radius_px + 1.0)
    rows, cols = linear_sum_assignment(np.where(d <= radius_px, d, big))
    ok = d[rows, cols] <= radius_px
    return rows[ok], cols[ok]


def vote_points(
    point_sets: list[np.ndarray], radius_px: float, min_votes: int, *, return_votes: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Consolidate several annotators' point clicks (e.g. cell centroids, mitoses) by voting.

    Annotators are merged one after the other: annotator ``a``'s points are matched one-to-one to the
    current clusters (optimal assignment minimising the total distance, Hungarian algorithm) when their
    distance to the cluster's mean position is ``<= radius_px``; unmatched points open new clusters. So a
    cluster holds at most one point per annotator, and two clicks of one annotator are never merged.
    Clusters with at least ``min_votes`` points (= annotators) are kept, at their mean position.

    Args:
        point_sets: one ``(N_i, 2)`` (row, col) array per annotator (``N_i`` may be 0).
        radius_px: matching distance in pixels (> 0).
        min_votes: annotators that must agree (1..number of annotators).
        return_votes: also return the number of votes of each kept cluster.

    Returns:
        ``(M, 2) float64`` consolidated points in cluster creation order (annotator 0's points first), and
        with ``return_votes`` the ``(M,) int64`` vote counts.
    """
    if not point_sets:
        raise ValueError("no point sets to consolidate")
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"radius_px must be > 0, got {radius_px}")
    if not 1 <= min_votes <= len(point_sets):
        raise ValueError(f"min_votes must be in 1..{len(point_sets)} (the number of annotators), got {min_votes}")
    sums = np.zeros((0, 2), np.float64)
    counts = np.zeros(0, np.int64)
    for a, pts in enumerate(point_sets):
        p = np.asarray(pts, np.float64).reshape(-1, 2) if np.size(pts) else np.zeros((0, 2))
        if not np.all(np.isfinite(p)):
            raise ValueError(f"annotator {a}'s points contain NaN or inf")
        matched = np.zeros(len(p), bool)
        rows, cols = _match_within(p, sums / np.maximum(counts, 1)[:, None], radius_px)
        sums[cols] += p[rows]
        counts[cols] += 1
        matched[rows] = True
        sums = np.concatenate([sums, p[~matched]])
        counts = np.concatenate([counts, np.ones(int((~matched).sum()), np.int64)])
    keep = counts >= min_votes
    out = (sums[keep] / counts[keep, None]).reshape(-1, 2)
    return (out, counts[keep]) if return_votes else out
