"""Prediction with an adapted head: semantic classes, HoVer instances and point detections.

* :func:`predict` — in memory, for images that fit (fields of view, tiles): a generator yielding progress per
  batch of tiles and returning a :class:`Prediction`. The image is rescaled to the backbone's mpp, predicted in
  overlapping blended tiles on a device set, and the maps are brought back to the image's own resolution before
  arg-max and instance post-processing.
* :func:`predict_large` — streamed, for slides: tiles are read lazily (:mod:`.slide`), resampled to the model's
  mpp one by one, predicted in batches split across the devices, blended one row of tiles at a time and written
  to a zarr group as soon as no later tile touches them; HoVer instances are segmented in overlapping windows and
  stitched (:class:`.tiling.InstanceStitcher`); the per-nucleus table is appended to a CSV. Memory is bounded by
  one row of tiles, whatever the image size. Closing the generator cancels between tiles.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import HoVerPostConfig, ObjectPostConfig, PointsConfig, TilingConfig, to_dict
from .data.io import to_rgb_uint8
from .devices import resolve_devices
from .pipeline import AdaptedHead, Backbone, _check_mpp, gaussian_smooth, rescale
from .postprocess import (
    OBJECT_COLUMNS,
    CoarseObjects,
    HoVerPostProcessor,
    ObjectStats,
    downsample_mask,
    object_factor,
    object_instances,
    object_table,
)
from .resilience import oom_fallback_gen
from .slide import LazyImage, create_outputs, open_image, write_pyramid
from .tiling import (
    BandBlender,
    InstanceStitcher,
    TileRunner,
    blend_device,
    blend_window,
    group_by_shape,
    image_tiling,
    predict_tiled,
    tile_grid,
    to_host,
    upload,
)

log = logging.getLogger(__name__)

SCALE_TOLERANCE = 0.02  # image and model mpp within 2 % are treated as equal (no resampling)
NP_LEVELS, HV_LEVELS, NC_LEVELS = 255, 127, 255  # stored maps: np uint8 = p*255, hv int8 = hv*127, nc uint8
NUCLEI_COLUMNS = ("id", "centroid_row", "centroid_col", "bbox_min_row", "bbox_min_col", "bbox_max_row",
                  "bbox_max_col", "area_px", "area_um2", "type", "type_name", "type_prob")


@dataclass
class Prediction:
    """``semantic (H,W) uint8``; ``probs (C,H,W) float32``; with instances: ``np_prob (H,W)``,
    ``hv (2,H,W)``, ``instances (H,W) uint32`` and the per-nucleus ``table`` (dict of columns; with ``type`` and
    ``type_prob`` when the backbone has a HoVer type branch); with objects: ``objects (H,W) uint32`` (large-object
    instances of the foreground, e.g. glands: :func:`.postprocess.object_instances`) and ``object_table``
    (:class:`.postprocess.ObjectStats` columns)."""

    semantic: np.ndarray
    probs: np.ndarray
    classes: list[str]
    np_prob: np.ndarray | None = None
    hv: np.ndarray | None = None
    instances: np.ndarray | None = None
    table: dict | None = None
    objects: np.ndarray | None = None
    object_table: dict | None = None
    seconds: float = 0.0


@dataclass
class LargePrediction:
    """Result of :func:`predict_large`: where the outputs are and what they hold.

    The zarr group ``store`` holds ``semantic (H,W) uint8`` class ids at image resolution and, with instances,
    ``instances (H,W) uint32``, ``np (H,W) uint8`` (nuclear probability × 255), ``hv (2,H,W) int8`` (HV × 127) and,
    when the backbone has a type branch, ``nc (T,H,W) uint8`` (type probabilities × 255); with objects,
    ``objects (H,W) uint32`` (large-object instances, found on a coarse grid: ``ObjectPostConfig.large_work_mpp_um``).
    Its attributes repeat ``classes``, ``mpp``, the tiling and ``complete`` (False until the prediction finished).
    Above ``TilingConfig.pyramid_min_px`` the label arrays also get nearest-neighbour levels ``levels/<name>/<k>``
    (:func:`.slide.pyramid` lists them) for multiscale display.
    """

    store: Path
    shape: tuple[int, int]
    classes: list[str]
    mpp: float
    tiles: int
    nuclei_csv: Path | None = None
    nuclei_geojson: Path | None = None  # the nuclei outlines (:class:`NucleiGeoJSON`)
    n_instances: int = 0
    points_csv: Path | None = None  # detected cells (``cells_radius_px``)
    n_cells: int = 0
    objects_csv: Path | None = None
    n_objects: int = 0
    seconds: float = 0.0
    roi: tuple[int, int, int, int] | None = None
    complete: bool = True
    type_names: list[str] = field(default_factory=list)


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(C,h,w)`` float maps to ``(C,H,W)``."""
    if maps.shape[1:] == tuple(shape):
        return maps
    return resize_maps_t(torch.from_numpy(np.ascontiguousarray(maps)), shape).numpy()


def resize_maps_t(maps: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`_resize_maps` of a tensor, on its device."""
    if tuple(maps.shape[1:]) == tuple(shape):
        return maps
    return torch.nn.functional.interpolate(maps[None], size=tuple(shape), mode="bilinear", align_corners=False)[0]


def resize_image_t(image: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`.pipeline.rescale` (order 1) of an ``(H, W, 3) uint8`` image tensor, on its device: bilinear,
    antialiased when shrinking (a triangle filter where ``rescale`` smooths with a Gaussian: the resampling of the
    streamed path's tiles), rounded half up; identity within 2 %."""
    if abs(factor - 1) < 0.02:
        return image
    shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
    x = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].float(), size=shape, mode="bilinear",
                                        align_corners=False, antialias=factor < 1)[0]
    return x.add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def _inference_model(backbone: Backbone, head: AdaptedHead) -> torch.nn.Module:
    # a fresh module over the backbone's tensors: moving it or converting its layout touches nobody else's model
    return head.module_for(backbone, inference=True)


def _replicas(model: torch.nn.Module, devices: Sequence[torch.device],
              tiling: TilingConfig | None = None) -> list[torch.nn.Module]:
    """One copy of a freshly built ``model`` per device, in the memory layout ``tiling`` asks for there
    (:meth:`TilingConfig.channels_last_on`); the last device takes ``model`` itself, so a single device costs no
    copy (a deep copy of the model takes 20-50 ms of host time, a fifth of a 16 MP prediction on a GPU). Not
    cached: a cache keyed by ``id()`` could hand a later head the copy of an earlier one whose id was reused."""
    import copy

    copies = [copy.deepcopy(model) for _ in devices[:-1]] + [model]  # copied while all are on the host
    out = []
    for m, d in zip(copies, devices, strict=True):
        m = m if d.type == "cpu" else to_device(m, d).eval()
        out.append(m.to(memory_format=torch.channels_last) if tiling and tiling.channels_last_on(d) else m)
    return out


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` moved to ``device`` (in place) with one host-to-device copy of all its float32 weights and
    buffers, each keeping its memory format. ``Module.to`` copies the ~100 tensors one by one, each copy waiting
    for the GPU: 12-25 ms of a 16 MP prediction on an H200 (BENCHMARKS.md, "GPU")."""
    ts = [*model.parameters(), *model.buffers()]
    if not ts or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in ts):
        return model.to(device)
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(device)
        for t, piece in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
            cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            t.data = piece.view(t.shape).contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format)
    return model


# (transpose, flip rows, flip cols) of the dihedral variants, in the order TilingConfig.tta_variants takes them
DIHEDRAL = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
            (True, False, False), (True, False, True), (True, True, False), (True, True, True))


def tta_forward(fwd: Callable[[torch.Tensor], dict[str, torch.Tensor]], variants: int,
                activations: dict[str, Callable] | None = None) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Test-time augmentation: ``fwd`` run on ``variants`` dihedral variants of its input (1 = as is, 2 = + the
    left-right flip, 4 = every flip, 8 = flips of the image and of its transpose); each output is mapped back to
    the input's frame (``activations`` applied first, e.g. softmax) and the variants are averaged. An ``"hv"``
    output is a vector field (horizontal, vertical): a flip negates its component along the flipped axis and a
    transpose swaps the two."""
    if variants not in (1, 2, 4, 8):
        raise ValueError(f"variants must be 1, 2, 4 or 8, got {variants!r}")
    acts = dict(activations or {})
    if variants == 1 and not acts:
        return fwd

    def undo(name: str, t: torch.Tensor, transpose: bool, rows: bool, cols: bool) -> torch.Tensor:
        dims = [d for d, f in ((2, rows), (3, cols)) if f]
        if dims:
            t = t.flip(dims)
            if name == "hv":
                sign = torch.tensor([-1.0 if cols else 1.0, -1.0 if rows else 1.0], dtype=t.dtype, device=t.device)
                t = t * sign.view(1, 2, 1, 1)
        if transpose:
            t = t.transpose(2, 3)
            if name == "hv":
                t = t.flip(1)  # (h, v) of the transposed image are (v, h) of the original
        return t

    def averaged(x: torch.Tensor) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for transpose, rows, cols in DIHEDRAL[:variants]:
            xi = x.transpose(2, 3) if transpose else x
            dims = [d for d, f in ((2, rows), (3, cols)) if f]
            xi = xi.flip(dims) if dims else xi
            for name, t in fwd(xi).items():
                t = t.float()
                t = acts[name](t) if name in acts else t
                t = undo(name, t, transpose, rows, cols)
                total[name] = total[name] + t if name in total else t
        return {name: t / variants for name, t in total.items()}
    return averaged


def _decision_smoothing_px(head: AdaptedHead, backbone: Backbone, tiling: TilingConfig) -> float:
    """The class decision's smoothing sigma in model pixels (each tile is smoothed on its own: a kernel reaching
    beyond the tile halo may leave seams, which is logged)."""
    sigma = head.smoothing_um / backbone.mpp
    if sigma > 0 and math.ceil(3 * sigma) > tiling.halo_px:
        log.warning("the head's decision smoothing (%.1f µm = %.1f model px) reaches beyond the %d px tile halo: "
                    "seams are possible; raise TilingConfig.halo_px to %d", head.smoothing_um, sigma, tiling.halo_px,
                    math.ceil(3 * sigma))
    return sigma


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
    np_source: str = "blend",
    objects: bool = False,
    object_cfg: ObjectPostConfig | None = None,
) -> Generator[dict, None, Prediction]:
    """Predict ``image (H,W,3)`` (``mpp`` µm/px; ``None`` = the backbone's). ``np_source`` picks the nuclear-pixel
    map for instances: ``"blend"`` (default: the HoVer NP branch gated by and blended with the adapted foreground,
    ``HoVerPostConfig.np_hover_weight`` / ``np_gate_um``; :func:`blend_np`), ``"adapted"`` (foreground probability
    of the adapted head alone) or ``"hover"`` (the pretrained HoVer NP branch alone). ``objects``: also instances of
    large objects (glands) of the semantic foreground (every non-background class), with ``object_cfg`` (default
    ``ObjectPostConfig()``)."""
    _check_np_source(np_source)
    t0 = time.time()
    tiling = tiling or TilingConfig()
    devs = resolve_devices(devices)
    image = to_rgb_uint8(image, source="image")
    _check_mpp(mpp, "image")
    h, w = image.shape[:2]
    f = (mpp or backbone.mpp) / backbone.mpp
    model = _inference_model(backbone, head)
    reps = _replicas(model, devs, tiling)
    n_cls = len(head.classes)
    smooth_px = _decision_smoothing_px(head, backbone, tiling)
    has_nc = instances and getattr(model.heads["hover"], "nc", None) is not None
    channels = {"seg": n_cls, **({"dec": n_cls} if smooth_px > 0 else {})}
    if instances:
        channels.update({"np": 1, "hv": 2, **({"nc": model.heads["hover"].nc[-1].out_channels} if has_nc else {})})
    small_hw = (h, w) if abs(f - 1) < 0.02 else (max(1, round(h * f)), max(1, round(w * f)))
    # on a GPU also the uint8 image and, when it is resampled, its float copy (3 + 12 bytes per image pixel)
    on = blend_device(tiling, devs, small_hw, sum(channels.values()) + n_cls,
                      extra_mb=h * w * (3 + (12 if small_hw != (h, w) else 0)) / 2**20)
    if on is None:
        small = rescale(image, f, order=1)
        colour = head.colour_input(backbone, image)
    else:  # a GPU does it all: the image goes up once, is resampled, tiled, blended and decided there
        up = upload(image, on)
        small, colour = resize_image_t(up, f), head.colour_input(backbone, up)
        del up
    # the streamed path's forward (probabilities, TTA variants averaged as probabilities): one forward for both
    fwds = [tta_forward(_forward_for(r, instances, np_source, has_nc, smooth_px, colour, hover, backbone.mpp),
                        tiling.tta_variants) for r in reps]
    # an out-of-memory error (a large tile batch on a small GPU) restarts with a smaller batch, then smaller tiles
    maps = yield from oom_fallback_gen(
        lambda t: predict_tiled(fwds[0], small, cfg=t, devices=devs, channels=channels, forwards=fwds,
                                cpu_channels_last=True, as_tensors=True), tiling)
    probs_t = resize_maps_t(maps["seg"], (h, w))
    dec = resize_maps_t(maps["dec"], (h, w)) if "dec" in maps else probs_t
    probs = _host(probs_t)
    # decided where the maps are: on a GPU as tensors, on the CPU in numpy (torch's CPU arg-max over the class
    # axis took 2.6 s on (2, 4096, 4096) against 0.15 s for decide's numpy path)
    pred = Prediction(_host(decide(dec if on is not None else _host(dec), head.threshold)), probs,
                      list(head.classes))
    if instances:
        yield {"stage": "instances", "done": 0, "total": 1}
        # "adapted" from the class probabilities at the image's resolution; the others as the forward made them
        np_prob = probs[1:].sum(0) if np_source == "adapted" else _host(resize_maps_t(maps["np"], (h, w)))[0]
        # a sum of class probabilities or a resampled map can leave [0, 1] by a rounding error: clipped once, so the
        # stored map is a probability too
        np_prob = np.clip(np_prob, 0, 1).astype(np.float32)
        hv = np.clip(_host(resize_maps_t(maps["hv"], (h, w))), -1, 1)
        nc = np.clip(_host(resize_maps_t(maps["nc"], (h, w))), 0, 1) if has_nc else None
        post = HoVerPostProcessor(hover or HoVerPostConfig())
        pred.instances, pred.table = post(np_prob, hv.astype(np.float32), mpp or backbone.mpp, nc)
        pred.np_prob, pred.hv = np_prob, hv
        yield {"stage": "instances", "done": 1, "total": 1}
    if objects:
        yield {"stage": "objects", "done": 0, "total": 1}
        pred.objects = object_instances(pred.semantic > 0, object_cfg or ObjectPostConfig(), mpp or backbone.mpp)
        pred.object_table = object_table(pred.objects, pred.semantic, n_cls)
        yield {"stage": "objects", "done": 1, "total": 1}
    pred.seconds = time.time() - t0
    return pred


def decide(probs: np.ndarray | torch.Tensor, threshold: float | None = None) -> np.ndarray | torch.Tensor:
    """Class map ``(H, W) uint8`` from class probabilities ``(C, H, W)``: the arg-max (the first class of the
    largest probability), or for two classes with a calibrated ``threshold``
    (:attr:`~napari_metahistoseg.pipeline.AdaptedHead.threshold`) foreground where its probability reaches it.
    A tensor gives a tensor on its device."""
    if isinstance(probs, torch.Tensor):
        if threshold is not None and probs.shape[0] == 2:
            return (probs[1] >= threshold).to(torch.uint8)
        return probs.argmax(0).to(torch.uint8)
    if threshold is not None and probs.shape[0] == 2:
        return (probs[1] >= threshold).astype(np.uint8)
    # class by class instead of ndarray.argmax(0), which strides across the planes (10x slower on 16 MP)
    best, top = np.zeros(probs.shape[1:], np.uint8), np.array(probs[0], copy=True)
    for c in range(1, probs.shape[0]):
        better = probs[c] > top
        best[better] = c
        np.maximum(top, probs[c], out=top)
    return best


def _host(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return to_host(a) if isinstance(a, torch.Tensor) else a


def click_radius_px(head: AdaptedHead, mpp: float) -> float | None:
    """The radius (pixels of an image of ``mpp`` µm/px) of the circles the head was adapted on, when it was adapted
    on clicked centroids (its provenance's ``points_radius_model_px``, in the backbone's pixels); else None."""
    r_model = (head.provenance or {}).get("points_radius_model_px")
    return float(r_model) * head.mpp / mpp if r_model else None


def detect_cells(probs: np.ndarray, cfg: PointsConfig | None = None, *, radius_px: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of a prediction of a head adapted on clicked centroids: ``(points (N, 2) row/col, classes (N,) int
    >= 1, probabilities (N,))``. The points are :func:`detect_points` on the summed foreground probability of
    ``probs (C, H, W)`` (what ``evaluate`` scores); each takes the foreground class most probable at its pixel.
    ``radius_px``: the clicked circles' radius in this image's pixels; the peak-finding sizes of ``cfg`` (tuned
    for circles of ``cfg.radius`` px) scale with it."""
    cfg = _cells_cfg(cfg, radius_px)
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"detect_cells: expected (C >= 2, H, W) class probabilities, got shape {probs.shape}")
    pts, prob = detect_points(probs[1:].sum(0), cfg)
    rc = np.round(pts).astype(np.int64).reshape(-1, 2)
    classes = 1 + probs[1:, rc[:, 0], rc[:, 1]].argmax(0) if len(rc) else np.zeros(0, np.int64)
    return pts.reshape(-1, 2), np.asarray(classes, np.int64), np.asarray(prob, np.float32)


def _cells_cfg(cfg: PointsConfig | None, radius_px: float | None) -> PointsConfig:
    """``cfg`` with its peak-finding sizes scaled from circles of ``cfg.radius`` px to circles of ``radius_px``."""
    cfg = cfg or PointsConfig()
    if not radius_px:
        return cfg
    scale = float(radius_px) / cfg.radius
    return dataclasses.replace(cfg, peak_sigma_px=cfg.peak_sigma_px * scale,
                               peak_min_distance_px=max(1, round(cfg.peak_min_distance_px * scale)))


def large_cells(res: LargePrediction, radius_px: float, points_csv: Path, area: tuple[int, int, int, int], *,
                window_px: int = 1024, cfg: PointsConfig | None = None) -> Generator[dict, None, int]:
    """:func:`detect_cells` over a streamed prediction's ``fg``/``fgc`` maps inside ``area = (r0, c0, r1, c1)``,
    window by window: each window is read with a margin of 4 smoothing sigmas plus the peak spacing, so a peak of
    its core is found as on the whole map; the core keeps it. Writes ``row,col,class,class_name,prob`` rows to
    ``points_csv``; yields ``{"stage": "cells", "done", "total"}`` per window; returns the number of cells."""
    import zarr

    cfg = _cells_cfg(cfg, radius_px)
    root = zarr.open_group(str(res.store), mode="r")
    fg, fgc = root["fg"], root["fgc"]
    a0, b0, a1, b1 = area
    margin = math.ceil(4 * cfg.peak_sigma_px) + int(cfg.peak_min_distance_px) + 1
    windows = [(r, c) for r in range(a0, a1, window_px) for c in range(b0, b1, window_px)]
    n = 0
    points_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(points_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "col", "class", "class_name", "prob"])
        for i, (r, c) in enumerate(windows):
            core = (r, c, min(r + window_px, a1), min(c + window_px, b1))
            wr0, wc0 = max(a0, r - margin), max(b0, c - margin)
            wr1, wc1 = min(a1, core[2] + margin), min(b1, core[3] + margin)
            prob = np.asarray(fg[wr0:wr1, wc0:wc1], np.float32) / NP_LEVELS
            pts, p = detect_points(prob, cfg)
            pts = pts.reshape(-1, 2) + (wr0, wc0)
            keep = (pts[:, 0] >= core[0]) & (pts[:, 0] < core[2]) & (pts[:, 1] >= core[1]) & (pts[:, 1] < core[3])
            pts, p = pts[keep], np.asarray(p).reshape(-1)[keep]
            # the class of each cell: one read of the core's class map (an element read decodes a chunk)
            cls = np.asarray(fgc[core[0]:core[2], core[1]:core[3]])[pts[:, 0].astype(int) - core[0],
                                                                     pts[:, 1].astype(int) - core[1]] \
                if len(pts) else np.zeros(0, np.uint8)
            for (pr, pc), pp, k in zip(pts, p, cls.tolist(), strict=True):
                w.writerow([f"{pr:.1f}", f"{pc:.1f}", k, res.classes[k] if k < len(res.classes) else "",
                            f"{float(pp):.4f}"])
            n += int(keep.sum())
            yield {"stage": "cells", "done": i + 1, "total": len(windows)}
    return n


def read_cells(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(points (N, 2) row/col, classes (N,), probabilities (N,))`` of a cells CSV written by :func:`large_cells`
    (or ``predict``'s ``points.csv``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pts = np.array([[float(r["row"]), float(r["col"])] for r in rows], np.float64).reshape(-1, 2)
    return (pts, np.array([int(r["class"]) for r in rows], np.int64),
            np.array([float(r["prob"]) for r in rows], np.float32))


def detect_points(
    prob: np.ndarray, cfg: PointsConfig, *, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centroids from a foreground probability map ``(H,W)``: local maxima of the map smoothed with
    ``cfg.peak_sigma_px`` above ``threshold`` (default ``cfg.peak_threshold``), at least
    ``cfg.peak_min_distance_px`` apart. Returns ``points (N,2)`` (row, col) and their smoothed probabilities."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    th = cfg.peak_threshold if threshold is None else threshold
    sm = ndi.gaussian_filter(prob.astype(np.float32), sigma=cfg.peak_sigma_px)
    pts = peak_local_max(sm, min_distance=max(1, int(cfg.peak_min_distance_px)), threshold_abs=th,
                         exclude_border=False)
    pts = pts.astype(np.float64).reshape(-1, 2)
    return pts, sm[pts[:, 0].astype(int), pts[:, 1].astype(int)] if len(pts) else np.zeros(0)


# ------------------------------------------------------------------------------------------ nuclei CSV


def hover_type_names(backbone: Backbone) -> list[str]:
    """Names of the HoVer type branch's classes (index 0 = background), from the backbone's description."""
    heads = backbone.desc.get("heads") or {}
    names = (heads.get("hover") or {}).get("classes") if isinstance(heads, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []


class NucleiCSV:
    """Append per-nucleus rows (:data:`NUCLEI_COLUMNS`) to a CSV file, one table at a time."""

    def __init__(self, path: str | os.PathLike, *, mpp: float, type_names: Sequence[str] = ()) -> None:
        self.path, self.mpp, self.type_names = Path(path), mpp, list(type_names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", newline="")  # noqa: SIM115 - closed by close()
        self._w = csv.writer(self._f)
        self._w.writerow(NUCLEI_COLUMNS)
        self.rows = 0

    def write(self, table: dict, offset: tuple[int, int] = (0, 0)) -> None:
        n = len(table["id"])
        bbox = np.asarray(table["bbox"], np.int64).reshape(n, 4) + np.array([*offset, *offset])
        typ = table.get("type")
        for i in range(n):
            t = int(typ[i]) if typ is not None else ""
            name = self.type_names[t] if typ is not None and t < len(self.type_names) else ""
            prob = f"{float(table['type_prob'][i]):.4f}" if typ is not None else ""
            area = int(table["area_px"][i])
            self._w.writerow([int(table["id"][i]), f"{table['centroid_row'][i] + offset[0]:.2f}",
                              f"{table['centroid_col'][i] + offset[1]:.2f}", *bbox[i].tolist(), area,
                              f"{area * self.mpp ** 2:.3f}", t, name, prob])
        self.rows += n

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class NucleiGeoJSON:
    """Write nuclei outlines as a GeoJSON ``FeatureCollection`` of polygons, one table at a time (streamed to disk).

    QuPath's layout (File → Import objects): ``properties.objectType = "detection"``, the nuclear type (when the
    backbone has a type branch) as ``properties.classification.name``, and ``properties.measurements`` with the
    table's id, area (px and µm²) and type probability. Coordinates are level-0 pixels, ``x`` = column and ``y`` =
    row, with pixel ``(0, 0)`` covering ``[0, 1)²`` (QuPath's and most GIS tools' convention), i.e. the
    table's pixel-centre contours shifted by half a pixel. Each ring is closed (first vertex = last)."""

    def __init__(self, path: str | os.PathLike, *, mpp: float, type_names: Sequence[str] = ()) -> None:
        self.path, self.mpp, self.type_names = Path(path), mpp, list(type_names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")  # noqa: SIM115 - closed by close()
        self._f.write('{"type": "FeatureCollection", "features": [')
        self.rows = 0

    def write(self, table: dict, offset: tuple[int, int] = (0, 0)) -> None:
        """Append the nuclei of ``table`` (:func:`.postprocess.instance_table` columns, with ``contour``), its
        coordinates shifted by ``offset (row, col)``."""
        n = len(table["id"])
        if n and len(table.get("contour") or ()) != n:
            raise ValueError(f"{self.path}: the nuclei table has no contour per nucleus (got "
                             f"{len(table.get('contour') or ())} for {n} nuclei)")
        typ = table.get("type")
        for i in range(n):
            ring = np.asarray(table["contour"][i], np.float64).reshape(-1, 2)[:, ::-1] \
                + (offset[1] + 0.5, offset[0] + 0.5)
            if len(ring) and not np.array_equal(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            area = int(table["area_px"][i])
            measurements = {"id": int(table["id"][i]), "area_px": area, "area_um2": round(area * self.mpp**2, 3)}
            props: dict = {"objectType": "detection", "measurements": measurements}
            if typ is not None:
                t = int(typ[i])
                measurements["type_prob"] = round(float(table["type_prob"][i]), 4)
                props["classification"] = {"name": self.type_names[t] if t < len(self.type_names) else str(t)}
            feature = {"type": "Feature", "id": str(int(table["id"][i])),
                       "geometry": {"type": "Polygon", "coordinates": [np.round(ring, 2).tolist()]},
                       "properties": props}
            self._f.write(("\n" if self.rows == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            self.rows += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.write("\n]}\n")
            self._f.close()


class NucleiOutputs:
    """The per-nucleus outputs of a streamed prediction, written window by window: the table
    (:class:`NucleiCSV`, at ``path``) and the outlines (:class:`NucleiGeoJSON`, the same name with ``.geojson``)."""

    def __init__(self, path: str | os.PathLike, *, mpp: float, type_names: Sequence[str] = ()) -> None:
        self.table = NucleiCSV(path, mpp=mpp, type_names=type_names)
        self.outlines = NucleiGeoJSON(Path(path).with_suffix(".geojson"), mpp=mpp, type_names=type_names)
        self.path, self.geojson = self.table.path, self.outlines.path

    @property
    def rows(self) -> int:
        return self.table.rows

    def write(self, table: dict, offset: tuple[int, int] = (0, 0)) -> None:
        self.table.write(table, offset)
        self.outlines.write(table, offset)

    def close(self) -> None:
        self.table.close()
        self.outlines.close()


class ObjectsCSV:
    """Write a per-object table (:data:`.postprocess.OBJECT_COLUMNS`; :class:`.postprocess.ObjectStats`) to CSV."""

    @staticmethod
    def write(path: str | os.PathLike, table: dict, *, mpp: float, classes: Sequence[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(OBJECT_COLUMNS)
            for i in range(len(table["id"])):
                c = int(table["class"][i])
                area = int(table["area_px"][i])
                w.writerow([int(table["id"][i]), c, classes[c] if c < len(classes) else "",
                            f"{table['centroid_row'][i]:.2f}", f"{table['centroid_col'][i]:.2f}",
                            *np.asarray(table["bbox"][i], np.int64).tolist(), area, f"{area * mpp ** 2:.2f}"])
        return path


def nuclei_centroids(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``ids (N,)`` and centroids ``(N, 2)`` (row, col) of a nuclei CSV written by :class:`NucleiCSV`."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        try:
            cols = [header.index(c) for c in ("id", "centroid_row", "centroid_col")]
        except ValueError:
            raise ValueError(f"{path}: not a nuclei table (needs id, centroid_row, centroid_col columns)") from None
        picked = [[row[c] for c in cols] for row in reader if row]  # only the three columns of each row
    a = np.array(picked, dtype=np.float64).reshape(-1, 3)
    return a[:, 0].astype(np.int64), a[:, 1:]


# ------------------------------------------------------------------------------------------ streamed


def head_input(feats: torch.Tensor, x: torch.Tensor, colour: Callable | None) -> torch.Tensor:
    """What the adapted head sees: the backbone's features of the tile ``x``, and its colour inputs when the head
    has them (``colour``: :meth:`.pipeline.AdaptedHead.colour_input`)."""
    return feats if colour is None else torch.cat([feats, colour(x).to(feats.dtype)], 1)


NP_SOURCES = ("blend", "adapted", "hover")


def _check_np_source(np_source: str) -> None:
    if np_source not in NP_SOURCES:
        raise ValueError(f"np_source must be one of {', '.join(map(repr, NP_SOURCES))}, got {np_source!r}")


def blend_np(fg: torch.Tensor, hover_np: torch.Tensor, weight: float, gate_px: int) -> torch.Tensor:
    """Nuclear-pixel map ``weight * min(hover_np, maxfilter(fg)) + (1 - weight) * fg`` for ``(N, 1, h, w)`` maps:
    the HoVer NP branch's sharper nuclei, capped by the adapted foreground ``fg`` max-filtered over ``gate_px``
    pixels (a square of side ``2 * gate_px + 1``), so that nuclei the adapted head rejects stay out."""
    if gate_px > 0:
        hover_np = torch.minimum(hover_np, F.max_pool2d(fg, 2 * gate_px + 1, stride=1, padding=gate_px))
    return weight * hover_np + (1 - weight) * fg


def nuclear_pixel_map(fg: torch.Tensor, np_logits: torch.Tensor, np_source: str, cfg: HoVerPostConfig,
                      model_mpp: float) -> torch.Tensor:
    """The ``(N, 1, h, w)`` nuclear-pixel map at the model's resolution (``model_mpp`` µm/px) from the adapted
    foreground probability ``fg`` and the HoVer NP branch's logits, as ``np_source`` says (see :func:`predict`)."""
    if np_source == "adapted":
        return fg
    branch = np_logits.float().softmax(1)[:, 1:]
    if np_source == "hover":
        return branch
    return blend_np(fg, branch, cfg.np_hover_weight, int(round(cfg.np_gate_um / model_mpp)))


def _forward_for(m: torch.nn.Module, instances: bool, np_source: str, nc: bool, smooth_px: float = 0.0,
                 colour: Callable | None = None, hover_cfg: HoVerPostConfig | None = None,
                 model_mpp: float | None = None) -> Callable:
    """The per-batch forward of a prediction. With ``instances``, ``model_mpp`` (the backbone's µm/px) is needed:
    the blend's gate is a radius in µm."""
    if instances and model_mpp is None:
        raise ValueError("_forward_for: model_mpp is needed with instances")
    hc = hover_cfg or HoVerPostConfig()

    def fwd(x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = m.features(x)
        seg = m.heads["user"](head_input(feats, x, colour))["seg"].float().softmax(1)
        out = {"seg": seg}
        if smooth_px > 0:
            out["dec"] = gaussian_smooth(seg, smooth_px)
        if instances:
            hov = m.heads["hover"](feats)
            out["np"] = nuclear_pixel_map(1 - seg[:, :1], hov["np"], np_source, hc, model_mpp)
            # unclamped: the maps are clipped to [-1, 1] after blending and resizing (at the write of a streamed
            # prediction); clamping before resizing a 0.5 µm/px map to a 40x image flattens the HV gradients at the
            # nucleus borders that the marker watershed needs (MoNuSeg AJI -0.016, BENCHMARKS.md)
            out["hv"] = hov["hv"].float()
            if nc:
                out["nc"] = hov["nc"].float().softmax(1)
        return out
    return fwd


@dataclass
class _Job:
    """Everything a band pass needs (one object instead of a dozen arguments)."""

    image: LazyImage
    root: object  # the zarr group
    runner: TileRunner
    tiling: TilingConfig
    tile: int
    halo: int
    multiple: int
    scale: float
    pool: ThreadPoolExecutor
    threshold: float | None = None  # the head's calibrated class-decision threshold

    def model_hw(self, h: int, w: int) -> tuple[int, int] | None:
        if self.scale == 1.0:
            return None
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))


def _band_pass(job: _Job, region: tuple[int, int, int, int], write: tuple[int, int, int, int],
               after: Callable[[int], Generator[dict, None, None]] | None = None) -> Generator[dict, None, int]:
    """Predict ``region (r0, c0, r1, c1)`` of the image row of tiles by row of tiles; write the part inside
    ``write`` to the zarr arrays; call ``after(rows_final)`` (global row) after each row of tiles."""
    R0, C0, R1, C1 = region
    H, W = R1 - R0, C1 - C0
    tiles = [(r0 + R0, c0 + C0, r1 + R0, c1 + C0)
             for r0, c0, r1, c1 in tile_grid((H, W), job.tile, job.halo, job.multiple)]
    starts = sorted({t[0] for t in tiles})
    rows = tiles[0][2] - tiles[0][0]
    wide = sum(job.runner.channels.values()) * rows * W * 4 > job.tiling.band_float32_max_mb * 2**20
    blender = BandBlender(W, rows, job.runner.channels, np.float16 if wide else np.float32)
    per_batch = job.tiling.batch_for(job.runner.devices) * len(job.runner.devices)
    batches = [b for s in starts for b in _chunks([t for t in tiles if t[0] == s], per_batch)]
    reads = [job.pool.submit(_read_batch, job.image, batches[0])] if batches else []
    done, i = 0, 0
    for k, s in enumerate(starts):
        while i < len(batches) and batches[i][0][0] == s:
            crops = reads.pop(0).result()
            if i + 1 < len(batches):
                reads.append(job.pool.submit(_read_batch, job.image, batches[i + 1]))
            for group, stack in crops:
                out = job.runner(stack, job.model_hw(*stack.shape[1:3]))
                for j, (r0, c0, r1, c1) in enumerate(group):
                    win = blend_window(r1 - r0, c1 - c0, job.halo, (r0 == R0, r1 == R1, c0 == C0, c1 == C1))
                    blender.add({n: v[j] for n, v in out.items()}, win, r0 - R0, c0 - C0)
                    done += 1
                    yield {"stage": "predict", "done": done, "total": len(tiles), "tile": (r0, c0, r1, c1)}
            i += 1
        until = starts[k + 1] - R0 if k + 1 < len(starts) else H
        top = blender.top
        _write_rows(job.root, blender.release(until), (top + R0, C0), write, job.tile - 2 * job.halo, job.threshold)
        if after is not None:
            yield from after(until + R0)
    return len(tiles)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _read_batch(image: LazyImage, batch: list) -> list[tuple[list, np.ndarray]]:
    return [(g, np.stack([image.read(*t) for t in g])) for g in group_by_shape(batch)]


def _write_rows(root, maps: dict[str, np.ndarray], origin: tuple[int, int], write: tuple[int, int, int, int],
                block: int, threshold: float | None = None) -> None:
    """Write blended maps whose top-left pixel is image ``origin``, clipped to the ``write`` rectangle, in column
    blocks of ``block`` px (the zarr chunk width: whole chunks, small temporaries)."""
    wr0, wc0, wr1, wc1 = write
    n, w = maps["seg"].shape[1:]
    r0, r1 = max(origin[0], wr0), min(origin[0] + n, wr1)
    for c0 in range(max(origin[1], wc0), min(origin[1] + w, wc1), block):
        c1 = min(c0 + block, origin[1] + w, wc1)
        if r1 <= r0:
            return
        sl = (slice(r0 - origin[0], r1 - origin[0]), slice(c0 - origin[1], c1 - origin[1]))
        root["semantic"][r0:r1, c0:c1] = decide(maps.get("dec", maps["seg"])[(slice(None), *sl)], threshold)
        if "fg" in root:
            seg = maps["seg"][(slice(None), *sl)]
            root["fg"][r0:r1, c0:c1] = np.rint(np.clip(1 - seg[0], 0, 1) * NP_LEVELS).astype(np.uint8)
            root["fgc"][r0:r1, c0:c1] = (1 + seg[1:].argmax(0)).astype(np.uint8)
        if "np" in maps:
            root["np"][r0:r1, c0:c1] = np.rint(np.clip(maps["np"][0][sl], 0, 1) * NP_LEVELS).astype(np.uint8)
            root["hv"][:, r0:r1, c0:c1] = np.rint(np.clip(maps["hv"][(slice(None), *sl)], -1, 1) * HV_LEVELS
                                                  ).astype(np.int8)
        if "nc" in maps:
            root["nc"][:, r0:r1, c0:c1] = np.rint(maps["nc"][(slice(None), *sl)] * NC_LEVELS).astype(np.uint8)


def _segmenter(root, post: HoVerPostProcessor, mpp: float, offset: tuple[int, int]) -> Callable:
    """``segment(r0, c0, r1, c1)`` on the stored NP/HV(/NC) maps (window coordinates relative to ``offset``)."""
    has_nc = "nc" in root

    def segment(r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, dict]:
        r0, r1, c0, c1 = r0 + offset[0], r1 + offset[0], c0 + offset[1], c1 + offset[1]
        np_prob = root["np"][r0:r1, c0:c1].astype(np.float32) / NP_LEVELS
        hv = root["hv"][:, r0:r1, c0:c1].astype(np.float32) / HV_LEVELS
        nc = np.clip(root["nc"][:, r0:r1, c0:c1].astype(np.float32) / NC_LEVELS, 0, 1) if has_nc else None
        return post(np_prob, hv, mpp, nc)

    return segment


def _check_roi(roi: Sequence[int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = (int(v) for v in roi)
    r0, c0, r1, c1 = max(0, r0), max(0, c0), min(shape[0], r1), min(shape[1], c1)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"roi {tuple(roi)} (r0, c0, r1, c1) does not overlap the image of {shape[0]}x{shape[1]}")
    return r0, c0, r1, c1


def predict_large(
    backbone: Backbone,
    head: AdaptedHead,
    source: str | os.PathLike | LazyImage | np.ndarray,
    *,
    out_dir: str | os.PathLike,
    mpp: float | None = None,
    devices: str | Sequence[str] | None = "cpu",
    tiling: TilingConfig | None = None,
    instances: bool = False,
    hover: HoVerPostConfig | None = None,
    roi: Sequence[int] | None = None,
    roi_only: bool = False,
    np_source: str = "blend",
    nuclei_csv: str | os.PathLike | None = None,
    objects: bool = False,
    object_cfg: ObjectPostConfig | None = None,
    objects_csv: str | os.PathLike | None = None,
    cells_radius_px: float | None = None,
    points_csv: str | os.PathLike | None = None,
) -> Generator[dict, None, LargePrediction]:
    """Predict a large image streamed into the zarr group ``out_dir`` (see :class:`LargePrediction`).

    ``source``: a path (:func:`.slide.open_image`), an open :class:`.slide.LazyImage` or an array. ``mpp``: µm per
    pixel of the image (default: its metadata, else the backbone's, with a warning). ``roi = (r0, c0, r1, c1)``
    (image pixels, e.g. the visible field of view) is predicted first and announced by a ``{"stage": "roi"}``
    progress event; its tiles are computed again by the full pass, which ``roi_only`` skips. The nuclei table
    goes to ``nuclei_csv`` (default ``<out_dir without .zarr>.nuclei.csv``), their outlines next to it
    (``.nuclei.geojson``, :class:`NucleiGeoJSON`). ``objects``: large-object instances
    of the semantic foreground after the full pass (not for ``roi_only``), found on a grid of about
    ``object_cfg.large_work_mpp_um`` and painted back in row strips, table in ``objects_csv`` (default
    ``<out_dir without .zarr>.objects.csv``). Progress: ``{"stage": "predict" | "instances" | "objects", "done",
    "total"}`` per tile / per instance window / per strip. Close the generator to cancel. ``np_source``: as for
    :func:`predict`. ``cells_radius_px`` (a head adapted on clicked centroids: their circles' radius in image
    pixels): the cells are detected as in :func:`detect_cells`, window by window over the stored foreground
    probability (``fg``) and its most probable class (``fgc``), into ``points_csv`` (default ``<out_dir without
    .zarr>.points.csv``; ``row,col,class,class_name,prob``; ``{"stage": "cells"}`` progress per window).
    """
    _check_np_source(np_source)
    t0 = time.time()
    tiling = tiling or TilingConfig()
    devs = resolve_devices(devices)
    image = source if isinstance(source, LazyImage) else open_image(source)
    try:
        # out of memory: start again (outputs are rewritten from scratch) with a smaller batch, then smaller tiles
        res = yield from oom_fallback_gen(
            lambda t: _predict_large(backbone, head, image, Path(out_dir), mpp, devs, t, instances,
                                     hover or HoVerPostConfig(), roi, roi_only, np_source, nuclei_csv,
                                     cells=bool(cells_radius_px)), tiling)
        if cells_radius_px:
            res.complete = False
            res.points_csv = Path(points_csv) if points_csv else Path(out_dir).with_suffix(".points.csv")
            area = res.roi if roi_only and res.roi is not None else (0, 0, *res.shape)
            res.n_cells = yield from large_cells(res, cells_radius_px, res.points_csv, area,
                                                 window_px=(tiling or TilingConfig()).instance_window_px)
            res.complete = True
        if objects and not (roi_only and roi is not None):
            res.complete = False
            res.objects_csv = Path(objects_csv) if objects_csv else Path(out_dir).with_suffix(".objects.csv")
            res.n_objects = yield from large_objects(res, object_cfg or ObjectPostConfig(), res.objects_csv)
            res.complete = True
        # a visible-field-only prediction (live re-adaptation of a slide) holds labels in the roi only
        yield from label_pyramids(res, tiling, res.roi if roi_only and res.roi is not None else None)
    finally:
        if image is not source:
            image.close()
    res.seconds = time.time() - t0
    return res


def _predict_large(backbone, head, image, out, mpp, devs, tiling, instances, hover, roi, roi_only, np_source,
                   nuclei_csv, cells: bool = False) -> Generator[dict, None, LargePrediction]:
    if mpp is None and image.mpp is None:
        log.warning("%s: no µm-per-pixel in the metadata; assuming the backbone's %.3f", image.name, backbone.mpp)
    mpp = float(mpp or image.mpp or backbone.mpp)
    scale = mpp / backbone.mpp  # model pixels per image pixel (a 0.25 µm/px image is halved for a 0.5 model)
    scale = 1.0 if abs(scale - 1) < SCALE_TOLERANCE else scale
    tile, halo, multiple = image_tiling(tiling, scale)
    H, W = image.height, image.width
    model = _inference_model(backbone, head)
    has_nc = instances and getattr(model.heads["hover"], "nc", None) is not None
    smooth_px = _decision_smoothing_px(head, backbone, tiling)
    colour = head.colour_input(backbone, image)
    fwds = [tta_forward(_forward_for(m, instances, np_source, has_nc, smooth_px, colour, hover, backbone.mpp),
                        tiling.tta_variants) for m in _replicas(model, devs, tiling)]
    channels = {"seg": len(head.classes), **({"dec": len(head.classes)} if smooth_px > 0 else {})}
    arrays = {"semantic": ((), "uint8")}
    if cells:  # for detect_cells: the foreground probability (NP_LEVELS) and the most probable foreground class
        arrays.update({"fg": ((), "uint8"), "fgc": ((), "uint8")})
    if instances:
        n_types = model.heads["hover"].nc[-1].out_channels if has_nc else 0
        channels.update({"np": 1, "hv": 2, **({"nc": n_types} if has_nc else {})})
        arrays.update({"instances": ((), "uint32"), "np": ((), "uint8"), "hv": ((2,), "int8"),
                       **({"nc": ((n_types,), "uint8")} if has_nc else {})})
    types = hover_type_names(backbone) if has_nc else []
    root = create_outputs(out, (H, W), arrays, chunk_px=tile - 2 * halo, attrs={
        "classes": list(head.classes), "mpp": mpp, "source": image.name, "backbone_sha256": backbone.sha256,
        "tiling": to_dict(tiling), "hover_types": types, "np_source": np_source,
        "scales": {"np": 1 / NP_LEVELS, "hv": 1 / HV_LEVELS, "nc": 1 / NC_LEVELS}})
    res = LargePrediction(out, (H, W), list(head.classes), mpp, 0, type_names=types, complete=False)
    post = HoVerPostProcessor(hover)
    core, margin = tiling.instance_window_px, math.ceil(tiling.instance_margin_um / mpp)
    table = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as pool:
        runner = TileRunner(fwds, devs, tiling, channels, cpu_channels_last=True)
        job = _Job(image, root, runner, tiling, tile, halo, multiple, scale, pool, head.threshold)
        try:
            if roi is not None:
                res.roi = _check_roi(roi, (H, W))
                if roi_only and instances:  # the region is all there will be: its nuclei get the table
                    table = NucleiOutputs(Path(nuclei_csv) if nuclei_csv else out.with_suffix(".nuclei.csv"),
                                          mpp=mpp, type_names=types)
                    res.nuclei_csv, res.nuclei_geojson = table.path, table.geojson
                res.n_instances = yield from _roi_pass(job, res.roi, instances, post, mpp, core, margin, table)
                if roi_only:
                    return res
            if instances:
                table = NucleiOutputs(Path(nuclei_csv) if nuclei_csv else out.with_suffix(".nuclei.csv"), mpp=mpp,
                                      type_names=types)
                res.nuclei_csv, res.nuclei_geojson = table.path, table.geojson
                stitch = InstanceStitcher((H, W), core=core, margin=margin, segment=_segmenter(root, post, mpp, (0, 0)),
                                          write=lambda r, block: root["instances"].__setitem__(
                                              (slice(r, r + block.shape[0]), slice(None)), block),
                                          emit=table.write)
                res.tiles = yield from _band_pass(job, (0, 0, H, W), (0, 0, H, W), after=stitch.advance)
                res.n_instances = stitch.n_instances
            else:
                res.tiles = yield from _band_pass(job, (0, 0, H, W), (0, 0, H, W))
        finally:
            if table is not None:
                table.close()
    res.complete = True
    root.attrs["complete"] = True
    root.attrs["n_instances"] = res.n_instances
    log.info("%s: %d tiles, %d nuclei", image.name, res.tiles, res.n_instances)
    return res


def label_pyramids(res: LargePrediction, tiling: TilingConfig,
                   region: tuple[int, int, int, int] | None = None) -> Generator[dict, None, int]:
    """Multiscale levels (:func:`.slide.write_pyramid`) of the label arrays of a streamed prediction (semantic,
    instances, objects) when its longer side exceeds ``tiling.pyramid_min_px``; ``region``: the only part holding
    labels. Yields ``{"stage": "pyramid", "done", "total"}`` per array; returns the number of levels per array."""
    import zarr

    if not tiling.pyramid_min_px or max(res.shape) <= tiling.pyramid_min_px:
        return 0
    root = zarr.open_group(str(res.store), mode="r+")
    names = [n for n in ("semantic", "instances", "objects") if n in root]
    n = 0
    for i, name in enumerate(names):
        yield {"stage": "pyramid", "done": i, "total": len(names)}
        n = len(write_pyramid(root, name, min_side_px=tiling.pyramid_min_px, strip_mb=tiling.pyramid_strip_mb,
                              region=region))
    yield {"stage": "pyramid", "done": len(names), "total": len(names)}
    return n


def large_objects(res: LargePrediction, cfg: ObjectPostConfig, csv_path: str | os.PathLike,
                  strip_px: int = 1024) -> Generator[dict, None, int]:
    """Large-object instances of the stored semantic map of ``res`` (written to its ``objects`` array, table to
    ``csv_path``): the foreground is read in row strips of about ``strip_px`` rows and down-sampled to a grid of
    about ``cfg.large_work_mpp_um`` (:func:`.postprocess.object_factor`), the objects found there
    (:class:`.postprocess.CoarseObjects`) and painted back strip by strip. Memory: the coarse grid plus one strip.
    Yields ``{"stage": "objects", "done", "total"}`` (two passes over the strips); returns the object count."""
    import zarr

    root = zarr.open_group(str(res.store), mode="r+")
    sem = root["semantic"]
    H, W = res.shape
    f = object_factor(dataclasses.replace(cfg, work_mpp_um=max(cfg.work_mpp_um, cfg.large_work_mpp_um)), res.mpp)
    strip = max(f, strip_px // f * f)  # a multiple of the factor: strips map onto whole coarse rows
    starts = list(range(0, H, strip))
    total = 2 * len(starts)
    coarse = np.zeros((-(-H // f), -(-W // f)), bool)
    for k, r0 in enumerate(starts):
        block = sem[r0:r0 + strip] > 0
        coarse[r0 // f: r0 // f + -(-block.shape[0] // f)] = downsample_mask(block, f)
        yield {"stage": "objects", "done": k + 1, "total": total}
    objs = CoarseObjects(coarse, cfg, res.mpp * f, f)
    del coarse
    if "objects" not in root:
        root.create_array("objects", shape=(H, W), chunks=sem.chunks, dtype="uint32", fill_value=0)
    stats = ObjectStats(objs.n, len(res.classes))
    for k, r0 in enumerate(starts):
        s = sem[r0:r0 + strip]
        lab = objs.paint(s > 0, r0, 0)
        root["objects"][r0:r0 + s.shape[0]] = lab
        stats.add(lab, s, r0, 0)
        yield {"stage": "objects", "done": len(starts) + k + 1, "total": total}
    table = stats.table()
    ObjectsCSV.write(csv_path, table, mpp=res.mpp, classes=res.classes)
    root.attrs["n_objects"] = int(len(table["id"]))
    root.attrs["objects_work_factor"] = int(f)
    return int(len(table["id"]))


def _roi_pass(job: _Job, roi, instances: bool, post, mpp: float, core: int, margin: int,
              table: NucleiOutputs | None = None) -> Generator[dict, None, int]:
    """Predict the ROI (with a halo of context) and segment its nuclei, before the full pass; with ``table``
    (a prediction of the ROI only) their rows go to it in image coordinates. Returns the ROI's nucleus count."""
    r0, c0, r1, c1 = roi
    region = (max(0, r0 - job.halo), max(0, c0 - job.halo), min(job.image.height, r1 + job.halo),
              min(job.image.width, c1 + job.halo))
    gen = _band_pass(job, region, roi)
    for p in gen:
        yield {**p, "stage": "roi-predict"}
    n = 0
    if instances:
        root = job.root
        stitch = InstanceStitcher((r1 - r0, c1 - c0), core=core, margin=margin,
                                  segment=_segmenter(root, post, mpp, (r0, c0)),
                                  write=lambda r, block: root["instances"].__setitem__(
                                      (slice(r0 + r, r0 + r + block.shape[0]), slice(c0, c1)), block),
                                  emit=(lambda t: table.write(t, (r0, c0))) if table is not None else (lambda t: None))
        for p in stitch.advance(r1 - r0):
            yield {**p, "stage": "roi-instances"}
        n = stitch.n_instances
    yield {"stage": "roi", "done": 1, "total": 1, "region": roi}
    return n
