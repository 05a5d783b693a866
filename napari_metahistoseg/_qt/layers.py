"""Conversion between napari layers and the core arrays (conventions in :mod:`napari_metahistoseg.sample_data`).

* support Labels: layer value 0 = unknown, class k painted as k + 1  ↔  core class ids with IGNORE (255);
* prediction Labels: class ids (0 = first class, shown transparent); instance Labels: ids with the per-nucleus
  table as ``features`` (column ``index`` = instance id, as napari expects);
* plugin layers carry ``metadata[META] = {"kind", "classes", "colours", "group", "image"}``.
"""

from __future__ import annotations

import uuid
from typing import Any

import napari
import numpy as np

from ..data.task import IGNORE
from ..sample_data import META, class_colours, labels_colormap, support_to_layer

__all__ = ["META", "class_colours", "support_to_layer"]

FOV_MAX_FRACTION = 0.8  # predict the visible field first only when it shows less than this share of the image
# side (px) of a support layer on an image above TilingConfig.stream_above_mp: such a layer covers a region (the
# visible field, clipped to this around its centre), not the slide — a slide-sized Labels layer costs gigabytes, is
# slow to paint (napari #8590), and every read of it (Adapt, autosave) would scan it whole
SUPPORT_REGION_MAX_PX = 4096


def plugin_meta(layer: Any) -> dict:
    return dict(layer.metadata.get(META) or {}) if layer is not None else {}


def kind_of(layer: Any) -> str | None:
    return plugin_meta(layer).get("kind")


def find_layers(viewer: napari.Viewer, kind: str, group: str | None = None) -> list:
    return [ly for ly in viewer.layers
            if kind_of(ly) == kind and (group is None or plugin_meta(ly).get("group") == group)]


def new_group() -> str:
    return uuid.uuid4().hex[:8]


def layer_to_support(values: np.ndarray) -> np.ndarray:
    """Support layer values ``(H, W)`` (0 unknown, k + 1 = class k) → ``(H, W) uint8`` class ids, IGNORE unknown."""
    v = np.asarray(values)
    if v.size and int(v.max()) > IGNORE:
        raise ValueError(f"support label {int(v.max())} is too large (at most {IGNORE} classes)")
    out = v.astype(np.int32) - 1
    out[v == 0] = IGNORE
    return out.astype(np.uint8)


def support_origin(layer: Any) -> tuple[int, int]:
    """Image pixel of a support (or circles) layer's top-left pixel: ``(0, 0)`` unless it covers a region."""
    r0, c0 = plugin_meta(layer).get("origin") or (0, 0)
    return int(r0), int(c0)


def support_region(image_layer: Any, large: bool, max_px: int = SUPPORT_REGION_MAX_PX) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` a new support layer covers: the whole image, or for a ``large`` image the visible field
    (the whole view, however much of the image it shows) clipped to ``max_px`` per side around its centre — the image
    centre when the view is not known yet."""
    h, w = image_shape(image_layer)
    if not large:
        return 0, h, 0, w
    view = visible_region(image_layer, max_fraction=1.0) if image_layer is not None else None
    r0, r1, c0, c1 = view if view is not None else (0, h, 0, w)
    out = []
    for lo, hi, size in ((r0, r1, h), (c0, c1, w)):
        side = min(hi - lo, max_px, size)
        start = min(max(0, (lo + hi) // 2 - side // 2), size - side)
        out += [start, start + side]
    return out[0], out[1], out[2], out[3]


def region_placement(image_layer: Any, origin: tuple[int, int]) -> dict:
    """:func:`placement` of a layer whose pixel (0, 0) is image pixel ``origin``."""
    place = placement(image_layer)
    if place and any(origin):
        (sy, sx), (ty, tx) = place["scale"], place["translate"]
        place["translate"] = (ty + origin[0] * sy, tx + origin[1] * sx)
    return place


def merged_support(support: Any, circles: Any | None) -> np.ndarray:
    """Painted support with the point circles filled in where nothing was painted (strokes win)."""
    sup = layer_to_support(support.data)
    if circles is not None:
        circ = layer_to_support(circles.data)
        if circ.shape != sup.shape:
            raise ValueError(f"circles layer {circles.name!r} {circ.shape} does not match the support {sup.shape}")
        fill = (sup == IGNORE) & (circ != IGNORE)
        sup[fill] = circ[fill]
    return sup


def image_array(layer: Any) -> np.ndarray:
    """The image as a numpy array (level 0 of a multiscale image)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.asarray(data)


def image_source(layer: Any) -> Any:
    """The image data as it is (level 0 of a multiscale image; numpy, zarr or dask), not read into memory."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def level0(layer: Any) -> Any:
    """The full-resolution data of a (possibly multiscale) layer, as it is (not read)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def image_shape(layer: Any) -> tuple[int, int]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return tuple(int(s) for s in data.shape[:2])


def image_mpp(layer: Any) -> float | None:
    """µm per pixel from ``metadata["mpp"]`` (None if unknown)."""
    mpp = layer.metadata.get("mpp") if layer is not None else None
    return float(mpp) if mpp else None


def visible_region(layer: Any, max_fraction: float = FOV_MAX_FRACTION) -> tuple[int, int, int, int] | None:
    """``(r0, r1, c0, c1)`` of the image (level-0 pixels) shown on the canvas, from the layer's
    ``corner_pixels`` — which napari gives in the pixels of the level on screen for a multiscale layer — or None if
    it is not known yet or covers more than ``max_fraction`` of the image."""
    h, w = image_shape(layer)
    cp = np.asarray(layer.corner_pixels, float)[:, -2:]
    if getattr(layer, "multiscale", False):
        cp = cp * np.asarray(layer.downsample_factors, float)[layer.data_level][-2:]
        cp[1] += np.asarray(layer.downsample_factors, float)[layer.data_level][-2:] - 1  # the level pixel's extent
    r0, c0 = (int(x) for x in cp[0])
    r1, c1 = (min(int(x) + 1, s) for x, s in zip(cp[1], (h, w), strict=True))
    if r1 - r0 < 2 or c1 - c0 < 2 or (r1 - r0) * (c1 - c0) > max_fraction * h * w:
        return None
    return r0, r1, c0, c1


def placement(image_layer: Any) -> dict:
    """``scale``/``translate`` of the image's last two axes, so overlays stay registered with it."""
    if image_layer is None:
        return {}
    return {"scale": tuple(image_layer.scale[-2:]), "translate": tuple(image_layer.translate[-2:])}


def set_classes(layer: Any, classes: list[str], colours: list[str], *, offset: int) -> None:
    """Store the class list in the layer's metadata and colour class k as label k + ``offset``."""
    meta = {**layer.metadata, META: {**plugin_meta(layer), "classes": list(classes), "colours": list(colours)}}
    layer.metadata = meta
    layer.colormap = labels_colormap(list(colours), offset=offset)


def table_features(table: dict | None, type_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The per-nucleus table as Labels features: ``index`` (= id), centroid, bbox, area, type/type_prob and,
    with ``type_names`` (index 0 = background), ``type_name``."""
    if not table or len(table.get("id", ())) == 0:
        return {}
    out: dict[str, np.ndarray] = {"index": np.asarray(table["id"], np.int64)}
    for k in ("centroid_row", "centroid_col", "area_px", "type", "type_prob"):
        if k in table:
            out[k] = np.asarray(table[k])
    if "type" in table and type_names:
        out["type_name"] = np.array([type_names[t] if 0 <= t < len(type_names) else str(t) for t in table["type"]])
    if "bbox" in table:
        bbox = np.asarray(table["bbox"]).reshape(-1, 4)
        for i, name in enumerate(("bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col")):
            out[name] = bbox[:, i]
    return out


def object_features(table: dict | None, classes: list[str]) -> dict[str, np.ndarray]:
    """The per-object table (:class:`~napari_metahistoseg.postprocess.ObjectStats`) as Labels features: the
    nucleus columns plus ``class`` and ``class_name``."""
    out = table_features(table)
    if out:
        cls = np.asarray(table["class"], np.int64)
        out["class"] = cls
        out["class_name"] = np.array([classes[c] if 0 <= c < len(classes) else str(c) for c in cls])
    return out


def upsert_labels(viewer: napari.Viewer, kind: str, data: np.ndarray, *, name: str, image_layer: Any,
                  meta: dict | None = None, **kwargs: Any) -> tuple[Any, bool]:
    """Replace the data of the plugin layer of ``kind`` made for ``image_layer`` or add a new one.
    Returns ``(layer, created)``."""
    image_name = image_layer.name if image_layer is not None else None
    for ly in find_layers(viewer, kind):
        if plugin_meta(ly).get("image") == image_name and isinstance(ly, napari.layers.Labels):
            if bool(ly.multiscale) != isinstance(data, list):  # napari fixes multiscale at creation: a new layer
                meta = {**plugin_meta(ly), **(meta or {})}
                name = ly.name
                viewer.layers.remove(ly)
                break
            ly.data = data
            ly.metadata = {**ly.metadata, META: {**plugin_meta(ly), **(meta or {})}}
            for k, v in kwargs.items():
                setattr(ly, k, v)
            return ly, False
    full_meta = {META: {"kind": kind, "image": image_name, **(meta or {})}}
    return viewer.add_labels(data, name=name, metadata=full_meta, **placement(image_layer), **kwargs), True
