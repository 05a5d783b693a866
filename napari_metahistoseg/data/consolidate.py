"""Multi-annotator consolidation: votes on labels (patches, points) and on label maps."""

from __future__ import annotations

import numpy as np

from .task import IGNORE

TIE_RULES = ("first", "ignore", "lowest")


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
    stack = np.stack([np.where(m == IGNORE, -1, m).astype(np.int64).ravel() for m in maps], axis=1)
    labels, _ = vote_labels(stack, n_classes, tie=tie)
    return np.where(labels < 0, IGNORE, labels).astype(np.uint8).reshape(shape)
