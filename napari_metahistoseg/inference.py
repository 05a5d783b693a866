"""Prediction with an adapted head: semantic classes, HoVer instances and point detections.

:func:`predict` is a generator (yields progress per batch of tiles, returns a :class:`Prediction`). The image is
rescaled to the backbone's mpp, predicted in overlapping blended tiles on a device set, and the maps are
brought back to the image's own resolution before arg-max and instance post-processing.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import HoVerPostConfig, PointsConfig, TilingConfig
from .data.io import to_rgb_uint8
from .devices import resolve_devices
from .pipeline import AdaptedHead, Backbone, replica, rescale
from .postprocess import HoVerPostProcessor
from .tiling import predict_tiled


@dataclass
class Prediction:
    """``semantic (H,W) uint8``; ``probs (C,H,W) float32``; with instances: ``np_prob (H,W)``,
    ``hv (2,H,W)``, ``instances (H,W) uint32`` and the per-nucleus ``table`` (dict of columns)."""

    semantic: np.ndarray
    probs: np.ndarray
    classes: list[str]
    np_prob: np.ndarray | None = None
    hv: np.ndarray | None = None
    instances: np.ndarray | None = None
    table: dict | None = None
    seconds: float = 0.0


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(C,h,w)`` float maps to ``(C,H,W)``."""
    if maps.shape[1:] == tuple(shape):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    return torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()


def predict(
    backbone: Backbone,
    head: AdaptedHead,
    image: np.ndarray,
    *,
    mpp: float | None = None,
    devices: str | Sequence[str] | None = "cpu",
    tiling: TilingConfig | None = None,
    instances: bool = False,
    hover: HoVerPostConfig | None = None,
    np_source: str = "adapted",
) -> Generator[dict, None, Prediction]:
    """Predict ``image (H,W,3)`` (``mpp`` µm/px; ``None`` = the backbone's). ``np_source`` picks the nuclear-pixel
    map for instances: ``"adapted"`` (foreground probability of the adapted head; binary tasks) or ``"hover"``
    (the pretrained HoVer NP branch)."""
    if np_source not in ("adapted", "hover"):
        raise ValueError(f"np_source must be 'adapted' or 'hover', got {np_source!r}")
    t0 = time.time()
    tiling = tiling or TilingConfig()
    devs = resolve_devices(devices)
    image = to_rgb_uint8(image, source="image")
    h, w = image.shape[:2]
    f = (mpp or backbone.mpp) / backbone.mpp
    small = rescale(image, f, order=1)
    model = head.module_for(backbone)
    reps = [replica(model, d) for d in devs]
    n_cls = len(head.classes)
    channels = {"seg": n_cls}
    acts = {"seg": lambda t: t.softmax(1)}
    if instances:
        channels.update({"np": 2, "hv": 2})
        acts["np"] = lambda t: t.softmax(1)

    def fwd_for(m):
        def fwd(x: torch.Tensor) -> dict[str, torch.Tensor]:
            feats = m.features(x)
            out = dict(m.heads["user"](feats))
            if instances:
                out.update(m.heads["hover"](feats))
            return out
        return fwd

    maps = yield from predict_tiled(fwd_for(reps[0]), small, cfg=tiling, devices=devs, channels=channels,
                                    activations=acts, forwards=[fwd_for(r) for r in reps])
    probs = _resize_maps(maps["seg"], (h, w))
    pred = Prediction(probs.argmax(0).astype(np.uint8), probs, list(head.classes))
    if instances:
        yield {"stage": "instances", "done": 0, "total": 1}
        np_prob = probs[1:].sum(0) if np_source == "adapted" else _resize_maps(maps["np"], (h, w))[1]
        hv = np.clip(_resize_maps(maps["hv"], (h, w)), -1, 1)
        post = HoVerPostProcessor(hover or HoVerPostConfig())
        pred.instances, pred.table = post(np_prob.astype(np.float32), hv.astype(np.float32), mpp or backbone.mpp)
        pred.np_prob, pred.hv = np_prob, hv
        yield {"stage": "instances", "done": 1, "total": 1}
    pred.seconds = time.time() - t0
    return pred


def detect_points(
    prob: np.ndarray, cfg: PointsConfig, *, threshold: float = 0.5, radius_px: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centroids from a foreground probability map ``(H,W)``: local maxima of the smoothed map above
    ``threshold``, at least ``radius/2`` apart. Returns ``points (N,2)`` (row, col) and their probabilities."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    r = float(radius_px if radius_px is not None else cfg.radius)
    sm = ndi.gaussian_filter(prob.astype(np.float32), sigma=max(1.0, r / 3))
    pts = peak_local_max(sm, min_distance=max(1, int(r / 2)), threshold_abs=threshold, exclude_border=False)
    pts = pts.astype(np.float64).reshape(-1, 2)
    return pts, sm[pts[:, 0].astype(int), pts[:, 1].astype(int)] if len(pts) else np.zeros(0)
