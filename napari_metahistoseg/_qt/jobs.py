"""The Adapt & predict widget's jobs: generators over the core API (no Qt objects), run by ``thread_worker``.

They yield the core progress dicts unchanged plus a few of their own: ``{"stage": "adapted", "head"}`` once
the head is ready (so the GUI keeps it even if prediction is cancelled later) and ``{"stage": "preview",
"prediction", "region"}`` with the visible field of view, predicted before the full image, and ``{"stage":
"backbone", "mpp_assumed"}`` when the image's µm per pixel is unknown (the backbone's is used; the GUI says so).

Images above ``TilingConfig.stream_above_mp`` megapixels (slides) are never read whole: the support is cut out
around the painted pixels for adaptation, and prediction streams tile by tile into a zarr store
(:func:`~napari_metahistoseg.inference.predict_large`) whose arrays (with their levels) the viewer shows
multiscale, loading only what is on screen.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..config import HoVerPostConfig, MAMLConfig, MitosisConfig, ObjectPostConfig, TilingConfig
from ..data.task import IGNORE
from ..inference import (
    LargePrediction,
    Prediction,
    detect_cells,
    hover_type_names,
    nuclei_centroids,
    predict,
    predict_large,
    read_cells,
)
from ..maml import relay
from ..pipeline import CONTEXT_PX, AdaptedHead, Backbone, adapt
from ..slide import label_window, open_array

PREDICTIONS_ENV = "METAHISTOSEG_PREDICTIONS"  # where streamed predictions of large images go (zarr stores)

MITOSIS_AVAILABLE = importlib.util.find_spec("napari_metahistoseg.mitosis") is not None


@dataclass
class PredictSettings:
    """What Predict runs (everything but the image and the head)."""

    mpp: float | None = None
    devices: Sequence[str] = ("cpu",)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    instances: bool = True
    hover: HoVerPostConfig = field(default_factory=HoVerPostConfig)
    region: tuple[int, int, int, int] | None = None  # (r0, r1, c0, c1) predicted first, then the full image
    mitosis_model: str | None = None  # path of a mitosis classifier, "" = bundled, None = no mitosis step
    mitosis: MitosisConfig = field(default_factory=MitosisConfig)
    objects: bool = False  # large-object (gland) instances of the foreground
    object_cfg: ObjectPostConfig = field(default_factory=ObjectPostConfig)
    stream_dir: str | None = None  # folder of the zarr stores of large images (None: predictions_root())
    roi_only: bool = False  # large images: predict the visible field (``region``) only (live re-adaptation)
    name: str = "image"  # names the store and the errors of a streamed prediction
    # the head was adapted on clicked centroids: their circles' radius in this image's pixels; the cells are then
    # detected as points (:func:`~napari_metahistoseg.inference.detect_cells`; streamed: ``large_cells``)
    cells_radius_px: float | None = None


def predictions_root() -> Path:
    """``$METAHISTOSEG_PREDICTIONS`` if set, else ``~/.napari-metahistoseg/predictions``."""
    return Path(os.environ.get(PREDICTIONS_ENV) or Path.home() / ".napari-metahistoseg" / "predictions")


KEEP_STORES = 2  # streamed predictions kept per image (the one shown and the one before); older ones are deleted


def prune_stores(current: Path, keep: int = KEEP_STORES) -> list[Path]:
    """Delete older streamed predictions of the same image next to ``current`` (``<name>-<date>-<time>-<ms>.zarr``
    stores written by this plugin), keeping the newest ``keep``; returns what was deleted. Live re-adaptation of a
    slide would otherwise leave a store per stroke."""
    import re
    import shutil

    current = Path(current)
    m = re.fullmatch(r"(.+)-\d{8}-\d{6}-\d{3}\.zarr", current.name)
    if m is None:
        return []
    pattern = re.compile(re.escape(m.group(1)) + r"-\d{8}-\d{6}-\d{3}\.zarr")
    ours = sorted((p for p in current.parent.iterdir() if p.is_dir() and pattern.fullmatch(p.name)
                   and (p / "zarr.json").exists()), key=lambda p: p.name)
    old = [p for p in ours[:-keep] if p != current] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


_PRUNER: Any = None


def prune_later(current: Path, keep: int = KEEP_STORES) -> Any:
    """:func:`prune_stores` on a background thread (deleting a slide-sized store takes a while); returns its
    ``Future``. One thread: prunings of successive predictions run in order."""
    global _PRUNER
    if _PRUNER is None:
        from concurrent.futures import ThreadPoolExecutor

        _PRUNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metahistoseg-prune")
    return _PRUNER.submit(prune_stores, current, keep)


def is_large(image: Any, tiling: TilingConfig) -> bool:
    """Whether ``image`` (any array-like) is predicted streamed instead of in memory."""
    return int(image.shape[0]) * int(image.shape[1]) > tiling.stream_above_mp * 1e6


@dataclass
class Result:
    """A finished prediction (in memory, or ``large``: streamed into a zarr store), plus mitosis candidates."""

    prediction: Prediction | None
    mitosis_points: np.ndarray | None = None  # (N, 2) row, col
    mitosis_probs: np.ndarray | None = None  # (N,) probability of "mitotic"
    cells: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # detected cells: points, classes, probabilities
    type_names: list[str] = field(default_factory=list)  # HoVer nucleus types (index 0 = background)
    large: LargePrediction | None = None
    # per-layer feature tables of a streamed prediction ("instances", "objects"), read from its CSVs on the worker
    # thread so that showing the layers never parses a slide's table on the GUI thread
    features: dict[str, Any] = field(default_factory=dict)


def read_features(path: str | Path | None) -> Any:
    """A nuclei/objects CSV (:data:`~napari_metahistoseg.inference.NUCLEI_COLUMNS`,
    :data:`~napari_metahistoseg.postprocess.OBJECT_COLUMNS`) as a layer features table: a pandas DataFrame with
    ``id`` renamed ``index`` (napari's key to the label ids) and the CSV's other columns; None without a
    table."""
    import pandas as pd

    return None if path is None else pd.read_csv(path).rename(columns={"id": "index"})


def _predict_region(backbone: Backbone, head: AdaptedHead, image: np.ndarray, s: PredictSettings,
                    ) -> Generator[dict, None, Prediction]:
    return (yield from predict(backbone, head, image, mpp=s.mpp, devices=list(s.devices), tiling=s.tiling,
                               instances=s.instances, hover=s.hover, np_source="blend", objects=s.objects,
                               object_cfg=s.object_cfg))


def _mitosis(image: np.ndarray, table: dict | None, s: PredictSettings, mpp: float) -> Generator[dict, None, tuple]:
    from .. import mitosis

    yield {"stage": "mitosis", "done": 0, "total": 1}
    model, _ = mitosis.load_mitosis_model(s.mitosis_model or None)
    pts = mitosis.points_from_table(table) if table and len(table.get("id", ())) else np.zeros((0, 2))
    probs = np.zeros(0, np.float32)
    if len(pts):
        patches, _ = mitosis.extract_patches(image, pts, mpp, model.cfg)
        probs = mitosis.classify(model, patches, device=list(s.devices)[0])
    yield {"stage": "mitosis", "done": 1, "total": 1}
    return pts, probs


def _predict_streamed(bb: Backbone, head: AdaptedHead, image: Any, s: PredictSettings) -> Generator[dict, None, Result]:
    """A large image streamed into ``<stream_dir>/<name>-<time>.zarr``; the visible field first (a preview)."""
    out = Path(s.stream_dir) if s.stream_dir else predictions_root()
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s.name)[:80] or "image"
    stamp = time.time()
    store = out / f"{safe}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}-{int(stamp * 1000) % 1000:03d}.zarr"
    lazy = image if hasattr(image, "read") else open_array(image, s.name)
    roi = (s.region[0], s.region[2], s.region[1], s.region[3]) if s.region is not None else None
    gen = predict_large(bb, head, lazy, out_dir=store, mpp=s.mpp or bb.mpp, devices=list(s.devices),
                        tiling=s.tiling, instances=s.instances, hover=s.hover, roi=roi, np_source="blend",
                        objects=s.objects, object_cfg=s.object_cfg, roi_only=s.roi_only and roi is not None,
                        cells_radius_px=s.cells_radius_px)

    def preview(p: dict) -> dict:  # the visible field is in the store: show it as the preview
        if p.get("stage") != "roi":
            return p
        import zarr

        r0, c0, r1, c1 = p["region"]
        sem = zarr.open_group(str(store), mode="r")["semantic"][r0:r1, c0:c1]
        return {"stage": "preview", "prediction": SimpleNamespace(semantic=sem), "region": (r0, r1, c0, c1)}

    res = yield from relay(gen, preview)  # closing this job (Cancel) closes the prediction between tiles
    result = Result(None, type_names=hover_type_names(bb), large=res)
    yield {"stage": "tables", "done": 0, "total": 1}
    result.features = {"instances": read_features(res.nuclei_csv), "objects": read_features(res.objects_csv)}
    if res.points_csv is not None:
        result.cells = read_cells(res.points_csv)
    yield {"stage": "tables", "done": 1, "total": 1}
    if s.mitosis_model is not None and MITOSIS_AVAILABLE and res.nuclei_csv is not None:
        result.mitosis_points, result.mitosis_probs = yield from _mitosis_streamed(lazy, res, s)
    return result


def _mitosis_streamed(lazy: Any, res: LargePrediction, s: PredictSettings) -> Generator[dict, None, tuple]:
    """Mitosis candidates of a streamed prediction: the nuclei CSV's centroids, patches read block by block."""
    from .. import mitosis

    yield {"stage": "mitosis", "done": 0, "total": 1}
    model, _ = mitosis.load_mitosis_model(s.mitosis_model or None)
    _, pts = nuclei_centroids(res.nuclei_csv)
    probs = (mitosis.classify_points_blockwise(model, lambda box: lazy.read(*box), res.shape, pts, res.mpp,
                                               device=list(s.devices)[0]) if len(pts) else np.zeros(0, np.float32))
    yield {"stage": "mitosis", "done": 1, "total": 1}
    return pts, probs


def mpp_assumed(bb: Backbone) -> dict:
    """The progress dict telling the GUI that the image's µm per pixel is unknown and the backbone's is assumed."""
    return {"stage": "backbone", "mpp_assumed": bb.mpp}


def predict_job(backbone: Backbone | Callable[[], Backbone], head: AdaptedHead, image: Any,
                settings: PredictSettings, *, tell_mpp: bool = True) -> Generator[dict, None, Result]:
    """Predict the visible region first (yielded as a preview), then the whole image — in memory, or streamed
    into a zarr store when the image is large (:func:`is_large`; mitosis patches are then read block by block).
    ``tell_mpp``: yield :func:`mpp_assumed` first when ``settings.mpp`` is unknown."""
    bb = backbone() if callable(backbone) else backbone
    if settings.mpp is None and tell_mpp:
        yield mpp_assumed(bb)
    if is_large(image, settings.tiling):
        return (yield from _predict_streamed(bb, head, image, settings))
    image = np.asarray(image)
    if settings.region is not None:
        r0, r1, c0, c1 = settings.region
        part = yield from _predict_region(bb, head, image[r0:r1, c0:c1], settings)
        yield {"stage": "preview", "prediction": part, "region": settings.region}
    pred = yield from _predict_region(bb, head, image, settings)
    result = Result(pred, type_names=hover_type_names(bb))
    if settings.cells_radius_px:
        yield {"stage": "cells", "done": 0, "total": 1}
        result.cells = detect_cells(pred.probs, radius_px=settings.cells_radius_px)
        yield {"stage": "cells", "done": 1, "total": 1}
    if settings.mitosis_model is not None and MITOSIS_AVAILABLE:
        result.mitosis_points, result.mitosis_probs = yield from _mitosis(image, pred.table, settings,
                                                                            settings.mpp or bb.mpp)
    return result


def adapt_job(backbone: Callable[[], Backbone], image: Any, support: np.ndarray, classes: list[str],
              colours: list[str], cfg: MAMLConfig, devices: Sequence[str], init: AdaptedHead | None,
              mpp: float | None, then_predict: PredictSettings | None, origin: tuple[int, int] = (0, 0),
              more: Sequence[tuple[np.ndarray, tuple[int, int]]] = ()) -> Generator[dict, None, Result | None]:
    """Adapt a head on the support of one image; optionally predict with it. Returns the prediction (or None).
    ``support`` covers the image from pixel ``origin`` (the whole image when it has the image's shape); ``more``:
    further ``(support, origin)`` regions of the same image (the support regions of a slide), each a support image
    of its own. A large image, or a support region, is cut to the painted part of each region first (with the
    context adaptation keeps around it)."""
    yield {"stage": "backbone"}
    bb = backbone()
    if mpp is None:
        yield mpp_assumed(bb)
    regions = [(support, tuple(origin))] + [(s, tuple(o)) for s, o in more]
    region = len(regions) > 1 or tuple(origin) != (0, 0) or tuple(support.shape) != tuple(image.shape[:2])
    if region or is_large(image, then_predict.tiling if then_predict is not None else TilingConfig()):
        margin = math.ceil(2 * CONTEXT_PX * bb.mpp / min(mpp or bb.mpp, bb.mpp))
        # only these windows of the image are read (predict_job reads the rest if needed)
        windows = [label_window(image, s, margin, o, unknown=IGNORE) for s, o in regions]
        windows = [w for w in windows if (w[1] != IGNORE).any()] or windows[:1]  # unpainted regions add nothing
        sup_images, sups = [w[0] for w in windows], [w[1] for w in windows]
    else:
        image = np.asarray(image)
        sup_images, sups = [image], [support]
    head = yield from adapt(bb, sup_images, sups, classes, mpp=mpp, cfg=cfg, devices=list(devices), init=init)
    head.colours = list(colours)
    yield {"stage": "adapted", "head": head}
    if then_predict is None:
        return None
    return (yield from predict_job(bb, head, image, then_predict, tell_mpp=False))
