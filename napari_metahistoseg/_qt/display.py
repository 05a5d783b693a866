"""Show predictions in the viewer: classes, nuclei (with the per-nucleus table as features), gland/object instances
(with the per-object table), mitosis candidates.

Final results replace the data of the plugin's layers for the same image (or add them); the visible-field
preview goes to one temporary layer that the Adapt widget removes when the run ends, so a cancelled or failed
run leaves the viewer as it was.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np

from ..sample_data import labels_colormap
from .jobs import Result, prune_later
from .layers import META, find_layers, object_features, placement, table_features, upsert_labels

MITOSIS_THRESHOLD = 0.5  # initial value of the candidate threshold slider
MITOSIS_POINT_SIZE_PX = 10.0
CELL_POINT_SIZE_PX = 6.0  # detected cells (a head adapted on clicked centroids)


def show_preview(viewer: napari.Viewer, image_layer: Any, prediction: Any, region: tuple[int, int, int, int],
                 colours: list[str]) -> Any:
    """The visible-field prediction as a temporary Labels layer of the region's size, placed over it (returned;
    region-sized, so a slide's preview costs no more memory than what is on screen)."""
    r0, r1, c0, c1 = region
    place = placement(image_layer)
    scale = place.get("scale", (1.0, 1.0))
    origin = place.get("translate", (0.0, 0.0))
    place["translate"] = (origin[0] + r0 * scale[0], origin[1] + c0 * scale[1])
    return viewer.add_labels(np.asarray(prediction.semantic)[: r1 - r0, : c1 - c0],
                             name="prediction (visible field, preview)", opacity=0.5,
                             colormap=labels_colormap(colours, offset=0),
                             metadata={META: {"kind": "preview", "image": image_layer.name, "region": list(region)}},
                             **place)


# result array -> (plugin layer kind, layer name, opacity, contour width; 0 = filled)
LABEL_LAYERS = {"semantic": ("prediction", "classes", 0.5, 0), "instances": ("instances", "nuclei", 0.6, 1),
                "objects": ("objects", "objects", 0.5, 2)}


def _show_labels(viewer: napari.Viewer, image_layer: Any, data: dict[str, Any], features: dict[str, Any],
                 classes: list[str], colours: list[str], store: dict) -> list[Any]:
    """Add or update the classes / nuclei / objects layers of ``data`` (absent or None: skipped), with their
    feature tables; ``store`` is extra metadata of every layer. Returns the layers created."""
    created = []
    for key, (kind, label, opacity, contour) in LABEL_LAYERS.items():
        if data.get(key) is None:
            continue
        semantic = key == "semantic"
        layer, new = upsert_labels(viewer, kind, data[key], name=f"{label} ({image_layer.name})",
                                   image_layer=image_layer, opacity=opacity,
                                   meta={**({"classes": list(classes), "colours": list(colours)} if semantic
                                            else {}), **store},
                                   **({"colormap": labels_colormap(colours, offset=0)} if semantic else {}))
        if features.get(key) is not None:
            layer.features = features[key]
        layer.contour = contour
        created += [layer] if new else []
    return created


def show_result(viewer: napari.Viewer, image_layer: Any, result: Result, colours: list[str]) -> list[Any]:
    """Add or update the prediction layers; returns the layers that were created (not merely updated)."""
    if result.large is not None:
        created = show_large(viewer, image_layer, result, colours)
    else:
        pred = result.prediction
        features = {"instances": table_features(pred.table, result.type_names) if pred.instances is not None
                    else None, "objects": object_features(pred.object_table, list(pred.classes))
                    if pred.objects is not None else None}
        created = _show_labels(viewer, image_layer, {"semantic": pred.semantic, "instances": pred.instances,
                                                     "objects": pred.objects}, features, pred.classes, colours, {})
    if result.mitosis_points is not None:
        created += show_mitosis(viewer, image_layer, result.mitosis_points, result.mitosis_probs)
    if result.cells is not None:
        names = result.large.classes if result.large is not None else result.prediction.classes
        created += show_cells(viewer, image_layer, result.cells, list(names), colours)
    return created


def show_cells(viewer: napari.Viewer, image_layer: Any, cells: tuple[np.ndarray, np.ndarray, np.ndarray],
               class_names: list[str], colours: list[str]) -> list[Any]:
    """Detected cells (points, classes ≥ 1, probabilities) as a Points layer with ``class``, ``class_name`` and
    ``probability`` features, coloured by class; an earlier one of the same image is updated."""
    points, classes, probs = (np.asarray(a) for a in cells)
    feats = {"class": classes.astype(np.int64), "class_name": [class_names[c] for c in classes],
             "probability": probs.astype(np.float32)}
    face = [colours[c % len(colours)] for c in classes] if len(classes) else "white"
    for ly in find_layers(viewer, "cells"):
        if ly.metadata[META].get("image") == image_layer.name:
            ly.data = points.reshape(-1, 2)
            ly.features = feats
            if len(classes):
                ly.face_color = face
            return []
    ly = viewer.add_points(points.reshape(-1, 2), features=feats, name=f"cells ({image_layer.name})",
                           size=CELL_POINT_SIZE_PX, face_color=face, border_color="white", border_width=0.1,
                           metadata={META: {"kind": "cells", "image": image_layer.name}}, **placement(image_layer))
    return [ly]


def _labels_data(levels: list) -> Any:
    """A single array, or the list of levels (napari then loads only what is on screen, at the zoom's level)."""
    return levels[0] if len(levels) == 1 else levels


def show_large(viewer: napari.Viewer, image_layer: Any, result: Result, colours: list[str]) -> list[Any]:
    """Layers over the zarr arrays of a streamed prediction, multiscale where the store has levels (napari reads
    a single-scale layer whole, a multiscale one only on screen); nuclei and objects carry their tables (read
    from the CSVs by the job) as features. Older stores of the same image are deleted on a background thread
    once the layers read the new one."""
    import zarr

    from ..slide import pyramid

    res = result.large
    root = zarr.open_group(str(res.store), mode="r")
    data = {n: _labels_data(pyramid(root, n)) for n in LABEL_LAYERS if n in root}
    created = _show_labels(viewer, image_layer, data, result.features, res.classes, colours,
                           {"store": str(res.store)})
    prune_later(res.store)  # the layers now read this store: older ones of the same image can go
    return created


def show_mitosis(viewer: napari.Viewer, image_layer: Any, points: np.ndarray, probs: np.ndarray) -> list[Any]:
    """Candidates as Points with a ``probability`` feature; shown = probability ≥ ``metadata threshold``."""
    feats = {"probability": np.asarray(probs, np.float32)}
    for ly in find_layers(viewer, "mitosis"):
        if ly.metadata[META].get("image") == image_layer.name:
            ly.data = points
            ly.features = feats
            apply_threshold(ly, ly.metadata[META].get("threshold", MITOSIS_THRESHOLD))
            return []
    ly = viewer.add_points(points, features=feats, name=f"mitosis candidates ({image_layer.name})",
                           size=MITOSIS_POINT_SIZE_PX, face_color="transparent", border_color="probability",
                           border_colormap="magma", border_width=0.15,
                           metadata={META: {"kind": "mitosis", "image": image_layer.name,
                                            "threshold": MITOSIS_THRESHOLD}}, **placement(image_layer))
    apply_threshold(ly, MITOSIS_THRESHOLD)
    return [ly]


def apply_threshold(layer: Any, threshold: float) -> None:
    """Show only candidates with probability ≥ ``threshold`` (the data and features stay complete)."""
    layer.metadata = {**layer.metadata, META: {**layer.metadata[META], "threshold": float(threshold)}}
    probs = np.asarray(layer.features.get("probability", np.zeros(len(layer.data))))
    layer.shown = probs >= threshold
