"""The Adapt & predict widget's jobs: generators over the core API (no Qt objects), run by ``thread_worker``.

They yield the core progress dicts unchanged plus a few of their own: ``{"stage": "adapted", "head"}`` once
the head is ready (so the GUI keeps it even if prediction is cancelled later) and ``{"stage": "preview",
"prediction", "region"}`` with the visible field of view, predicted before the full image.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import HoVerPostConfig, MAMLConfig, MitosisConfig, ObjectPostConfig, TilingConfig
from ..inference import Prediction, hover_type_names, predict
from ..pipeline import AdaptedHead, Backbone, adapt

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


@dataclass
class Result:
    """A finished prediction, plus mitosis candidates when asked for."""

    prediction: Prediction
    mitosis_points: np.ndarray | None = None  # (N, 2) row, col
    mitosis_probs: np.ndarray | None = None  # (N,) probability of "mitotic"
    type_names: list[str] = field(default_factory=list)  # HoVer nucleus types (index 0 = background)


def _predict_region(backbone: Backbone, head: AdaptedHead, image: np.ndarray, s: PredictSettings,
                    ) -> Generator[dict, None, Prediction]:
    return (yield from predict(backbone, head, image, mpp=s.mpp, devices=list(s.devices), tiling=s.tiling,
                               instances=s.instances, hover=s.hover, np_source="adapted", objects=s.objects,
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


def predict_job(backbone: Backbone | Callable[[], Backbone], head: AdaptedHead, image: np.ndarray,
                settings: PredictSettings) -> Generator[dict, None, Result]:
    """Predict the visible region first (yielded as a preview), then the whole image."""
    bb = backbone() if callable(backbone) else backbone
    if settings.region is not None:
        r0, r1, c0, c1 = settings.region
        part = yield from _predict_region(bb, head, image[r0:r1, c0:c1], settings)
        yield {"stage": "preview", "prediction": part, "region": settings.region}
    pred = yield from _predict_region(bb, head, image, settings)
    result = Result(pred, type_names=hover_type_names(bb))
    if settings.mitosis_model is not None and MITOSIS_AVAILABLE:
        result.mitosis_points, result.mitosis_probs = yield from _mitosis(image, pred.table, settings,
                                                                            settings.mpp or bb.mpp)
    return result


def adapt_job(backbone: Callable[[], Backbone], image: np.ndarray, support: np.ndarray, classes: list[str],
              colours: list[str], cfg: MAMLConfig, devices: Sequence[str], init: AdaptedHead | None,
              mpp: float | None, then_predict: PredictSettings | None) -> Generator[dict, None, Result | None]:
    """Adapt a head on one support image; optionally predict with it. Returns the prediction (or None)."""
    yield {"stage": "backbone"}
    bb = backbone()
    head = yield from adapt(bb, [image], [support], classes, mpp=mpp, cfg=cfg, devices=list(devices), init=init)
    head.colours = list(colours)
    yield {"stage": "adapted", "head": head}
    if then_predict is None:
        return None
    return (yield from predict_job(bb, head, image, then_predict))
