"""Centroid points → filled circles (BreastPathQ style), and back.

Overlap rule: where circles of several points overlap, a pixel belongs to the **nearest** point (ties go to
the point listed first), so every point keeps its own centre pixel and neighbouring circles are split along
their bisector instead of the later point overwriting the earlier one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .task import IGNORE


def radius_in_pixels(radius: float, unit: str = "px", mpp: float | None = None) -> float:
    """Convert a radius given in ``unit`` ("px" or "um") to pixels using ``mpp`` (µm per pixel)."""
    if unit == "px":
        r = float(radius)
    elif unit in ("um", "µm"):
        if not mpp or mpp <= 0:
            raise ValueError("a radius in µm needs the image's microns-per-pixel (mpp)")
        r = float(radius) / float(mpp)
    else:
        raise ValueError(f"radius unit must be 'px' or 'um', got {unit!r}")
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"circle radius must be positive, got {radius} {unit}")
    return r


def points_to_masks(
    points: np.ndarray,
    classes: np.ndarray | None,
    shape: tuple[int, int],
    radius_px: float = 12.0,
    *,
    background: str = "unknown",
    background_margin_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise points as filled circles.

    Args:
        points: ``(N, 2)`` (row, col) pixel coordinates; points outside ``shape`` or not finite raise ``ValueError``.
        classes: ``(N,)`` integer class ids in ``0..254`` (255 is :data:`IGNORE`), normally ≥ 1 (``None`` → all 1);
            another length or value raises ``ValueError``.
        shape: ``(H, W)`` of the image.
        radius_px: circle radius in pixels (finite, ≥ 0; 0 marks only the point's own pixel).
        background: what pixels outside every circle become: ``"unknown"`` (:data:`IGNORE`, the default — an
            unclicked pixel is never assumed to be background) or ``"background"`` (class 0; for exhaustively
            annotated images such as BM-Graz fields).
        background_margin_px: with ``background="background"``, a ring of this width around each circle stays
            unknown (cells are rarely perfect circles).

    Returns:
        ``semantic (H, W) uint8`` and ``instances (H, W) uint32`` (instance i+1 = point i, nearest-point rule).
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 0 or w < 0:
        raise ValueError(f"image shape must be non-negative, got {tuple(shape)}")
    pts = np.asarray(points, np.float64)
    if pts.size and (pts.ndim != 2 or pts.shape[1] != 2):
        raise ValueError(f"points must be an (N, 2) array of (row, col), got shape {pts.shape}")
    pts = pts.reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or inf")
    if pts.size and ((pts[:, 0] < 0) | (pts[:, 0] >= h) | (pts[:, 1] < 0) | (pts[:, 1] >= w)).any():
        raise ValueError(f"points outside the image of {h}x{w}")
    for name, value in (("radius_px", radius_px), ("background_margin_px", background_margin_px)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if classes is None:
        cls = np.ones(len(pts), np.int64)
    else:
        raw = np.asarray(classes)
        if raw.shape != (len(pts),) or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
            raise ValueError(f"classes must be ({len(pts)},) integers, one per point; got {raw.shape} {raw.dtype}")
        cls = raw.astype(np.int64)
        if cls.size and (cls.min() < 0 or cls.max() >= IGNORE):
            raise ValueError(f"point classes must be in 0..{IGNORE - 1} ({IGNORE} = unknown), "
                             f"got {int(cls.min())}..{int(cls.max())}")
    if background not in ("unknown", "background"):
        raise ValueError(f"background must be 'unknown' or 'background', got {background!r}")
    fill = IGNORE if background == "unknown" else 0
    semantic = np.full((h, w), fill, np.uint8)
    instances = np.zeros((h, w), np.uint32)
    if len(pts) == 0:
        return semantic, instances
    rc = np.clip(np.rint(pts).astype(np.int64), 0, [h - 1, w - 1])
    reach = radius_px + (background_margin_px if background == "background" else 0.0)
    dist, nearest = _nearest_seed(rc, (h, w), reach)  # nearest: 1-based point index
    inside = dist <= radius_px
    instances[inside] = nearest[inside].astype(np.uint32)
    semantic[inside] = cls[nearest[inside] - 1].astype(np.uint8)
    if background == "background" and background_margin_px > 0:
        ring = (~inside) & (dist <= radius_px + background_margin_px)
        semantic[ring] = IGNORE
    return semantic, instances


def _nearest_seed(rc: np.ndarray, shape: tuple[int, int], reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and 1-based index of, the nearest seed pixel ``rc[i]`` within ``reach`` (inf / 0 beyond).

    Points are visited in listed order and a pixel changes owner only for a strictly nearer point, so equal
    distances (and shared pixels) go to the point listed first. (A Euclidean distance transform breaks such
    ties by scan order instead, which is why it is not used here.)
    """
    h, w = shape
    best = np.full((h, w), np.inf)
    owner = np.zeros((h, w), np.int64)
    r = int(np.floor(reach))
    for k, (y, x) in enumerate(rc, start=1):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
        d = np.hypot(np.arange(y0, y1)[:, None] - y, np.arange(x0, x1)[None, :] - x)
        sub_best, sub_owner = best[y0:y1, x0:x1], owner[y0:y1, x0:x1]
        win = (d < sub_best) & (d <= reach)
        sub_best[win] = d[win]
        sub_owner[win] = k
    return best, owner


def mask_centroids(labels: np.ndarray, min_area_px: int = 1) -> np.ndarray:
    """Centroids ``(N, 2)`` (row, col) of the connected objects/instances of a label image."""
    from skimage.measure import regionprops

    lab = labels
    if lab.dtype == bool or lab.max() <= 1:
        lab, _ = ndi.label(lab > 0)
    props = [p for p in regionprops(lab.astype(np.int64)) if p.area >= min_area_px]
    return np.asarray([p.centroid for p in props], np.float64).reshape(-1, 2)
